"""The lm-evaluation-harness adapter's three methods against our own scoring and decoding."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from linearard.errors import UserError
from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.harness import HarnessModel, lm_eval_model
from linearard.evaluation.scoring import encode, encode_pairs, prefix_token
from tiny import byte_tokenizer, tiny_model

# A small local request set, in the harness's shapes.
LOGLIKELIHOOD = [("Question: What is 2 + 2?\nAnswer:", " 4"), ("Question: What is 2 + 2?\nAnswer:", " 5"),
                 ("The sky is", " blue"), ("", "Hello there"), ("Trailing space ", "moves")]
ROLLING = ["A short text.", "A longer text that will not fit in one window of the tiny model at all."]


def req(*args):
    return SimpleNamespace(args=args)


def logprob(model, ids, start):
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one plain forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


@pytest.fixture(scope="module")
def pair():
    return tiny_model("llama", seed=4), byte_tokenizer()


def test_loglikelihood_matches_a_plain_forward(pair):
    model, tok = pair
    hm = HarnessModel(model, tok, batch_size=3)
    out = hm.loglikelihood([req(c, t) for c, t in LOGLIKELIHOOD])
    assert len(out) == len(LOGLIKELIHOOD)
    for (context, continuation), (lp, greedy) in zip(LOGLIKELIHOOD, out):
        [(ctx, cont)] = encode_pairs(tok, [(context, continuation)])
        assert lp == pytest.approx(logprob(model, ctx + cont, len(ctx)), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_predicts_every_token_once(pair):
    model, tok = pair
    short, long = ROLLING
    whole = HarnessModel(model, tok).loglikelihood_rolling([req(short), req(long)])
    for text, got in zip(ROLLING, whole):
        ids = [prefix_token(tok), *encode(tok, text)]
        assert got == pytest.approx(logprob(model, ids, 1), abs=1e-4)
    # With a 16-token window, each chunk of 16 tokens is predicted with the 16 tokens before it.
    [chunked] = HarnessModel(model, tok, max_length=16).loglikelihood_rolling([req(long)])
    ids = [prefix_token(tok), *encode(tok, long)]
    expected = 0.0
    for lo in range(1, len(ids), 16):
        hi = min(len(ids), lo + 16)
        window = ids[max(0, hi - 17):hi]
        expected += logprob(model, window, len(window) - (hi - lo))
    assert chunked == pytest.approx(expected, abs=1e-4)
    assert chunked != pytest.approx(whole[1], abs=1e-3)  # the window matters


def test_generate_until_decodes_greedily_and_cuts_at_stop_strings(pair):
    model, tok = pair
    hm = HarnessModel(model, tok)
    context = "Once upon a time"
    [free] = greedy_generate(model, [encode(tok, context)], max_new_tokens=12)
    text = tok.decode(free)
    [same] = hm.generate_until([req(context, {"until": [], "max_gen_toks": 12})])
    assert same == text
    stop = text[3:5]
    cut, again = hm.generate_until([req(context, {"until": [stop], "max_gen_toks": 12}),
                                    req("Other context", {"until": [stop], "max_gen_toks": 12})])
    assert cut == text.split(stop)[0]
    assert stop not in again
    with pytest.raises(ValueError, match="greedily"):
        hm.generate_until([req(context, {"do_sample": True})])


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm_eval is installed")
def test_missing_lm_eval_says_how_to_install(pair):
    with pytest.raises(UserError, match=r"pip install 'lm_eval>=0.4'"):
        lm_eval_model(*pair)


LOCAL_TASK = """\
task: linearard_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm_eval (optional extra)")
def test_local_harness_task_end_to_end(pair, tmp_path, monkeypatch):
    """A local multiple-choice task through lm_eval.simple_evaluate and our adapter scores as our own
    multiple-choice scoring does."""
    import json

    from linearard.evaluation.benchmark_data import Item
    from linearard.evaluation.multiple_choice import multiple_choice
    from linearard.evaluation.settings import EvalSettings
    from linearard.evaluation.suite import evaluate

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": f"What comes after {i}?", "choices": [str(i + 1), str(i + 7), "blue", "a cat"],
             "gold": i % 4} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(LOCAL_TASK.format(data=data))
    model, tok = pair
    settings = EvalSettings.for_device("cpu", lm_eval_include=str(tmp_path), limit=None)
    res = evaluate({"m": (model, tok)}, "lm_eval:linearard_local_mc", settings=settings,
                   log=lambda m: None)["models"]["m"]["tasks"]["lm_eval:linearard_local_mc"]
    items = [Item((f"Question: {d['question']}\nAnswer:",) * 4, tuple(" " + c for c in d["choices"]),
                  tuple(d["choices"]), d["gold"]) for d in docs]
    ours = multiple_choice(model, tok, "arc_easy", items=items)["metrics"]
    assert res["metrics"]["acc"]["value"] == pytest.approx(ours["acc"]["value"])
    assert res["metrics"]["acc_norm"]["value"] == pytest.approx(ours["acc_norm"]["value"])
    assert res["metrics"]["acc"]["stderr"] == pytest.approx(ours["acc"]["stderr"])
