"""`linearard study`: the arm grammar, and whole studies on a tiny model with tiny budgets.

One study of the default arms runs once per module (`finished_study`); the tests that rerun it work on
copies of its folder, so each sees the finished state.
"""

import itertools
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
from linearard.study.report import sweep_edges
from linearard.study.runner import arm_config, describe_plan
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
    # what a run trained (whole steps of its budget), as reports show it
    assert [format_tokens(n, exact=False) for n in (4_227_072, 229_376, 1_998_848, 1_500, 160)] == [
        "4.23M", "0.229M", "2M", "1.5K", "160"]


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
    # the versions the runs were evaluated with (here one set), not those of whoever writes the report
    assert results["study"]["versions"] == [record(finished_study, "native")["evaluation"]["meta"]["versions"]]
    assert {"torch", "transformers", "linearard"} <= set(results["study"]["versions"][0])
    assert results["study"]["device"] and not results["study"]["unfinished"] and not results["study"]["failed"]

    # 256 tokens in steps of 64 (the longest block: one CPT block or two distillation blocks a step), so
    # every single-stage arm takes 4 steps; ard+cpt gives half to CPT, each of its stages 2 steps of 64
    expected_stages = {
        "cpt": [("cpt", 64, 256, 4)],
        "logits": [("logits", 32, 256, 4)],
        "hidden": [("hidden", 32, 256, 4)],
        "ard": [("ard", 32, 256, 4)],
        "ard+cpt": [("ard", 32, 128, 2), ("cpt", 64, 128, 2)],
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
    assert "recovery %" in report and "| ard+cpt | 256 | ard 128 × 32 (2 steps) + cpt 128 × 64 (2 steps) |" in report
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


def test_a_study_kept_without_its_weights_is_still_finished(workspace, study_copy, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    for train in study_copy.glob("runs/**/train"):  # what a study copied back without its models keeps
        shutil.rmtree(train)
    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    assert main(study_args(workspace, study_copy)) == 0
    assert "7 already finished, 0 to do" in capsys.readouterr().out


def test_a_rerun_with_other_evaluation_batch_sizes_redoes_nothing(workspace, study_copy, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    # batch sizes set how fast the numbers come, not what they are: the earlier evaluations count
    assert main(study_args(workspace, study_copy, "--eval-batch-size", "3", "--eval-set", "max_batch_tokens=512")) == 0
    assert "7 already finished, 0 to do" in capsys.readouterr().out
    meta = json.loads((study_copy / "results.json").read_text())["study"]
    assert (meta["eval_settings"]["batch_size"], meta["eval_settings"]["max_batch_tokens"]) == (3, 512)  # as used
    assert not {"batch_size", "max_batch_tokens"} & set(meta["eval_fingerprint"]["settings"])


def test_rerun_redoes_only_what_is_missing(workspace, study_copy, monkeypatch):
    real_restore, real_evaluate = loop.restore, evaluation.evaluate
    trained, evaluated = [], []
    monkeypatch.setattr(loop, "restore", lambda config, **kw: trained.append(config) or real_restore(config, **kw))
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, *a, **kw: evaluated.append(list(models)) or real_evaluate(models, *a, **kw))
    # logits lost its evaluation; hidden lost its evaluation and its export (its final checkpoint is still there)
    for arm in ("logits", "hidden"):
        rec = record(study_copy, arm)
        del rec["evaluation"]
        (study_copy / "runs" / arm / "seed-0" / "results.json").write_text(json.dumps(rec))
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
    err = capsys.readouterr().err  # every trained arm's folder, in one error, so one rerun can follow
    assert "5 folders hold runs made with other settings: " in err and len(err.strip().splitlines()) == 1
    for arm in ("cpt", "logits", "hidden", "ard", "ard+cpt"):
        assert f"{finished_study / 'runs' / arm / 'seed-0'} (arm {arm}: lr 0.001 -> 0.002)" in err
    assert main(study_args(workspace, finished_study, "--arms", "native,ard", "--set", "lr=0.002")) == 2
    assert "holds a run of arm ard made with other settings (lr 0.001 -> 0.002)" in capsys.readouterr().err
    # a worker of --devices answers for its own run: other arms' stale folders are the parent's to report
    assert main(study_args(workspace, finished_study, "--set", "lr=0.002", "--only", "native")) == 0
    assert main(study_args(workspace, finished_study, "--set", "lr=0.002", "--only", "ard")) == 2
    assert "holds a run of arm ard made with other settings" in capsys.readouterr().err
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
    curve = report.split("## Token budget")[1]
    assert "- `ard`: recovery" in curve and "at 128 → " in curve and "(from 128: " in curve
    assert not (study_copy / "passkey_cpt.png").exists()  # plots of arms no longer listed are removed


def test_the_report_sets_each_variant_of_ard_against_ard(workspace, study_copy):
    args = study_args(workspace, study_copy, "--arms", "native,scaled,cpt,ard,ard[v],ard[v]@50%,ard@50%")
    assert main(args) == 0
    results = json.loads((study_copy / "results.json").read_text())
    # ard[v] at ard's budget is a variant; ard[v]@50% (another budget) and ard@50% (a budget point) are not
    assert [(v["ard"], v["baseline"]) for v in results["variants"]] == [("ard[v]", "ard")]
    kl = next(m for m in results["variants"][0]["metrics"] if m["name"] == "next-token KL")
    models = results["by_arm"]["models"]
    assert kl["ard"] == models["ard[v]"]["tasks"]["agreement"]["metrics"]["kl"]
    assert kl["baseline"] == models["ard"]["tasks"]["agreement"]["metrics"]["kl"]
    assert kl["difference"] == pytest.approx(kl["ard"]["value"] - kl["baseline"]["value"])
    assert kl["outcome"] in {"wins", "ties", "loses"}
    report = (study_copy / "report.md").read_text()
    section = report.split("## ARD's variants against ARD")[1].split("\n## ")[0]
    assert "- **ard[v] vs ard**: " + kl["outcome"] + " on next-token KL" in section
    assert ("ard", "cpt") in {(v["ard"], v["baseline"]) for v in results["verdict"]}  # ard[v] is no baseline


# -- fairness: tokens per step, checkpointing ----------------------------------------------------------


def test_every_arm_takes_the_same_steps_whatever_its_block_length():
    from linearard.training.plan import ModelShape, plan_stages
    from tiny import tiny_model

    base = RestoreConfig(model="m", seq_len=32, cpt_seq_len=128, max_tokens=4096, lr=3e-4)
    scaling = RopeScaling("linear", 4.0, 256, 1024)
    model = tiny_model("llama")
    shape = ModelShape.of(model, model.config)
    steps = {}
    for text in ("ard", "logits", "cpt", "hidden[seq_len=64]", "ard+cpt"):
        config = arm_config(parse_arms(text)[0], base, scaling, seed=0, output="out", cpt_share=0.5,
                            tokens_per_step=512)
        stages = plan_stages(config, scaling, shape, world_size=1, device="cpu", bf16=False)
        assert all(stage.tokens_per_step == 512 for stage in stages)
        assert config.gradient_checkpointing == (max(s.seq_len for s in stages) > 32)  # long blocks recompute
        steps[text] = [(stage.steps, stage.seq_len, stage.batch_size * stage.grad_accum) for stage in stages]
    assert steps == {"ard": [(8, 32, 16)], "logits": [(8, 32, 16)], "cpt": [(8, 128, 4)],
                     "hidden[seq_len=64]": [(8, 64, 8)], "ard+cpt": [(4, 32, 16), (4, 128, 4)]}


# -- the learning-rate sweep ------------------------------------------------------------------------------


def test_the_sweep_picks_each_arms_best_rate_and_waits_until_it_can(workspace, tmp_path):
    from linearard.study.runner import Study, read_json, write_json

    args = study_args(workspace, tmp_path / "s", "--arms", "native,ard,ard@50%,cpt,logits[lr=5e-4]",
                      "--lr-sweep", "1e-4,1e-3,1e-2", "--sweep-tokens", "128")
    study = Study(settings_from_args(build_parser().parse_args(args)), log=lambda _: None)
    runs = {r.label: r for r in study.plan()}
    # one sweep per family (ard and ard@50% share theirs); an arm with its own lr has none
    assert [r.label for r in study.sweep_runs] == [f"{f} lr={lr} (sweep)" for f in ("ard", "cpt")
                                                   for lr in ("0.0001", "0.001", "0.01")]
    assert {r.config.max_tokens for r in study.sweep_runs} == {128}
    assert runs["ard"].pending and runs["ard@50%"].pending and not runs["logits[lr=5e-4]"].pending
    assert study.status(runs["ard"]) == "wait"
    assert "lr from the sweep" in describe_plan(study, [])

    def finish(run, kl=None, failed=None):
        record = {"failed": failed} if failed else {
            "evaluation": {"fingerprint": study.fingerprint(run),
                           "entry": {"tasks": {"agreement": {"metrics": {"kl": {"value": kl, "stderr": 0.01},
                                                                         "top1": {"value": 0.5}}}}}}}
        write_json(run.record_path, {"config": run.config.to_dict(), **record})

    ard_sweep = study.sweep_of("ard")
    finish(ard_sweep[0], kl=0.30)
    finish(ard_sweep[1], kl=0.20)
    assert study.chosen_lr("ard")[0] is None and "waits for the learning-rate sweep" in study.chosen_lr("ard")[1]
    finish(ard_sweep[2], failed="stopped: non-finite loss at step 2")  # a diverging rate loses, it does not block
    assert study.chosen_lr("ard") == (1e-3, "")
    for run in study.sweep_of("cpt"):
        finish(run, failed="stopped: non-finite loss")
    runs = {r.label: r for r in study.plan()}
    assert (runs["ard"].config.lr, runs["ard@50%"].config.lr) == (1e-3, 1e-3) and not runs["ard"].pending
    assert runs["cpt"].pending and "every learning rate of its sweep failed" in study.chosen_lr("cpt")[1]
    assert study.status(ard_sweep[2]) == "failed"  # not retried by a rerun
    assert read_json(ard_sweep[0].record_path)["evaluation"]["entry"]


def test_an_earlier_evaluation_counts_whatever_its_batch_sizes_but_not_other_settings(workspace, tmp_path):
    from dataclasses import asdict, replace

    from linearard.study.runner import Study, write_json

    args = study_args(workspace, tmp_path / "s", "--arms", "native,ard", "--lr-sweep", "1e-4,1e-3",
                      "--sweep-tokens", "128")
    study = Study(settings_from_args(build_parser().parse_args(args)), log=lambda _: None)
    study.plan()
    used = study.s.eval_settings

    def old_style(run, **changes):
        """The fingerprint as written before batch sizes left it: every setting, batch sizes included."""
        return {**study.fingerprint(run), "settings": json.loads(json.dumps(asdict(replace(used, **changes))))}

    def finish(run, fingerprint, kl=0.2):
        rec = {"evaluation": {"fingerprint": fingerprint, "entry": {"tasks": {"agreement": {"metrics": {
            "kl": {"value": kl, "stderr": 0.01}, "top1": {"value": 0.5}}}}}}}
        if run.arm.trains:
            rec.update(config=run.config.to_dict(), training={"tokens": run.config.max_tokens})
        else:
            rec["model"] = run.spec
        write_json(run.record_path, rec)

    native = study.reference
    other_batches = dict(batch_size=used.batch_size + 1, max_batch_tokens=used.max_batch_tokens * 2)
    for fingerprint in (study.fingerprint(native), old_style(native), old_style(native, **other_batches)):
        finish(native, fingerprint)
        assert study.status(native) == "done"
    new_style = study.fingerprint(native)
    assert "batch_size" not in new_style["settings"]
    for fingerprint in (old_style(native, samples=used.samples + 1, **other_batches),
                        {**new_style, "settings": {**new_style["settings"], "limit": 7}}):
        finish(native, fingerprint)
        assert study.status(native) == "evaluate"

    # the sweep's runs: evaluated with other batch sizes, they are done and the sweep picks its rate
    low, high = study.sweep_of("ard")
    finish(low, old_style(low, **other_batches), kl=0.3)
    finish(high, old_style(high, batch_size=1), kl=0.2)
    assert (study.status(low), study.status(high)) == ("done", "done")
    assert study.chosen_lr("ard") == (1e-3, "")
    finish(high, old_style(high, samples=used.samples + 1), kl=0.2)
    assert study.status(high) == "train" and "waits for the learning-rate sweep" in study.chosen_lr("ard")[1]
    finish(high, old_style(high, max_batch_tokens=64), kl=0.2)

    ard = {r.label: r for r in study.plan()}["ard"]
    assert not ard.pending and ard.config.lr == 1e-3
    finish(ard, old_style(ard, **other_batches))
    assert study.status(ard) == "done"
    finish(ard, old_style(ard, limit=7, **other_batches))
    assert study.status(ard) == "train"  # neither export nor checkpoint here: evaluated elsewise, it trains again


def test_a_sweep_study_trains_the_best_rate_and_reports_the_sweep(workspace, tmp_path, monkeypatch):
    real_restore = loop.restore

    def diverging(config, **kwargs):
        if config.lr == 3e-2:
            raise UserError("stopped: non-finite loss at step 2")
        return real_restore(config, **kwargs)

    monkeypatch.setattr(loop, "restore", diverging)
    output = tmp_path / "sweep"
    assert main(study_args(workspace, output, "--arms", "native,ard", "--lr-sweep", "1e-4,1e-3,3e-2",
                           "--sweep-tokens", "64", "--max-tokens", "128", "--tasks", "agreement")) == 0
    results = json.loads((output / "results.json").read_text())
    points = results["sweep"]["ard"]["points"]
    kls = {p["lr"]: p["kl"]["value"] for p in points if not p["failed"]}
    assert set(kls) == {1e-4, 1e-3} and "non-finite" in points[2]["failed"]
    best = min(kls, key=kls.get)
    assert results["sweep"]["ard"]["chosen"] == best == record(output, "ard")["config"]["lr"]
    assert not results["study"]["failed"]  # a diverging rate is a result of the sweep, not a failed run
    assert (output / "runs" / "ard" / "sweep" / "lr-0.0001" / "results.json").exists()
    report = (output / "report.md").read_text()
    assert "## Learning-rate sweep" in report and "| ard | 64 |" in report and "| failed |" in report
    assert results["study"]["lr_sweep"] == [1e-4, 1e-3, 3e-2]
    assert "at the learning rate of 0.0001, 0.001, 0.03 that its 64-token sweep run" in report


def test_the_report_says_when_the_best_rate_is_at_an_end_of_the_sweep():
    def family(chosen, *rates, failed=()):
        return {"chosen": chosen, "points": [{"lr": r, "failed": "diverged" if r in failed else None} for r in rates]}

    sweep = {"cpt": family(1e-3, 1e-3, 3e-3, 1e-2), "ard": family(1e-3, 3e-3, 1e-3),  # lowest, in any order
             "hidden": family(3e-3, 1e-3, 3e-3, 1e-2),  # inside: settled
             "logits": family(1e-2, 1e-3, 1e-2), "attention": family(1e-3, 1e-4, 1e-3, 1e-2, failed=(1e-2,)),
             "ard+cpt": family(None, 1e-3, 3e-3), "ard+logits": family(1e-3, 1e-3)}  # unfinished; one rate
    assert sweep_edges(sweep) == [
        "The best rate was the lowest the sweep tried for cpt and ard: a lower one may be better still; "
        "add it to `--lr-sweep` (the finished sweep runs count again).",
        "The best rate was the highest the sweep tried for logits: a higher one may be better still; "
        "add it to `--lr-sweep` (the finished sweep runs count again).",
    ]  # a higher rate that diverged bounds the sweep as much as one that ran
    assert sweep_edges({"hidden": sweep["hidden"]}) == []
    # cpt's full run agrees with native less than the untrained student: no lower rate is asked for
    assert sweep_edges(sweep, {"cpt": 0.157, "ard": 0.0276}, 0.0927) == [
        "The best rate was the lowest the sweep tried for ard: a lower one may be better still; "
        "add it to `--lr-sweep` (the finished sweep runs count again).",
        "The best rate was the highest the sweep tried for logits: a higher one may be better still; "
        "add it to `--lr-sweep` (the finished sweep runs count again).",
        "The best rate was the lowest the sweep tried for cpt, but there the full run agrees with the native "
        "model less than the untrained student (next-token KL 0.1570 against 0.0927) and every higher rate "
        "agreed less still: a lower rate only comes closer to not training; the objective, not the rate, "
        "limits the agreement.",
    ]


# -- arms as separate jobs, merged ---------------------------------------------------------------------------


def _job(workspace, finished_study, folder, arms, *extra):
    """A job folder holding some of the finished study's runs, finished there (no training, no evaluation)."""
    for arm in arms.split(","):
        shutil.copytree(finished_study / "runs" / arm, folder / "runs" / arm)
    assert main(study_args(workspace, folder, "--arms", arms, *extra)) == 0
    return folder


def test_merging_job_folders_gives_one_report_and_refuses_disagreeing_ones(
        workspace, finished_study, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("the merge redid a run")

    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    ref = _job(workspace, finished_study, tmp_path / "ref", "native,scaled")
    arms = _job(workspace, finished_study, tmp_path / "arms", "ard,cpt,logits", "--no-reference")
    assert not (arms / "runs" / "native").exists()  # the job left the reference to another
    # the reference job ran elsewhere, with other packages: the merged report names both sets
    native = record(ref, "native")
    elsewhere = {**native["evaluation"]["meta"]["versions"], "torch": "2.11.0+cu130", "cuda": "13.0"}
    native["evaluation"]["meta"]["versions"] = elsewhere
    (ref / "runs" / "native" / "results.json").write_text(json.dumps(native))
    merged = tmp_path / "all"
    assert main(["study", "--merge", str(ref), str(arms), "--output", str(merged)]) == 0
    results = json.loads((merged / "results.json").read_text())
    assert results["study"]["versions"] == [elsewhere, record(arms, "ard")["evaluation"]["meta"]["versions"]]
    assert [a["name"] for a in results["arms"]] == ["native", "scaled", "ard", "cpt", "logits"]
    original = json.loads((finished_study / "results.json").read_text())["evaluation"]
    for label in ("native", "ard", "cpt"):
        assert results["evaluation"]["models"][label]["tasks"] == original["models"][label]["tasks"]
        assert results["evaluation"]["recovery"][label] == original["recovery"][label]
    report = (merged / "report.md").read_text()
    assert "## ARD against each baseline" in report and "**ard vs cpt**:" in report and "--merge" in report
    assert {(v["ard"], v["baseline"]) for v in results["verdict"]} == {("ard", "scaled"), ("ard", "cpt"),
                                                                       ("ard", "logits")}

    # a folder whose study differs in a setting that decides the numbers: one line naming both
    other = tmp_path / "other"
    shutil.copytree(arms, other)
    meta = json.loads((other / "results.json").read_text())
    meta["study"]["restore_settings"]["lr"] = 0.002
    (other / "results.json").write_text(json.dumps(meta))
    assert main(["study", "--merge", str(ref), str(other), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"linearard study: error: cannot merge: lr differs: 0.001 in {ref}, 0.002 in {other}"]
    meta["study"]["restore_settings"]["lr"] = 0.001
    meta["study"]["eval_settings"]["samples"] = 3
    (other / "results.json").write_text(json.dumps(meta))
    assert main(["study", "--merge", str(ref), str(other), "--output", str(tmp_path / "bad")]) == 2
    assert "cannot merge: evaluation samples differs: 1 in" in capsys.readouterr().err
    # the same arm in two folders; a folder that is no study
    twin = tmp_path / "twin"
    shutil.copytree(arms, twin)
    assert main(["study", "--merge", str(arms), str(twin), "--output", str(tmp_path / "bad")]) == 2
    assert f"arm ard is in both {arms} and {twin}" in capsys.readouterr().err
    assert main(["study", "--merge", str(ref), str(tmp_path), "--output", str(tmp_path / "bad")]) == 2
    assert "is not a study folder" in capsys.readouterr().err
    # a merged report is no job folder: its runs are in the folders it was made from
    assert main(["study", "--merge", str(merged), str(twin), "--output", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"linearard study: error: {merged} holds a merged report; merge the folders it was made from instead "
        f"(linearard study --merge {ref} {arms} --output {merged})"]


def test_jobs_that_differ_only_in_evaluation_batch_sizes_merge(workspace, finished_study, tmp_path, monkeypatch,
                                                                capsys):
    from linearard.study.merge import check_agreement

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    ref = _job(workspace, finished_study, tmp_path / "ref", "native,scaled")
    arms = _job(workspace, finished_study, tmp_path / "arms", "ard,cpt", "--no-reference",
                "--eval-batch-size", "3", "--eval-set", "max_batch_tokens=512")
    metas = [json.loads((folder / "results.json").read_text())["study"] for folder in (ref, arms)]
    assert metas[0]["eval_settings"]["batch_size"] != metas[1]["eval_settings"]["batch_size"] == 3
    assert metas[0]["eval_settings"]["max_batch_tokens"] != metas[1]["eval_settings"]["max_batch_tokens"] == 512
    check_agreement([ref, arms], metas)
    merged = tmp_path / "all"
    assert main(["study", "--merge", str(ref), str(arms), "--output", str(merged)]) == 0
    results = json.loads((merged / "results.json").read_text())
    assert [a["name"] for a in results["arms"] if a["finished"]] == ["native", "scaled", "ard", "cpt"]
    original = json.loads((finished_study / "results.json").read_text())["evaluation"]["models"]
    for label in ("native", "ard", "cpt"):
        assert results["evaluation"]["models"][label]["tasks"] == original[label]["tasks"]
    capsys.readouterr()

    # a setting that decides the numbers still refuses the merge, in one line naming it
    limit = metas[0]["eval_settings"]["limit"]
    metas[1]["eval_settings"]["limit"] = 7
    with pytest.raises(UserError, match="cannot merge: evaluation limit differs"):
        check_agreement([ref, arms], metas)
    (arms / "results.json").write_text(json.dumps({**json.loads((arms / "results.json").read_text()),
                                                   "study": metas[1]}))
    assert main(["study", "--merge", str(ref), str(arms), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"linearard study: error: cannot merge: evaluation limit differs: {limit!r} in {ref}, 7 in {arms}"]


def test_the_report_names_the_device_the_runs_trained_on(workspace, study_copy, monkeypatch):
    # a study trained on a GPU, its report rewritten on a CPU: the report says where the runs trained
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(loop, "restore", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)
    for path in (study_copy / "runs").rglob("results.json"):
        data = json.loads(path.read_text())
        if "training" in data:
            data["training"]["device"] = "NVIDIA H200"
            path.write_text(json.dumps(data))
    assert main(study_args(workspace, study_copy)) == 0
    assert json.loads((study_copy / "results.json").read_text())["study"]["device"] == "NVIDIA H200"
    assert "Training device: NVIDIA H200;" in (study_copy / "report.md").read_text()


def test_a_merge_without_the_reference_evaluates_it_once(workspace, finished_study, tmp_path, monkeypatch):
    real_evaluate = evaluation.evaluate
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, *a, **kw: evaluated.append(list(models)) or real_evaluate(models, *a, **kw))
    arms = _job(workspace, finished_study, tmp_path / "arms", "ard", "--no-reference")
    hidden = _job(workspace, finished_study, tmp_path / "hidden", "hidden", "--no-reference")
    merged = tmp_path / "all"
    assert main(["study", "--merge", str(arms), str(hidden), "--output", str(merged)]) == 0
    assert evaluated == [["native"]]
    assert (merged / "runs" / "native" / "results.json").exists()
    results = json.loads((merged / "results.json").read_text())
    assert set(results["by_arm"]["models"]) == {"native", "ard", "hidden"}
    assert results["by_arm"]["recovery"]["native"]["mean"]["value"] == 1.0


def test_a_study_of_another_rope_takes_the_native_record_of_the_same_model(workspace, finished_study, tmp_path,
                                                                           monkeypatch):
    # the native model's evaluation does not depend on the student's RoPE: copied into the YaRN study's
    # folder, it counts there, and only the YaRN student is evaluated
    real_evaluate = evaluation.evaluate
    evaluated = []
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, *a, **kw: evaluated.append(list(models)) or real_evaluate(models, *a, **kw))
    yarn = tmp_path / "yarn"
    shutil.copytree(finished_study / "runs" / "native", yarn / "runs" / "native")
    assert main(study_args(workspace, yarn, "--rope-type", "yarn", "--arms", "native,scaled")) == 0
    assert evaluated == [["native", "scaled"], ["scaled"]]  # native only as the reference of agreement and chat
    results = json.loads((yarn / "results.json").read_text())
    assert results["evaluation"]["models"]["native"] == json.loads(
        (finished_study / "results.json").read_text())["evaluation"]["models"]["native"]
    assert results["study"]["rope"]["type"] == "yarn"


# -- several devices ----------------------------------------------------------------------------------------


def test_the_scheduler_keeps_each_device_to_one_run_and_sweeps_before_their_arms():
    import threading
    import time

    from linearard.study.parallel import Job, schedule

    events, lock = [], threading.Lock()

    def launch(job, device):
        with lock:
            events.append(("start", job.label, device, time.monotonic()))
        time.sleep(0.05)
        with lock:
            events.append(("end", job.label, device, time.monotonic()))
        if job.label == "cpt":
            raise RuntimeError("out of memory")
        return "exited with code 1" if job.label == "hidden" else None

    jobs = [Job("native"), Job("ard lr=0.001 (sweep)"), Job("ard lr=0.01 (sweep)"), Job("cpt"), Job("hidden"),
            Job("ard", after=("ard lr=0.001 (sweep)", "ard lr=0.01 (sweep)", "not a job"))]
    failures = schedule(jobs, ["0", "1"], launch)
    assert failures == {"cpt": "RuntimeError: out of memory", "hidden": "exited with code 1"}
    starts = {e[1]: e for e in events if e[0] == "start"}
    ends = {e[1]: e for e in events if e[0] == "end"}
    assert set(starts) == {j.label for j in jobs}
    assert starts["ard"][3] >= max(ends[s][3] for s in ("ard lr=0.001 (sweep)", "ard lr=0.01 (sweep)"))
    for device in ("0", "1"):  # one run at a time on each device, and both devices used
        spans = sorted((starts[j][3], ends[j][3]) for j in starts if starts[j][2] == device)
        assert spans and all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    running = max(sum(starts[j][3] <= t < ends[j][3] for j in starts) for t in (e[3] for e in events))
    assert running == 2
    assert [e[1] for e in sorted(events, key=lambda e: e[3]) if e[0] == "start"][:2] == ["native",
                                                                                       "ard lr=0.001 (sweep)"]


def test_the_scheduler_spreads_runs_over_gpus_before_sharing_one():
    import threading
    from collections import Counter

    from linearard.study.parallel import Job, schedule

    devices, lock = {}, threading.Lock()
    together = threading.Barrier(3, timeout=10)

    def launch(job, device):
        with lock:
            devices[job.label] = device
        together.wait()  # all three run at once: none can end before the others have started
        return None

    # three workers per GPU, three runs: two on one GPU and one on the other, whatever the thread order
    assert schedule([Job("a"), Job("b"), Job("c")], ["0", "0", "0", "1", "1", "1"], launch) == {}
    assert sorted(Counter(devices.values()).values()) == [1, 2]
    devices.clear()
    together = threading.Barrier(4, timeout=10)
    assert schedule([Job(x) for x in "abcd"], ["1", "0", "1", "0"], launch) == {}
    assert Counter(devices.values()) == {"0": 2, "1": 2}


def test_a_gpu_listed_twice_runs_two_workers_each_with_half_its_memory(tmp_path):
    import sys

    from linearard.study.command import _devices
    from linearard.study.parallel import Job, WorkerLauncher

    assert _devices("0,0,1") == ["0", "0", "1"]
    launch = WorkerLauncher("linearard study --output out", tmp_path, ["0", "0", "1", "cpu", "cpu"])
    launch.program = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]
    for device in ("0", "1", "cpu"):
        assert launch(Job(f"run-{device}"), device) is None
    logged = {d: (tmp_path / "logs" / f"run-{d}.log").read_text() for d in ("0", "1", "cpu")}
    assert "'--only', 'run-0', '--memory-fraction', '0.5'" in logged["0"]
    assert "--memory-fraction" not in logged["1"] and "--memory-fraction" not in logged["cpu"]


def test_an_interrupted_parent_stops_its_workers(tmp_path):
    import sys
    import threading
    import time

    from linearard.study.parallel import Job, WorkerLauncher, schedule

    launch = WorkerLauncher("linearard study --output out", tmp_path, ["0"])
    launch.program = [sys.executable, "-c", "import time; time.sleep(60)"]
    failures = {}
    thread = threading.Thread(target=lambda: failures.update(schedule([Job("a"), Job("b")], ["0"], launch)))
    started = time.monotonic()
    thread.start()
    while not launch.running and time.monotonic() - started < 30:
        time.sleep(0.05)
    launch.stop(grace=10)
    thread.join(timeout=20)
    assert not thread.is_alive() and time.monotonic() - started < 30
    assert "exited with code" in failures["a"] and failures["b"] == "not started: the study was interrupted"
    assert (tmp_path / "logs" / "a.log").exists()


@pytest.mark.slow  # two worker processes, each importing torch and transformers (a minute on a busy 2-core CI)
def test_two_cpu_workers_run_arms_in_parallel_into_one_report(workspace, finished_study, tmp_path):
    output = tmp_path / "parallel"
    shutil.copytree(finished_study / "runs" / "native", output / "runs" / "native")
    assert main(study_args(workspace, output, "--arms", "native,ard,cpt", "--devices", "cpu,cpu",
                           "--device", "cpu")) == 0
    logs = sorted(p.name for p in (output / "logs").iterdir())
    assert logs == ["ard.log", "cpt.log"]  # the reference was finished: two workers, one run each
    results = json.loads((output / "results.json").read_text())
    assert [a["name"] for a in results["arms"] if a["finished"]] == ["native", "ard", "cpt"]
    sequential = json.loads((finished_study / "results.json").read_text())["evaluation"]["models"]
    for arm in ("ard", "cpt"):  # a worker process trains exactly what the study in one process trained
        kl = results["evaluation"]["models"][arm]["tasks"]["agreement"]["metrics"]["kl"]["value"]
        assert kl == pytest.approx(sequential[arm]["tasks"]["agreement"]["metrics"]["kl"]["value"], rel=1e-4)


# -- cut off by a time limit ---------------------------------------------------------------------------------


def test_a_study_cut_off_mid_training_resumes_from_its_checkpoint(workspace, finished_study, tmp_path, monkeypatch):
    output = tmp_path / "cut"
    shutil.copytree(finished_study / "runs" / "native", output / "runs" / "native")
    real_write = loop.write_checkpoint
    writes = []

    def cut_after_the_first(*args, **kwargs):  # what a job's time limit does, between two steps
        real_write(*args, **kwargs)
        writes.append(args)
        if len(writes) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_checkpoint", cut_after_the_first)
    args = study_args(workspace, output, "--arms", "native,ard", "--set", "save_every=1")
    assert main(args) == 130
    assert (output / "runs" / "ard" / "seed-0" / "train" / "checkpoints").exists()
    assert not (output / "runs" / "ard" / "seed-0" / "results.json").exists()
    assert main(args) == 0
    rec = record(output, "ard")
    assert rec["training"]["resumed"] is True and rec["training"]["steps"] == 4
    # resumed mid-run, the arm ends exactly where the uninterrupted one did
    done = json.loads((output / "results.json").read_text())["evaluation"]["models"]["ard"]["tasks"]
    first = json.loads((finished_study / "results.json").read_text())["evaluation"]["models"]["ard"]["tasks"]
    assert done["agreement"]["metrics"]["kl"]["value"] == pytest.approx(
        first["agreement"]["metrics"]["kl"]["value"], rel=1e-5)


def forget_evaluation(output, arm):
    """Drop `arm`'s evaluation from its record, as if it had been stopped before its end; returns it."""
    rec = record(output, arm)
    evaluation = rec.pop("evaluation")
    (output / "runs" / arm / "seed-0" / "results.json").write_text(json.dumps(rec))
    return evaluation


def save_progress(output, arm, evaluation, tasks, fingerprint=None):
    """What an evaluation stopped after `tasks` leaves behind, taken from `evaluation` (a record's) with each
    result marked, so that a saved result tells itself apart from a recomputed one."""
    entry = evaluation["entry"]
    progress = {
        "fingerprint": fingerprint or evaluation["fingerprint"],
        "tasks": {t: {"result": {**entry["tasks"][t], "saved": True}, "seconds": 1.0} for t in tasks},
        "model": {k: v for k, v in entry.items() if k not in ("tasks", "seconds")},
        "meta": evaluation["meta"],
    }
    (output / "runs" / arm / "seed-0" / "evaluation-progress.json").write_text(json.dumps(progress))


def test_an_evaluation_cut_off_redoes_only_its_unfinished_tasks(workspace, finished_study, study_copy, monkeypatch,
                                                                capsys):
    from linearard.evaluation.suite import _Run

    real_task, real_evaluate = _Run.task, evaluation.evaluate
    scored, calls, cut = [], [], [True]

    def task(self, name, model, tokenizer):
        scored.append(name)
        if name == "passkey" and cut[0]:  # what a job's time limit does, during the last task
            raise KeyboardInterrupt
        return real_task(self, name, model, tokenizer)

    monkeypatch.setattr(_Run, "task", task)
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, tasks, **kw: calls.append((list(models), tasks)) or real_evaluate(
                            models, tasks, **kw))
    forget_evaluation(study_copy, "ard")
    progress = study_copy / "runs" / "ard" / "seed-0" / "evaluation-progress.json"
    assert main(study_args(workspace, study_copy)) == 130
    assert scored == ["agreement", "agreement", "ppl", "passkey"]  # native and ard, then ard alone
    assert list(json.loads(progress.read_text())["tasks"]) == ["agreement", "ppl"]

    scored.clear()
    calls.clear()
    cut[0] = False
    assert main(study_args(workspace, study_copy)) == 0
    assert "[ard] evaluation resumes: 2 of 3 tasks already done" in capsys.readouterr().out
    assert (scored, calls) == (["passkey"], [(["ard"], ["passkey"])])  # the reference is not even loaded
    assert not progress.exists()
    resumed, whole = record(study_copy, "ard")["evaluation"], record(finished_study, "ard")["evaluation"]
    assert list(resumed) == list(whole) and resumed["fingerprint"] == whole["fingerprint"]
    assert list(resumed["entry"]) == list(whole["entry"]) and set(resumed["meta"]) == set(whole["meta"])
    assert list(resumed["entry"]["tasks"]) == list(resumed["entry"]["seconds"]) == ["ppl", "agreement", "passkey"]
    assert resumed["entry"]["tasks"] == whole["entry"]["tasks"]
    for key in ("spec", "supported_length", "parameters"):
        assert resumed["entry"][key] == whole["entry"][key]


def test_saved_tasks_count_only_under_the_same_evaluation_settings(workspace, study_copy, monkeypatch):
    real_evaluate = evaluation.evaluate
    calls = []
    monkeypatch.setattr(evaluation, "evaluate",
                        lambda models, tasks, **kw: calls.append((list(models), tasks)) or real_evaluate(
                            models, tasks, **kw))
    whole = forget_evaluation(study_copy, "ard")
    fingerprint = whole["fingerprint"]
    save_progress(study_copy, "ard", whole, ["ppl", "agreement", "passkey"],
                  {**fingerprint, "settings": {**fingerprint["settings"], "samples": 2}})
    assert main(study_args(workspace, study_copy)) == 0
    assert calls == [(["native", "ard"], ["agreement"]), (["ard"], ["ppl", "passkey"])]
    assert record(study_copy, "ard")["evaluation"]["entry"]["tasks"] == whole["entry"]["tasks"]

    # other batch sizes set how fast, not what: those saved tasks count
    calls.clear()
    forget_evaluation(study_copy, "ard")
    save_progress(study_copy, "ard", whole, ["agreement"],
                  {**fingerprint, "settings": {**fingerprint["settings"], "batch_size": 3}})
    assert main(study_args(workspace, study_copy)) == 0
    assert calls == [(["ard"], ["ppl", "passkey"])]
    tasks = record(study_copy, "ard")["evaluation"]["entry"]["tasks"]
    assert [t for t, r in tasks.items() if r.get("saved")] == ["agreement"]


def test_a_run_that_trains_again_drops_its_saved_tasks(workspace, study_copy, monkeypatch):
    folder = study_copy / "runs" / "ard" / "seed-0"
    real_restore = loop.restore
    trained = []

    def restore(config, **kwargs):
        assert not (folder / "evaluation-progress.json").exists()  # gone before the new weights come
        trained.append(config)
        return real_restore(config, **kwargs)

    monkeypatch.setattr(loop, "restore", restore)
    whole = forget_evaluation(study_copy, "ard")
    save_progress(study_copy, "ard", whole, ["ppl", "agreement", "passkey"])
    shutil.rmtree(folder / "train" / "model")  # no export: the run resumes from its last checkpoint
    assert main(study_args(workspace, study_copy)) == 0
    assert [c.resume for c in trained] == [True]
    tasks = record(study_copy, "ard")["evaluation"]["entry"]["tasks"]
    assert list(tasks) == ["ppl", "agreement", "passkey"] and not any(r.get("saved") for r in tasks.values())


# -- the end-of-run agreement of `linearard restore` ---------------------------------------------------------


def test_restore_reports_agreement_with_the_teacher(workspace, tmp_path):
    from linearard.config import build_config
    from linearard.training.loop import _perplexity_report, restore

    config = build_config(flags=dict(
        model=str(workspace / "tiny"), data=[str(workspace / "corpus")], seq_len=32, max_tokens=128, lora_rank=4,
        warmup_steps=1, lr=1e-2, rope_type="linear", rope_factor=4.0, output=str(tmp_path / "run"), save_every=0,
        export=False, eval=True, eval_tokens=128))
    printed = []
    result = restore(config, log=printed.append)
    assert set(result.agreement) == {"scaled student", "restored student"}
    scaled, restored = result.agreement["scaled student"], result.agreement["restored student"]
    assert scaled["kl"] > 0 and 0 <= scaled["top1"] <= 1 and restored != scaled
    summary = next(p for p in printed if p.startswith("held-out perplexity and agreement with the teacher"))
    assert "KL to teacher" in summary and "of the agreement with the teacher lost to the RoPE scaling" in summary

    # a student that beats its teacher's perplexity is called out, and agreement says how restored it is
    text = _perplexity_report({"teacher": 20.0, "scaled student": 40.0, "restored student": 15.0}, "linear x4", 256,
                              4096, {"scaled student": {"kl": 1.0, "top1": 0.4},
                                     "restored student": {"kl": 0.6, "top1": 0.6}})
    assert "restored 40% of the agreement" in text and "restored 142% of the log-perplexity" in text
    assert "below the teacher's perplexity" in text
