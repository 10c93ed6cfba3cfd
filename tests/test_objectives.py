"""Training objectives on tiny random models: definitions against materialised references, training
signal, gradient routing, gradient checkpointing and weighted combinations."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F

from linearard.errors import UserError
from linearard.models.adapters import DEFAULT_TARGETS, add_adapters
from linearard.models.compat import enable_activation_checkpointing
from linearard.models.rope import RopeScaling
from linearard.models.teacher_student import TeacherStudent
from linearard.objectives import (
    OBJECTIVES,
    AttentionDistillation,
    HiddenDistillation,
    LogitDistillation,
    NextToken,
    RelationDistillation,
    build_objective,
    select_layers,
)
from tiny import FAMILIES, tiny_model

LENGTH = 24


def make_pair(family: str = "llama", factor: float = 4.0, targets=DEFAULT_TARGETS, checkpointing=False,
              recompute_teacher=False, **overrides):
    """A LoRA student on a tiny model and its TeacherStudent (linear PI by `factor`; 1 = no scaling).
    With `checkpointing` the layers checkpoint (in training mode) before the pair is made."""
    model = add_adapters(tiny_model(family, **overrides), "lora", rank=8, alpha=16, targets=targets)
    if checkpointing:
        enable_activation_checkpointing(model)
        model.train()
    native = model.config.max_position_embeddings
    # factor 1 bypasses RopeScaling.resolve (which rejects it for users) to make student == teacher.
    scaling = RopeScaling("linear", factor, native, int(native * factor))
    return model, TeacherStudent(model, scaling, recompute_teacher=recompute_teacher)


def make_batch(seed: int = 0, batch: int = 2, length: int = LENGTH, pad: str = "left"):
    """Random tokens; the second row has 5 padding positions (left or right)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        if pad == "left":
            mask[1, :5] = 0
        else:
            mask[1, -5:] = 0
        ids[1][mask[1] == 0] = 258
    return {"input_ids": ids, "attention_mask": mask}


def randomise_lora_b(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- materialised references -------------------------------------------------------------------------


def naive_kl(q_s, k_s, q_t, k_t, mask, scale_s, scale_t):
    """Σ over real rows and heads of KL(P_t ‖ P_s) of causal softmax(q kᵀ · scale), in float64 with
    full T×T matrices, divided by (real rows × query heads)."""

    def log_probs(q, k, scale):
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q.double() @ k.double().transpose(-1, -2)) * scale
        t = q.shape[2]
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
        return torch.log_softmax(logits.masked_fill(~allowed, -1e30), dim=-1), allowed

    logp_s, allowed = log_probs(q_s, k_s, scale_s)
    logp_t, _ = log_probs(q_t, k_t, scale_t)
    per_row = torch.where(allowed, logp_t.exp() * (logp_t - logp_s), 0.0).sum(-1)  # [B, H, T]
    rows = mask.bool()[:, None, :].expand_as(per_row)
    return per_row[rows].sum() / (mask.bool().sum() * q_s.shape[1])


def capture_all(ts, batch, role):
    """{layer: AttentionInputs} of one forward in the given role."""
    seen = {}
    with torch.no_grad(), getattr(ts, role)(), ts.capture(lambda i, a: seen.__setitem__(i, a)):
        ts.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return seen


# --- definitions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ard_is_zero_when_student_equals_teacher_and_positive_under_pi(family):
    batch = make_batch()
    _, same = make_pair(family, factor=1.0)
    loss, metrics = RelationDistillation()(same, batch)
    assert abs(loss.item()) <= 1e-6
    assert all(abs(v) <= 1e-6 for v in metrics.values())
    _, scaled = make_pair(family, factor=4.0)
    loss, metrics = RelationDistillation()(scaled, batch)
    assert loss.item() > 1e-4
    assert metrics["qq"] > 1e-4 and metrics["kk"] > 1e-4


@pytest.mark.parametrize("kv_norm", ["kv_heads", "query_heads"])
@pytest.mark.parametrize("pad", ["left", "right"])
def test_ard_matches_naive_definition(kv_norm, pad):
    model, ts = make_pair("llama", num_hidden_layers=3)
    randomise_lora_b(model)  # a student that differs in its weights too, not only in RoPE
    batch = make_batch(pad=pad)
    weights = {"q": 1.0, "k": 0.5, "v": 2.0}
    layers = [0, 2]
    loss, metrics = RelationDistillation(relations=weights, layers=layers, kv_norm=kv_norm)(ts, batch)

    teacher, student = capture_all(ts, batch, "teacher"), capture_all(ts, batch, "student")
    mask = batch["attention_mask"]
    per_relation = {r: [] for r in weights}
    for i in layers:
        for r, name in (("q", "query"), ("k", "key"), ("v", "value")):
            x_s, x_t = getattr(student[i], name), getattr(teacher[i], name)
            kl = naive_kl(x_s, x_s, x_t, x_t, mask, 16**-0.5, 16**-0.5)
            if r != "q" and kv_norm == "query_heads":
                kl = kl * x_s.shape[1] / student[i].query.shape[1]
            per_relation[r].append(kl)
    expected = sum(w * torch.stack(per_relation[r]).mean() for r, w in weights.items())
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    for r in weights:
        assert metrics[r + r] == pytest.approx(torch.stack(per_relation[r]).mean().item(), rel=1e-4)
    # layers 0 and 2 of 3 fall in the first and last thirds
    assert set(metrics) == {"loss", "qq", "kk", "vv", "layers_0-0", "layers_2-2"}


def test_relations_of_a_layer_share_one_call_per_head_dim():
    from linearard.objectives.attention import _head_groups
    from linearard.ops import relation_kl

    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 11, 16), (1, 2, 11, 16), (1, 2, 11, 8)]  # Q, K, and a V of another head dim
    students = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    teachers = [torch.randn(*s, generator=gen) for s in shapes]
    groups = _head_groups(students)
    assert groups == [[0, 1], [2]]
    grouped = [relation_kl([students[i] for i in g], [teachers[i] for i in g], reduction="none") for g in groups]
    (torch.cat(grouped, dim=1) ** 2).sum().backward()
    joined = [g.clone() for g in (x.grad for x in students)]
    for x in students:
        x.grad = None
    separate = [relation_kl(s, t, reduction="none") for s, t in zip(students, teachers)]
    (torch.cat(separate, dim=1) ** 2).sum().backward()
    torch.testing.assert_close(torch.cat(grouped, dim=1), torch.cat(separate, dim=1))
    for a, x in zip(joined, students):
        torch.testing.assert_close(a, x.grad)


@pytest.mark.parametrize("spec", ["ard", "cpt", "logits", "hidden", "attention"])
def test_right_padded_batches_train_the_same_without_a_mask_in_the_forward(spec):
    model, ts = make_pair()
    randomise_lora_b(model)
    batch = make_batch(pad="right")
    results = []
    for promise in (False, True):
        model.zero_grad()
        loss, _ = build_objective(spec)(ts, {**batch, "padded_right": promise})
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-7)


def test_ard_scale_option_uses_the_attention_scaling():
    # query_pre_attn_scalar 4 != head_dim 16: the attention's softmax scale is 4^-1/2, not 16^-1/2.
    _, ts = make_pair("gemma2", query_pre_attn_scalar=4)
    batch = make_batch()
    teacher, student = capture_all(ts, batch, "teacher"), capture_all(ts, batch, "student")
    mask = batch["attention_mask"]
    for scale, value in (("head_dim", 16**-0.5), ("attention", 4**-0.5), (0.3, 0.3)):
        loss, _ = RelationDistillation(relations=["k"], scale=scale)(ts, batch)
        kls = [naive_kl(s.key, s.key, teacher[i].key, teacher[i].key, mask, value, value)
               for i, s in student.items()]
        expected = torch.stack(kls).mean()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)


def test_attention_matches_naive_definition():
    _, ts = make_pair("qwen3")  # GQA and q/k norm
    batch = make_batch()
    loss, metrics = AttentionDistillation()(ts, batch)
    teacher, student = capture_all(ts, batch, "teacher"), capture_all(ts, batch, "student")
    mask = batch["attention_mask"]
    kls = [
        naive_kl(s.query, s.key, teacher[i].query, teacher[i].key, mask, s.scaling, s.scaling)
        for i, s in student.items()
    ]
    expected = torch.stack(kls).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    assert metrics["qk"] == pytest.approx(expected.item(), rel=1e-4)


def test_cpt_matches_cross_entropy_on_full_logits():
    model, ts = make_pair("llama")
    batch = make_batch(pad="right")
    loss, metrics = NextToken(chunk_size=7)(ts, batch)
    with ts.student():
        logits = model(**batch).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["ppl"] == pytest.approx(expected.exp().item(), rel=1e-5)


@pytest.mark.parametrize(
    "family, targets",
    [
        ("llama", DEFAULT_TARGETS),
        ("gemma2", DEFAULT_TARGETS),  # final logit softcapping
        ("llama", ("v_proj", "lm_head")),  # the teacher's head is the head without its adapter
    ],
)
def test_logits_chunked_matches_full_kl_with_gradients(family, targets):
    model, ts = make_pair(family, targets=targets)
    randomise_lora_b(model)
    batch = make_batch()
    tau = 2.0
    loss, _ = LogitDistillation(temperature=tau, chunk_size=5)(ts, batch)
    loss.backward()
    chunked = grads(model)
    model.zero_grad(set_to_none=True)

    mask = batch["attention_mask"].bool()
    with torch.no_grad(), ts.teacher():
        teacher = model(**batch).logits[mask]
    with ts.student():
        student = model(**batch).logits[mask]
    logp_t, logp_s = F.log_softmax(teacher / tau, -1), F.log_softmax(student / tau, -1)
    expected = (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean() * tau**2
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    full = grads(model)
    assert chunked.keys() == full.keys() and chunked
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=1e-4, atol=1e-8)


def test_hidden_matches_cosine_of_hidden_states():
    model, ts = make_pair("mistral", num_hidden_layers=4)
    batch = make_batch()
    loss, metrics = HiddenDistillation(layers=[1, -1])(ts, batch)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), ts.teacher():
        teacher = model(**batch, output_hidden_states=True).hidden_states
    with torch.no_grad(), ts.student():
        student = model(**batch, output_hidden_states=True).hidden_states
    distances = [(1 - F.cosine_similarity(student[i][mask], teacher[i][mask], dim=-1)).mean() for i in (2, 4)]
    torch.testing.assert_close(loss.detach(), torch.stack(distances).mean(), rtol=1e-5, atol=1e-7)
    assert set(metrics) == {"loss", "layer1", "layer3"}  # hidden_states[4] is the final, normed state


@pytest.mark.parametrize("name", ["ard", "hidden", "attention"])
def test_distillation_runs_the_lm_head_on_one_position_only(name):
    model, ts = make_pair("llama")
    positions = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    OBJECTIVES[name]()(ts, make_batch())
    assert positions == [1, 1]  # teacher and student forward


# --- training ---------------------------------------------------------------------------------------


def train(objective, family="llama", steps=6, lr=3e-3):
    model, ts = make_pair(family)
    # Perturbed adapters: on a random tiny model the outputs barely notice PI alone, so without a
    # weight difference to undo the output-level objectives would start at ~0.
    randomise_lora_b(model)
    batch = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = objective(ts, batch)
        loss.backward()
        losses.append(loss.item())
        if len(losses) == 1:
            first_grads = grads(model)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    return losses, first_grads, trainable


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_each_objective_trains_and_only_adapters_get_gradients(name):
    losses, first_grads, trainable = train(build_objective(name))
    assert losses[-1] < losses[0], losses
    nonzero = {n for n, g in first_grads.items() if g.abs().max() > 0}
    assert nonzero and nonzero <= trainable
    assert all("lora_" in n for n in trainable)


@pytest.mark.parametrize("family", FAMILIES)
def test_ard_falls_on_every_family(family):
    losses, _, _ = train(build_objective("ard"), family=family, steps=4)
    assert losses[-1] < losses[0], losses


def one_step(model, ts, spec: str):
    """(loss, metrics, gradients) of one step of `spec` on the standard batch, from random LoRA B weights."""
    randomise_lora_b(model)
    loss, metrics = build_objective(spec)(ts, make_batch())
    loss.backward()
    return loss.detach(), metrics, grads(model)


def assert_same_step(a, b):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert metrics_b == pytest.approx(metrics_a, rel=1e-5, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("spec", "layers", "run"), [
    ("ard", "0-1", 2),  # the last distilled layer runs up to its attention inputs
    ("attention", "1", 2),
    ("hidden", "1", 3),  # hidden state 2 read: one layer more, its output normalised in its place
    ("ard+hidden", "0", 2),
    ("ard", "all", 4),
    ("cpt", None, 4),
    ("logits+ard", "0", 4),
])
def test_forwards_run_the_layers_the_loss_reads_and_no_more(spec, layers, run):
    model, ts = make_pair("llama", num_hidden_layers=4)
    calls = []
    for i, layer in enumerate(ts.decoder.layers):
        layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    loss, _ = build_objective(spec, layers=layers)(ts, make_batch())
    loss.backward()
    forwards = 1 if spec == "cpt" else 2  # next-token loss needs no teacher
    assert sorted(calls) == sorted(list(range(run)) * forwards)
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("spec", "layers"), [("ard", "0"), ("hidden+attention", "0")])
def test_stopping_at_the_deepest_layer_read_changes_no_loss_or_gradient(family, spec, layers, monkeypatch):
    results = []
    for stop in (True, False):
        if not stop:
            monkeypatch.setattr(TeacherStudent, "first_layers", lambda self, count: contextlib.nullcontext())
        model, ts = make_pair(family, num_hidden_layers=3)
        randomise_lora_b(model)
        loss, metrics = build_objective(spec, layers=layers)(ts, make_batch())
        loss.backward()
        results.append((loss.detach(), metrics, grads(model)))
    assert_same_step(*results)


def test_the_layer_count_comes_back_when_a_shortened_forward_fails():
    model, ts = make_pair("llama", num_hidden_layers=3)
    with pytest.raises(RuntimeError, match="inside"), ts.first_layers(1):
        assert model.config.num_hidden_layers == 1
        raise RuntimeError("inside")
    assert model.config.num_hidden_layers == 3


@pytest.mark.parametrize("spec", ["ard", "attention", "ard+hidden+logits+cpt"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(spec):
    results = []
    for checkpointing in (False, True):
        model, ts = make_pair("llama", num_hidden_layers=3)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()  # transformers checkpoints only in training mode
        results.append(one_step(model, ts, spec))
    assert_same_step(*results)


@pytest.mark.parametrize(("family", "spec"), [(f, "ard") for f in FAMILIES]
                         + [("llama", "attention"), ("qwen3", "ard+hidden+logits+cpt")])
def test_a_teacher_recomputed_in_the_students_checkpointed_layers_gives_the_same_loss_and_gradients(family, spec):
    results = []
    for recompute in (False, True):
        model, ts = make_pair(family, checkpointing=True, recompute_teacher=recompute, num_hidden_layers=3)
        assert ts.recompute_teacher is recompute  # a family without the hook would compare a run with itself
        results.append(one_step(model, ts, spec))
    assert_same_step(*results)


def test_a_recomputed_teacher_keeps_no_q_k_v_past_its_layer():
    import gc
    import weakref

    model, ts = make_pair(checkpointing=True, recompute_teacher=True, num_hidden_layers=3)
    randomise_lora_b(model)
    recomputed, refs, original = [], [], ts.teacher_attention

    def watched(layer, call):
        inputs = original(layer, call)
        recomputed.append(layer)
        refs.extend(weakref.ref(x) for x in (inputs.query, inputs.key, inputs.value))
        return inputs

    ts.teacher_attention = watched
    loss, _ = RelationDistillation(layers=[0, 2])(ts, make_batch())
    gc.collect()
    assert recomputed == [0, 2] and all(r() is None for r in refs)
    loss.backward()  # recomputed again inside the backward of each checkpointed layer
    assert recomputed == [0, 2, 2, 0] and all(r() is None for r in refs)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n)


def test_a_teacher_cannot_be_recomputed_without_attention_modules_and_says_so():
    model = tiny_model("llama")
    del model.model.layers[1].self_attn
    own = model.config._attn_implementation
    with pytest.raises(UserError, match="recompute_teacher needs each decoder layer's attention module as `self_attn`; "
                                        "LlamaDecoderLayer has none"):
        TeacherStudent(model, RopeScaling("linear", 4.0, 64, 256), recompute_teacher=True)
    assert model.config._attn_implementation == own  # nothing was changed before the refusal


# --- combinations -----------------------------------------------------------------------------------


def test_combination_weights_are_honoured():
    batch = make_batch()

    def run(objective):
        model, ts = make_pair("llama")
        loss, metrics = objective(ts, batch)
        loss.backward()
        return loss.detach(), metrics, grads(model)

    combined, metrics, g = run(build_objective("ard+cpt", weights={"ard": 2.0, "cpt": 0.5}))
    ard, ard_metrics, g_ard = run(build_objective("ard"))
    cpt, _, g_cpt = run(build_objective("cpt"))
    torch.testing.assert_close(combined, 2.0 * ard + 0.5 * cpt, rtol=1e-6, atol=1e-7)
    for name in g:
        torch.testing.assert_close(g[name], 2.0 * g_ard[name] + 0.5 * g_cpt[name], rtol=1e-4, atol=1e-8)
    assert metrics["loss"] == pytest.approx(combined.item(), rel=1e-6)
    assert metrics["ard/qq"] == pytest.approx(ard_metrics["ard/qq"], rel=1e-6)
    assert {"ard/loss", "ard/kk", "ard/vv", "cpt/loss", "cpt/ppl"} <= set(metrics)


def test_zero_weights_switch_terms_off():
    _, ts = make_pair("llama")
    batch = make_batch()
    loss, metrics = build_objective("ard+logits", weights={"logits": 0}, relations={"q": 1, "k": 1, "v": 0})(ts, batch)
    assert not any(k.startswith("logits/") for k in metrics)
    assert "ard/vv" not in metrics
    assert loss.item() == pytest.approx(metrics["ard/qq"] + metrics["ard/kk"], rel=1e-5)


def test_layers_are_shared_and_other_options_per_objective():
    objective = build_objective("ard+attention+cpt", layers="0", ard={"kv_norm": "query_heads"})
    ard, attention, _ = (o for _, o in objective.parts)
    assert (ard.layers, ard.kv_norm, attention.layers) == ((0,), "query_heads", (0,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": {"v": 0}}, "--relations q=1 k=1 v=0"),
        ({"ard": {"relations": {"v": 0}}}, "give relations with --relations"),
        ({"ard": {"layers": 0}}, "give layers with --layers"),
    ],
)
def test_old_spellings_show_the_new_one(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_objective("ard", **kwargs)


@pytest.mark.parametrize(
    "spec, kwargs",
    [
        ("ard+nope", {}),
        ("ard", {"weights": {"cpt": 1.0}}),
        ("cpt", {"weights": {"q": 1.0}}),
        ("ard", {"weights": {"ard": -1.0}}),
        ("ard", {"weights": {"ard": 0.0}}),
        ("ard", {"relations": {"q": 0, "k": 0, "v": 0}}),
        ("cpt", {"relations": {"q": 1}}),
        ("cpt", {"layers": "0"}),
        ("ard", {"layers": "x"}),
        ("ard", {"nonsense": 2.0}),
        ("ard", {"relations": ["x"]}),
        ("ard", {"ard": {"scale": "big"}}),
        ("ard", {"ard": {"kv_norm": "heads"}}),
        ("ard", {"ard": {"bogus": 1}}),
        ("ard", {"cpt": {}}),
        ("logits", {"temperature": 0.0}),
        ("ard+ard", {}),
    ],
)
def test_bad_specs_are_user_errors(spec, kwargs):
    with pytest.raises(UserError):
        build_objective(spec, **kwargs)


def test_layer_selection():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("every-other", 5) == [0, 2, 4]
    assert select_layers("0-2, 7", 8) == [0, 1, 2, 7]
    assert select_layers([-1, 0, 0], 6) == [0, 5]
    for bad in ("6", [-7], "x", "1-y", []):
        with pytest.raises(UserError):
            select_layers(bad, 6)
    _, ts = make_pair("llama")
    with pytest.raises(UserError):
        RelationDistillation(layers=[5])(ts, make_batch())


@pytest.mark.parametrize("checkpointing", ["off", "on", "on, teacher recomputed"])
def test_compiled_layers_train_the_same_and_compile_once(checkpointing):
    import torch._dynamo.utils

    from linearard.models.teacher_student import compile_layers

    results = []
    for compiled in (False, True):
        recompute = checkpointing == "on, teacher recomputed"
        model, ts = make_pair(num_hidden_layers=3, checkpointing=recompute, recompute_teacher=recompute)
        randomise_lora_b(model)
        if checkpointing == "on":
            enable_activation_checkpointing(model)
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()  # counts of the session's earlier tests
            compile_layers(ts, backend="aot_eager")
        graphs = []
        for seed in range(3):  # a new batch (and new closures in the objective) every step
            model.zero_grad()
            loss, _ = build_objective("ard+cpt")(ts, {**make_batch(seed, pad="right"), "padded_right": True})
            loss.backward()
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        results.append((loss.detach(), grads(model)))
        if compiled:
            assert graphs[0] > 0 and graphs[-1] == graphs[0]  # the first step compiled everything
            if checkpointing == "off":
                # two graphs on either side of the capture for the teacher and for the student, one for the
                # next-token forward (no capture); not one per frame the capture sits in, nor one for layer 0
                assert graphs[0] == 5
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)
