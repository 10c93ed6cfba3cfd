"""Long-context tasks on tiny models: prompt construction, scoring, and lengths beyond support."""

import random
from collections import Counter

import pytest
import torch
from transformers import LlamaConfig

from linearard.evaluation.haystack import Haystack, fill_to_length, match_fraction, place, words
from linearard.evaluation.passkey import passkey
from linearard.evaluation.perplexity import long_perplexity
from linearard.evaluation.ruler import _BUILDERS, ruler
from linearard.evaluation.scoring import encode, encode_many, prefix_token, token_nlls
from linearard.evaluation.tasks import RULER_TASKS
from tiny import byte_tokenizer, tiny_model

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A river runs through the valley, and the hills are quiet in the evening light. ") * 40


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", max_position_embeddings=1024)


def test_place_and_fill_to_length():
    filler = list(range(100, 200))
    out = place(filler, [(0.5, [1, 2]), (0.0, [3]), (1.0, [4])])
    assert out[0] == 3 and out[-1] == 4 and out[51:53] == [1, 2] and len(out) == 104
    hay = Haystack(byte_tokenizer(), FILLER)
    ids = fill_to_length(hay, random.Random(0), [7, 7], [(0.25, [1, 2, 3])], [9], 300)
    assert len(ids) == 300 and ids[:2] == [7, 7] and ids[-1] == 9
    start = ids.index(1)
    assert ids[start:start + 3] == [1, 2, 3] and abs(start - 2 - 0.25 * 294) <= 1


def test_haystack_spans_wrap_around():
    hay = Haystack(byte_tokenizer(), FILLER)
    span = hay.span(random.Random(1), 3 * len(hay.ids))
    assert len(span) == 3 * len(hay.ids)


def test_match_fraction_and_words():
    assert match_fraction("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert match_fraction("ABC", ["abc"]) == 1.0
    ws = words(random.Random(0), 500)
    assert len(set(ws)) == 500 and all(w.isalpha() for w in ws)


def test_passkey_grid_and_unsupported_length(model):
    tok = byte_tokenizer()
    res = passkey(model, tok, lengths=[400, 2048], depths=(0.0, 1.0), samples=2, seed=0)
    acc = res["metrics"]["acc@400"]
    assert 0.0 <= acc["value"] <= 1.0 and acc["n"] == 4
    assert res["metrics"]["acc@2048"]["note"] == "n/a (> supported length 1024)"
    assert set(res["details"]["grid"]["400"]) == {"0.0", "1.0"}
    too_short = passkey(model, tok, lengths=[100], samples=1)
    assert too_short["metrics"]["acc@100"]["note"] == "n/a (too short for the prompt)"


class _Output(dict):
    """The two things `scoring.forward` reads from a transformers output."""

    @property
    def logits(self):
        return self["logits"]


class CopyingModel(torch.nn.Module):
    """A perfect induction head on bytes: predicts the byte that followed the latest earlier
    occurrence of the last 6 bytes. It finds any needle that the question quotes, so a task whose
    prompts and scoring are right gives it a score of 1. It keeps each row's tokens on the cache it is
    given, as a model keeps its keys and values there."""

    config = LlamaConfig(max_position_embeddings=4096, num_hidden_layers=1)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, use_cache=False,
                logits_to_keep=0):
        width = input_ids.shape[1]
        old = getattr(cache, "rows", None)
        if old is None:  # the prompts, left-padded: the mask covers them
            new = [[t for t, m in zip(row.tolist(), mask.tolist()) if m]
                   for row, mask in zip(input_ids, attention_mask)]
        else:  # fed tokens are all real
            new = input_ids.tolist()
        seqs = new if old is None else [o + n for o, n in zip(old, new)]
        if cache is not None:
            cache.rows = seqs
        logits = torch.full((len(seqs), width, 260), -10.0)
        for r, seq in enumerate(seqs):
            for j in range(width):
                logits[r, j, self._next(seq[:len(seq) - width + j + 1])] = 10.0
        return _Output(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits, cache=cache)

    @staticmethod
    def _next(seq):
        for start in range(len(seq) - 7, -1, -1):
            if seq[start:start + 6] == seq[-6:]:
                return seq[start + 6]
        return 32


def test_a_copying_model_finds_every_passkey_and_needle():
    tok = byte_tokenizer()
    res = passkey(CopyingModel(), tok, lengths=[500, 900], depths=(0.0, 0.5, 1.0), samples=1, seed=3)
    assert res["metrics"]["acc@500"]["value"] == res["metrics"]["acc@900"]["value"] == 1.0
    res = ruler(CopyingModel(), tok, "niah_single", FILLER, lengths=[700], samples=2)
    assert res["metrics"]["score@700"]["value"] == 1.0


@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_prompts_hold_their_answers(task):
    tok = byte_tokenizer()
    hay = Haystack(tok, FILLER)
    builder = _BUILDERS[task]
    prompt = builder.build(random.Random(0), tok, hay, 900)
    assert 0.8 * 900 <= len(prompt.ids) <= 900
    text = tok.decode(prompt.ids)
    assert prompt.references and all(ref in text for ref in prompt.references)
    if task == "cwe":
        listed = Counter(w for w in text.split("\n\n")[1].split() if w.isalpha())
        top = [w for w, _ in listed.most_common(10)]
        assert set(top) == set(prompt.references)
    if task == "fwe":
        body = text.split("\n\n")[1].split()
        assert [w for w, _ in Counter(body).most_common(3)] == prompt.references


def test_pieces_encoded_in_one_call_are_those_encoded_one_by_one():
    tok = byte_tokenizer(merges=((" ", "1"), (".", " "), ("k", "a"), (" ", "ka")))
    texts = [f" {i}. {w}" for i, w in enumerate(words(random.Random(0), 30) * 3, 1)] + [" ka", " ka", ""]
    assert encode_many(tok, texts) == [encode(tok, t) for t in texts]
    assert encode_many(tok, []) == []


@pytest.mark.parametrize("task", ["cwe", "fwe"])
def test_word_list_prompts_are_the_pieces_one_by_one(task, monkeypatch):
    # the word lists are encoded in one batched call; the prompt is the same as piece by piece
    import importlib

    ruler_module = importlib.import_module("linearard.evaluation.ruler")  # the package exports a function of that name

    tok = byte_tokenizer(merges=((" ", "1"), (".", " "), ("k", "a")))
    hay = Haystack(tok, FILLER)
    fast = _BUILDERS[task].build(random.Random(5), tok, hay, 3000)
    monkeypatch.setattr(ruler_module, "encode_many", lambda t, texts: [encode(t, x) for x in texts])
    assert _BUILDERS[task].build(random.Random(5), tok, hay, 3000) == fast


def test_ruler_takes_a_haystack_built_once(model):
    tok = byte_tokenizer()
    built = ruler(model, tok, "niah_single", Haystack(tok, FILLER), lengths=[600], samples=2, seed=0)
    assert built == ruler(model, tok, "niah_single", FILLER, lengths=[600], samples=2, seed=0)


def test_ruler_task_scores_and_lengths(model):
    tok = byte_tokenizer()
    res = ruler(model, tok, "niah_single", FILLER, lengths=[600, 4096], samples=2, seed=0)
    cell = res["metrics"]["score@600"]
    assert 0.0 <= cell["value"] <= 1.0 and cell["n"] == 2
    assert res["metrics"]["score@4096"]["note"] == "n/a (> supported length 1024)"
    again = ruler(model, tok, "niah_single", FILLER, lengths=[600], samples=2, seed=0)
    assert again["details"]["example"] == res["details"]["example"]  # same seed, same prompts
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler(model, tok, "nope", FILLER, lengths=[600])


def test_long_perplexity_scores_the_same_tail(model):
    tok = byte_tokenizer()
    res = long_perplexity(model, tok, {"f": FILLER}, lengths=[256, 2048], target=64, samples=2)
    m = res["metrics"]
    assert list(m) == ["ppl@64", "ppl@256", "ppl@2048"]
    assert res["details"]["context"] == {"ppl@64": 0, "ppl@256": 192, "ppl@2048": 1984}
    assert m["ppl@2048"]["note"] == "n/a (> supported length 1024)"
    ids = encode(tok, FILLER)
    ends = [len(ids), len(ids) - 64]
    nll = torch.cat(token_nlls(model, [ids[e - 256:e] for e in ends], last=64))
    assert m["ppl@256"]["value"] == pytest.approx(float(nll.mean().exp()), rel=1e-5)
    alone = torch.cat(token_nlls(model, [[prefix_token(tok), *ids[e - 64:e]] for e in ends]))
    assert m["ppl@64"]["value"] == pytest.approx(float(alone.mean().exp()), rel=1e-5)
    assert m["ppl@256"]["n"] == m["ppl@64"]["n"] == 128
