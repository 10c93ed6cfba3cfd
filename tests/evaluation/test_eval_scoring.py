"""Batched log-likelihood scoring and KV-cached greedy decoding against plain one-sequence forwards."""

import random

import pytest
import torch

from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.scoring import (
    Request,
    encode,
    encode_pairs,
    loglikelihoods,
    pad_batch,
    prefix_token,
    token_nlls,
)
from tiny import FAMILIES, VOCAB, byte_tokenizer, tiny_model


def naive_logprobs(model, context, continuation):
    """Per-token log-probabilities of `continuation` after `context`, one unpadded forward."""
    ids = torch.tensor([list(context) + list(continuation)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
    tgt = torch.tensor(list(continuation))
    return logp[pos].gather(-1, tgt[:, None]).squeeze(-1), bool((logp[pos].argmax(-1) == tgt).all())


def random_requests(rng, n_groups=6):
    requests, groups = [], []
    for g in range(n_groups):
        ctx = [rng.randrange(256) for _ in range(rng.randrange(1, 25))]
        for _ in range(rng.choice([1, 2, 4])):
            if g % 2:  # Winogrande-like: contexts differ in their last tokens
                keep = rng.randrange(1, len(ctx) + 1)
                context = ctx[:keep] + [rng.randrange(256) for _ in range(rng.randrange(0, 4))]
            else:
                context = ctx
            cont = [rng.randrange(256) for _ in range(rng.randrange(1, 6))]
            requests.append(Request(context, cont))
            groups.append(g)
    return requests, groups


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_loglikelihoods_match_unbatched_forward(family):
    model = tiny_model(family)
    requests, groups = random_requests(random.Random(1))
    scores = loglikelihoods(model, requests, groups=groups, batch_size=5)
    for req, score in zip(requests, scores):
        lp, greedy = naive_logprobs(model, req.context, req.continuation)
        assert score.logprob == pytest.approx(float(lp.sum()), abs=1e-4)
        assert score.is_greedy == greedy
        assert score.n_tokens == len(req.continuation)


def benchmark_like_requests(rng, n_items=16):
    """Items of every shape a batch meets: one-token answers after a shared question (no suffix row),
    longer answers (a suffix row each, four of them: more than a small batch holds), contexts that
    differ in their last tokens, and lone requests."""
    requests, groups = [], []

    def tokens(lo, hi):
        return [rng.randrange(256) for _ in range(rng.randrange(lo, hi))]

    for k in range(n_items):
        question = tokens(2, 30)
        if k % 4 == 0:  # MMLU
            pairs = [(question, tokens(1, 2)) for _ in range(4)]
        elif k % 4 == 1:  # HellaSwag
            pairs = [(question, tokens(1, 8)) for _ in range(4)]
        elif k % 4 == 2:  # Winogrande
            rest = tokens(1, 6)
            pairs = [(question + tokens(1, 3), rest) for _ in range(2)]
        else:
            pairs = [(question, tokens(1, 6))]
        requests.extend(Request(c, t) for c, t in pairs)
        groups.extend([k] * len(pairs))
    return requests, groups


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_scores_do_not_depend_on_the_batch_size(family, monkeypatch):
    model = tiny_model(family)
    requests, groups = benchmark_like_requests(random.Random(5))
    whole = loglikelihoods(model, requests, groups=groups, batch_size=1000)
    # again with 3 rows a forward, the log-softmax taken over 3 positions at a time
    monkeypatch.setattr("linearard.evaluation.scoring._PICK_ELEMENTS_CPU", 3 * VOCAB)
    small = loglikelihoods(model, requests, groups=groups, batch_size=3)
    for a, b in zip(small, whole):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert (a.is_greedy, a.n_tokens) == (b.is_greedy, b.n_tokens)


def test_batch_size_caps_the_rows_of_each_forward():
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    rng = random.Random(6)
    # 12 items of 4 one-token answers need no suffix forward: 4 items fill a batch of 4 rows
    questions = [[rng.randrange(256) for _ in range(9)] for _ in range(12)]
    one_token = [Request(q, [a]) for q in questions for a in range(4)]
    loglikelihoods(model, one_token, groups=[i // 4 for i in range(48)], batch_size=4)
    assert len(forwards) == 3
    # with 2-token answers each item has 4 suffix rows: one item, two forwards, per batch of 4
    forwards.clear()
    two_tokens = [Request(r.context, [*r.continuation, 7]) for r in one_token]
    loglikelihoods(model, two_tokens, groups=[i // 4 for i in range(48)], batch_size=4)
    assert len(forwards) == 24


def test_group_without_a_common_prefix():
    """Winogrande items with the blank first: the choices' contexts share no token."""
    model = tiny_model("llama")
    requests = [Request([10, 11, 12], [40, 41]), Request([20, 11, 12], [40, 41]), Request([30], [40])]
    scores = loglikelihoods(model, requests, groups=[0, 0, 0])
    for req, score in zip(requests, scores):
        lp, _ = naive_logprobs(model, req.context, req.continuation)
        assert score.logprob == pytest.approx(float(lp.sum()), abs=1e-4)


def test_greedy_flag_true_for_the_argmax_continuation():
    model = tiny_model("llama")
    context = [5, 17, 99, 3]
    [cont] = greedy_generate(model, [context], max_new_tokens=3)
    wrong = [(cont[0] + 1) % 256, *cont[1:]]
    right_score, wrong_score = loglikelihoods(model, [Request(context, cont), Request(context, wrong)])
    assert right_score.is_greedy and not wrong_score.is_greedy
    assert right_score.logprob > wrong_score.logprob


def test_long_context_is_truncated_from_the_left():
    model = tiny_model("llama")
    rng = random.Random(0)
    context = [rng.randrange(256) for _ in range(40)]
    cont = [rng.randrange(256) for _ in range(3)]
    [score] = loglikelihoods(model, [Request(context, cont)], max_length=20)
    lp, _ = naive_logprobs(model, context[-(21 - len(cont)):], cont)
    assert score.logprob == pytest.approx(float(lp.sum()), abs=1e-4)


def test_pad_batch_pads_right_or_left():
    ids, mask = pad_batch([[5, 6, 7], (8,), []])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_batch([[5, 6, 7], (8,), []], left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_token_nlls_whole_windows_and_last_tokens():
    model = tiny_model("qwen2")
    rng = random.Random(2)
    windows = [[rng.randrange(256) for _ in range(n)] for n in (12, 30, 30, 5)]
    full = token_nlls(model, windows, batch_size=3)
    tail = token_nlls(model, windows, last=4, batch_size=3)
    for w, f, t in zip(windows, full, tail):
        lp, _ = naive_logprobs(model, w[:1], w[1:])
        torch.testing.assert_close(f, -lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(t, f[-4:], atol=1e-5, rtol=0)


def test_encode_pairs_follows_the_harness_split():
    tok = byte_tokenizer()
    [(ctx, cont), (empty, after_empty), (blank, after_blank)] = encode_pairs(
        tok, [("Question: why? ", "Answer"), ("", "hello"), ("  ", "hello")])
    assert ctx == encode(tok, "Question: why?")
    assert cont == encode(tok, " Answer")  # the trailing space moved to the continuation
    assert empty == [prefix_token(tok)] and after_empty == encode(tok, "hello")
    assert blank == [prefix_token(tok)] and after_blank == encode(tok, "  hello")
    assert encode_pairs(tok, []) == []


def harness_split(tok, context, continuation):
    """One pair split as lm-evaluation-harness splits it: the context and the whole text each encoded
    with the tokenizer's own special tokens, the continuation being what follows the context."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [prefix_token(tok)], tok(continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(stripped)["input_ids"]
    return ctx, tok(stripped + continuation)["input_ids"][len(ctx):]


class CountingTokenizer:
    """A tokenizer that records the text (or list of texts) of every call."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __call__(self, text, **kwargs):
        self.calls.append(text)
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


SPLIT_CASES = [
    ("Question: why?", " Answer"), ("Question: why?", " Because"), ("Question: why?", "?"),  # one item
    ("Question: why? ", "Answer"), ("Question: why?\n\n", "Answer"),  # trailing spaces move over
    ("", "hello"), ("  ", "hello"), ("", "hello"), ("", " "),  # empty contexts
    ("The cup fell so Tom", " picked it up."), ("The cup fell so Ann", " picked it up."),  # Winogrande
    ("Question: why?", " Answer"),  # a pair seen before
]


@pytest.mark.parametrize("bos", [False, True])
def test_encode_pairs_equals_the_harness_split_of_each_pair(bos):
    # "? " and "? A" merge, so the continuation " Answer" loses tokens to the context's last one, as
    # in the harness: the continuation is whatever follows the context's tokens in the whole text.
    tok = byte_tokenizer(bos=bos, merges=(("?", " "), ("? ", "A")))
    assert (tok("a")["input_ids"][0] == tok.bos_token_id) == bos
    counting = CountingTokenizer(tok)
    got = encode_pairs(counting, SPLIT_CASES)
    assert got == [harness_split(tok, *pair) for pair in SPLIT_CASES]
    assert got[0][1] != encode(tok, " Answer")  # the merge across the boundary happened
    assert (got[0][0][0] == tok.bos_token_id) == bos
    # one batch call, each distinct text once, and at most one more call (whether BOS comes first)
    [texts] = [c for c in counting.calls if isinstance(c, list)]
    assert len(texts) == len(set(texts)) and texts.count("Question: why?") == 1
    assert len(counting.calls) <= 2


def uncached_greedy(model, prompt, n):
    """``n`` greedy tokens after ``prompt``, each from a full forward of the sequence so far."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_generation_equals_uncached_decoding(family):
    model = tiny_model(family)
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    batched = greedy_generate(model, prompts, max_new_tokens=5, batch_size=4)
    assert batched == [uncached_greedy(model, prompt, 5) for prompt in prompts]


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_greedy_generation_runs_past_the_sliding_window(family):
    model = tiny_model(family)  # windows of 32 (gemma) and 64 (mistral) tokens
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (30, 60, 71)]
    batched = greedy_generate(model, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [uncached_greedy(model, prompt, 8) for prompt in prompts]


def test_generation_stops_at_stop_tokens_and_stop_fn():
    model = tiny_model("llama")
    prompt = [1, 2, 3, 4]
    [free] = greedy_generate(model, [prompt], max_new_tokens=6)
    [stopped] = greedy_generate(model, [prompt], max_new_tokens=6, stop_ids=[free[2]])
    assert stopped == free[:free.index(free[2])]
    [cut] = greedy_generate(model, [prompt], max_new_tokens=6, stop_fn=lambda toks: len(toks) == 2)
    assert cut == free[:2]


@pytest.mark.parametrize("setting", ["llama", "qwen3", "phi3", "gemma2", "mistral",
                                     "llama@linear", "llama@yarn", "llama@llama3", "llama@dynamic", "llama@longrope"])
def test_a_step_judged_replayable_traces_in_one_piece(setting):
    """On CUDA a decoding step is captured once and replayed, so it must not decide anything in Python on
    the data. A whole-graph trace (dynamo) finds such decisions on the CPU: every step judged replayable
    traces in one piece and decodes as the eager step does. Sliding-window caches (a Python count of the
    tokens seen) and dynamic NTK and LongRoPE (a check of the longest position each step) are not."""
    from transformers import AutoModelForCausalLM

    from linearard.evaluation.generation import _Decoder, replayable
    from linearard.models.rope import RopeScaling, scaled_config

    family, _, rope = setting.partition("@")
    model = tiny_model(family)
    if rope:
        base = model
        model = AutoModelForCausalLM.from_config(scaled_config(base.config, RopeScaling(rope, 4.0, 256, 1024)))
        model.load_state_dict(base.state_dict())
        model.eval()
    ids, mask = pad_batch([[5, 6, 7, 8, 9], [3, 4]], left=True)
    with torch.no_grad():
        traced, eager = _Decoder(model, ids, mask, 6), _Decoder(model, ids, mask, 6)
        assert replayable(model, traced.cache) == (family not in ("gemma2", "mistral")
                                                   and rope not in ("dynamic", "longrope"))
        torch._dynamo.reset()
        step = torch.compile(traced._step, backend="eager", fullgraph=True, dynamic=False)
        if rope == "dynamic":  # the frequencies are chosen in Python from the longest position
            with pytest.raises(Exception, match="(?i)data-dependent"):
                step()
        if not replayable(model, traced.cache):
            return
        for _ in range(4):
            step()
            eager._step()
            assert torch.equal(traced.token, eager.token)
