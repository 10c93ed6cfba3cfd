"""`linearard study`: the arm grammar, and whole studies on a tiny model with tiny budgets.

One study of the default arms runs once per module (`finished_study`); the tests that rerun it work on
copies of its folder, so each sees the finished state.
"""

import json
import shlex
import shutil
import statistics

import pytest
import torch

import linearard.evaluation as evaluation
import linearard.training.loop as loop
from linearard.cli import build_parser, main
from linearard.config import RestoreConfig
from linearard.errors import UserError
from linearard.models.rope import RopeScaling
from linearard.study.arms import PAPER_CPT_SHARE, PRESETS, format_tokens, parse_arms, split_arms
from linearard.study.command import eval_overrides, settings_from_args
from linearard.study.runner import arm_config
from tiny import byte_tokenizer, tiny_model

DEFAULT = list(PRESETS["default"])
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60


# -- the arm grammar ---------------------------------------------------------------------------------


def test_default_arms_and_presets():
    assert [a.name for a in parse_arms("default")] == DEFAULT
    arms = parse_arms("default,budget,ablations")  # "ard" is in all three: kept once
    names = [a.name for a in arms]
    assert names == [*DEFAULT, "ard@0.25M", "ard@0.5M", "ard@1M", "ard@2M", "ard[q]", "ard[k]", "ard[v]",
                     "ard[every-other]"]
    trained = {a.name: a for a in arms}
    assert not trained["native"].trains and not trained["scaled"].trains
    assert trained["cpt"].objective == "cpt" and not trained["cpt"].cpt_stage
    assert trained["ard+cpt"].objective == "ard" and trained["ard+cpt"].cpt_stage
    assert trained["ard@0.25M"].tokens(4_250_000) == 250_000
    assert trained["ard"].tokens(4_250_000) == 4_250_000


def test_arm_variants_parse_to_canonical_names():
    arm = parse_arms("ard[v, k=0.5, every-other, lr=2e-4, seeds=3]@500K")[0]
    assert arm.name == "ard[k=0.5,v,every-other,lr=2e-4]@0.5M"  # relations first, seeds left out
    assert arm.relations == (("k", 0.5), ("v", 1.0))
    assert arm.layers == "every-other"
    assert arm.settings == (("lr", 0.0002),)
    assert arm.seeds == 3
    assert arm.tokens(10**9) == 500_000
    assert arm.family == "ard[k=0.5,v,every-other,lr=2e-4]"
    # the budget may come before the items; a share of --max-tokens; layer indices and ranges
    assert parse_arms("ard@25%[q]")[0].name == "ard[q]@25%"
    assert parse_arms("ard@25%")[0].tokens(4_000_000) == 1_000_000
    assert parse_arms("hidden[1,-1,0-3]")[0].layers == "1,-1,0-3"
    combo = parse_arms("ard+logits+cpt[logits=0.1]")[0]
    assert (combo.objective, combo.cpt_stage, combo.weights) == ("ard+logits", True, (("logits", 0.1),))
    assert split_arms("native, ard[k,v]@1M,,cpt") == ["native", "ard[k,v]@1M", "cpt"]
    assert parse_arms("ard[k,v]")[0].slug == "ard_k_v"


def test_token_counts_are_written_as_budgets():
    assert [format_tokens(n) for n in (4_250_000, 250_000, 1_500, 160, 1_234_567)] == [
        "4.25M", "0.25M", "1.5K", "160", "1234567"]


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ("native,bogus", "unknown arm 'bogus'"),
        ("ard+cpt+ard", "unknown arm"),
        ("cpt+ard", "unknown arm"),
        ("ard+ard", "unknown arm"),
        ("native@1M", "trains nothing"),
        ("scaled[q]", "trains nothing"),
        ("logits[q]", "needs ard"),
        ("cpt[every-other]", "needs ard, attention or hidden"),
        ("ard[x]", "unknown item 'x'"),
        ("ard[q,]", "empty item"),
        ("ard[lr=fast]", "cannot read"),
        ("ard[output=elsewhere]", "set by the study"),
        ("ard[rope_factor=8]", "set by the study"),
        ("ard[nonsense=1]", "neither an item nor a restore setting"),
        ("ard[logits=1]", "first stage lacks"),
        ("ard[q=-1]", "weight >= 0"),
        ("ard[seeds=0]", "seeds must be"),
        ("ard[q]@1M[v]", "two [...] groups"),
        ("ard@lots", "cannot read the budget"),
        ("ard@0", "at least one token"),
        ("ard@0%", "percentage above 0"),
        ("ard[q", "unbalanced"),
        ("ard,ard[seeds=2]", "clash"),
        (" , ", "names no arm"),
    ],
)
def test_bad_arms_are_user_errors(arms, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        parse_arms(arms)


def test_arm_configs_share_the_base_and_differ_only_where_the_arm_says():
    base = RestoreConfig(model="m", seq_len=32, cpt_seq_len=None, max_tokens=1000, lr=3e-4, weights={"logits": 0.5},
                         relations={"q": 2.0})
    scaling = RopeScaling("yarn", 4.0, 256, 1024)

    def config(text, seed=0):
        return arm_config(parse_arms(text)[0], base, scaling, seed=seed, output="out", cpt_share=PAPER_CPT_SHARE)

    ard = config("ard")
    assert (ard.objective, ard.max_tokens, ard.cpt_tokens, ard.seq_len, ard.lr) == ("ard", 1000, 0, 32, 3e-4)
    assert (ard.rope_type, ard.rope_factor, ard.target_length) == ("yarn", 4.0, 1024)
    assert ard.relations == {"q": 2.0} and ard.weights == {}  # the logits weight belongs to arms with logits
    assert (ard.export, ard.eval, ard.resume) == (True, False, False)
    two_stage = config("ard+cpt@2M")
    assert (two_stage.max_tokens, two_stage.cpt_tokens) == (2_000_000, round(2_000_000 * PAPER_CPT_SHARE))
    assert config("ard+cpt@4.25M").cpt_tokens == 2_000_000  # the paper's split: 2.25M ARD + 2M CPT
    assert config("cpt").seq_len == 1024  # long blocks: the target length without --cpt-seq-len
    assert config("cpt[seq_len=64]").seq_len == 64
    assert config("ard[k,v,every-other]").relations == {"k": 1.0, "v": 1.0}
    assert config("ard[every-other]").layers == "every-other"
    assert config("ard+logits").weights == {"logits": 0.5}
    assert config("ard+logits[logits=0.1,lr=1e-3]").weights == {"logits": 0.1}
    assert config("ard[lr=1e-3]").lr == 1e-3
    assert config("ard", seed=7).seed == 7
    with pytest.raises(UserError, match=r"arm ard\+cpt\[cpt_tokens=2000\]: --cpt-tokens"):
        config("ard+cpt[cpt_tokens=2000]")


def test_command_line_defaults_and_the_configs_stage_split():
    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["study", *argv]))

    s = settings()
    assert (s.base.model, s.base.rope_type, s.base.rope_factor, s.base.max_tokens) == ("smollm2-135m", "linear", 4.0,
                                                                                        4_250_000)
    assert s.cpt_share == PAPER_CPT_SHARE and s.seeds == 1 and [a.name for a in s.arms] == DEFAULT
    assert (settings("--rope-type", "yarn").base.rope_factor, settings("--rope-factor", "8").base.rope_type) == (
        4.0, "linear")
    split = settings("--set", "cpt_tokens=1000", "--set", "max_tokens=4000")
    assert (split.cpt_share, split.base.cpt_tokens, split.base.max_tokens) == (0.25, 0, 4000)
    assert settings("--set", "cpt_tokens=1000", "--set", "max_tokens=4000", "--cpt-share", "0.5").cpt_share == 0.5
    assert settings("--set", "target_length=65536").base.rope_type is None  # the config's RoPE: YaRN to 64K
    evaluation = settings("--device", "cpu", "--limit", "0", "--lengths", "1K,2K", "--eval-set", "samples=3")
    assert (evaluation.eval_settings.limit, evaluation.eval_settings.lengths) == (None, (1000, 2000))
    assert evaluation.eval_settings.samples == 3 and evaluation.eval_device == "cpu"


def test_eval_overrides():
    assert eval_overrides(["samples=3", "ppl_lengths=64,1K", "depths=[0, 0.5]", "limit=null"]) == {
        "samples": 3, "ppl_lengths": (64, 1000), "depths": (0.0, 0.5), "limit": None}
    for bad in ("colour=blue", "samples", "samples=many", "lengths=", "samples=null"):
        with pytest.raises(UserError, match="--eval-set"):
            eval_overrides([bad])


# -- whole studies -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A tiny model's matrices gain nothing from intra-op threads, and on a busy CI machine two threads
    # per process contend: one thread ran these studies three times faster there.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tiny_model("llama").save_pretrained(root / "tiny")  # native length 256 -> 1024 under linear x4
    byte_tokenizer().save_pretrained(root / "tiny")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(TEXT)
    return root


def study_args(workspace, output, *extra):
    return [
        "study", "--model", str(workspace / "tiny"), "--output", str(output), "--max-tokens", "256",
        "--seq-len", "32", "--cpt-seq-len", "64", "--cpt-share", "0.5", "--data", str(workspace / "corpus"),
        "--set", "warmup_steps=1", "--set", "lora_rank=8", "--set", "shuffle_buffer=16",
        "--tasks", "ppl,agreement,passkey", "--lengths", "512",
        "--eval-set", "ppl_lengths=64", "--eval-set", "ppl_tokens=256", "--eval-set", "agreement_length=128",
        "--eval-set", "agreement_tokens=256", "--eval-set", "samples=1", "--eval-set", "depths=0.5",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_study(workspace):
    output = workspace / "default"
    assert main(study_args(workspace, output)) == 0
    return output


@pytest.fixture
def study_copy(finished_study, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(finished_study, target)
    return target


def record(output, arm, seed=0):
    folder = output / "runs" / arm if arm in ("native", "scaled") else output / "runs" / arm / f"seed-{seed}"
    return json.loads((folder / "results.json").read_text())


def test_every_default_arm_trains_is_evaluated_and_reported(finished_study):
    results = json.loads((finished_study / "results.json").read_text())
    assert [a["name"] for a in results["arms"]] == DEFAULT
    assert results["study"]["command"].startswith("linearard study --model ")
    assert {"torch", "transformers", "linearard"} <= set(results["study"]["versions"])
    assert results["study"]["device"] and not results["study"]["unfinished"] and not results["study"]["failed"]

    # 256 tokens in steps of 64 (the longest block: one CPT block or two distillation blocks a step), so
    # every single-stage arm takes 4 steps; ard+cpt gives half to CPT, whose steps keep the first stage's two
    # blocks (128 tokens) until the restore config derives a step's blocks per stage
    expected_stages = {
        "cpt": [("cpt", 64, 256, 4)],
        "logits": [("logits", 32, 256, 4)],
        "hidden": [("hidden", 32, 256, 4)],
        "ard": [("ard", 32, 256, 4)],
        "ard+cpt": [("ard", 32, 128, 2), ("cpt", 64, 128, 1)],
    }
    models = results["evaluation"]["models"]
    for arm, stages in expected_stages.items():
        rec = record(finished_study, arm)
        assert [(s["objective"], s["seq_len"], s["tokens"], s["steps"]) for s in rec["training"]["stages"]] == stages
        assert rec["config"]["gradient_checkpointing"] == (arm in ("cpt", "ard+cpt"))  # long blocks only
        assert rec["training"]["tokens"] == sum(s[2] for s in stages)
        assert (finished_study / "runs" / arm / "seed-0" / "train" / "model" / "config.json").exists()
        assert models[arm]["supported_length"] == 1024  # the export carries the student's RoPE
        assert models[arm]["tasks"]["agreement"]["metrics"]["kl"]["value"] > 0
    assert models["native"]["supported_length"] == 256 and models["scaled"]["supported_length"] == 1024

    native = models["native"]["tasks"]
    assert native["agreement"]["metrics"]["kl"]["value"] == 0 and native["agreement"]["metrics"]["top1"]["value"] == 1
    assert native["passkey"]["metrics"]["acc@512"]["value"] is None  # beyond the native length: n/a, no crash
    assert models["ard"]["tasks"]["passkey"]["metrics"]["acc@512"]["value"] is not None
    assert results["evaluation"]["recovery"]["native"]["mean"]["value"] == 1.0
    # distilling from the native model keeps closer to it than next-token training on the corpus
    kl = {a: models[a]["tasks"]["agreement"]["metrics"]["kl"]["value"] for a in ("ard", "cpt")}
    assert kl["ard"] < kl["cpt"]

    report = (finished_study / "report.md").read_text()
    for table in ("### Short text", "### Long context", "### Training"):
        section = report.split(table)[1].split("###")[0]
        rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]
        assert rows == DEFAULT, table
    assert "## Every run" in report and "#### agreement" in report
    assert "recovery %" in report and "| ard+cpt | 256 | ard 128 × 32 + cpt 128 × 64 |" in report
    for plot in ("ppl_vs_length.png", "passkey_native.png", "passkey_ard_cpt.png"):
        assert (finished_study / plot).stat().st_size > 0 and f"]({plot})" in report
    assert not (finished_study / "budget_curve.png").exists()  # no arm at two budgets


def test_rerun_skips_finished_runs(workspace, study_copy, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    # the command line recorded in results.json reproduces the study exactly
    argv = shlex.split(json.loads((study_copy / "results.json").read_text())["study"]["command"])
    assert argv[:2] == ["linearard", "study"]
    argv[argv.index("--output") + 1] = str(study_copy)
    assert main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert "7 already finished, 0 to do" in out and "### Training" in out


def test_rerun_redoes_only_what_is_missing(workspace, study_copy, monkeypatch):
    real_restore, real_evaluate = loop.restore, evaluation.evaluate
    trained, evaluated = [], []
    monkeypatch.setattr(loop, "restore", lambda config, **kw: trained.append(config) or real_restore(config, **kw))
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, *a, **kw: evaluated.append(list(models)) or real_evaluate(models, *a, **kw))
    # logits lost its evaluation; hidden lost its export (its final checkpoint is still there)
    logits = record(study_copy, "logits")
    del logits["evaluation"]
    (study_copy / "runs" / "logits" / "seed-0" / "results.json").write_text(json.dumps(logits))
    shutil.rmtree(study_copy / "runs" / "hidden" / "seed-0" / "train" / "model")

    assert main(study_args(workspace, study_copy)) == 0
    assert [(c.objective, c.resume) for c in trained] == [("hidden", True)]
    assert sorted({name for models in evaluated for name in models} - {"native"}) == ["hidden", "logits"]
    assert record(study_copy, "hidden")["training"]["resumed"] is True
    assert (study_copy / "runs" / "hidden" / "seed-0" / "train" / "model" / "config.json").exists()
    results = json.loads((study_copy / "results.json").read_text())
    assert [a["name"] for a in results["arms"] if a["finished"]] == DEFAULT


def test_a_failed_run_does_not_stop_the_others(workspace, study_copy, monkeypatch, capsys):
    def non_finite(config, **kwargs):
        raise UserError("stopped: non-finite loss at step 2")

    monkeypatch.setattr(loop, "restore", non_finite)
    for arm in ("ard", "cpt"):
        shutil.rmtree(study_copy / "runs" / arm)
    assert main(study_args(workspace, study_copy)) == 1
    assert "2 run(s) failed" in capsys.readouterr().err
    results = json.loads((study_copy / "results.json").read_text())
    assert set(results["study"]["failed"]) == {"ard", "cpt"}
    assert "ard failed (arm ard: stopped: non-finite loss" in (study_copy / "report.md").read_text()
    assert "hidden" in results["by_arm"]["models"] and "ard" not in results["by_arm"]["models"]


def test_other_settings_in_the_same_folder_are_an_error(workspace, finished_study, capsys):
    assert main(study_args(workspace, finished_study, "--set", "lr=0.002")) == 2
    assert "made with other settings (lr 0.001 -> 0.002)" in capsys.readouterr().err
    assert main(study_args(workspace, finished_study, "--rope-factor", "2")) == 2
    assert main(study_args(workspace, finished_study, "--arms", "native,ard,bogus")) == 2
    assert "unknown arm 'bogus'" in capsys.readouterr().err
    assert main(study_args(workspace, finished_study, "--arms", "ard@10")) == 2
    assert "arm ard@10: the restore stage's budget of 10 tokens" in capsys.readouterr().err
    assert main(study_args(workspace, finished_study, "--arms", "native,ard[0,5]")) == 2  # the model has 2 layers
    assert "arm ard[0,5]: layer 5 is out of range" in capsys.readouterr().err


def test_dry_run_lists_runs_and_what_a_rerun_does(workspace, finished_study, capsys):
    args = study_args(workspace, finished_study, "--arms", "native,ard,ard[q]@64", "--seeds", "2",
                      "--dry-run")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ard (seed 0)" in out and "[done]" in out
    assert "ard (seed 1)" in out and "ard[q]@64 (seed 1)" in out and "[train]" in out
    assert not (finished_study / "runs" / "ard" / "seed-1").exists()


def test_seeds_aggregate_and_budget_curve(workspace, study_copy, monkeypatch):
    real_restore = loop.restore
    trained = []
    monkeypatch.setattr(loop, "restore", lambda config, **kw: trained.append(config) or real_restore(config, **kw))
    args = study_args(workspace, study_copy, "--arms", "native,scaled,ard,ard@50%[seeds=1]", "--seeds", "2")
    assert main(args) == 0
    # seed 0 of ard is reused from the first study; seed 1 and the budget arm are new
    assert sorted((c.max_tokens, c.seed) for c in trained) == [(128, 0), (256, 1)]

    results = json.loads((study_copy / "results.json").read_text())
    by_run = results["evaluation"]["models"]
    assert set(by_run) == {"native", "scaled", "ard (seed 0)", "ard (seed 1)", "ard@50%"}
    aggregated = results["by_arm"]["models"]["ard (2 seeds)"]["tasks"]
    for task, metric in (("agreement", "kl"), ("agreement", "top1"), ("ppl", "all@64")):
        values = [by_run[f"ard (seed {s})"]["tasks"][task]["metrics"][metric]["value"] for s in (0, 1)]
        cell = aggregated[task]["metrics"][metric]
        assert cell["value"] == pytest.approx(statistics.fmean(values))
        assert cell["stderr"] == pytest.approx(statistics.stdev(values)) and cell["n"] == 2
    assert values[0] != values[1]  # two seeds, two different models
    recoveries = [results["evaluation"]["recovery"][f"ard (seed {s})"]["mean"]["value"] for s in (0, 1)]
    mean_recovery = results["by_arm"]["recovery"]["ard (2 seeds)"]["mean"]
    assert mean_recovery["value"] == pytest.approx(statistics.fmean(recoveries))

    report = (study_copy / "report.md").read_text()
    assert "| ard (2 seeds) |" in report and "| ard@50% |" in report
    assert "## Token budget" in report and (study_copy / "budget_curve.png").stat().st_size > 0
    assert not (study_copy / "passkey_cpt.png").exists()  # plots of arms no longer listed are removed
