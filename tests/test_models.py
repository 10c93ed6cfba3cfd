"""Model plumbing: RoPE configs, adapters, the shared-weight teacher/student, Q/K/V capture, loading."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from linearard.errors import UserError
from linearard.models.adapters import (
    ADAPTER_MODES,
    AdapterSwitch,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merged_state_dict,
    trainable_parameters,
)
from linearard.models.load import load_model, split_spec
from linearard.models.rope import (
    ROPE_TYPES,
    RopeScaling,
    legacy_rope_fields,
    native_length,
    rope_parameters_from_dict,
    scaled_config,
)
from linearard.models.teacher_student import TeacherStudent
from tiny import FAMILIES, byte_tokenizer, tiny_model

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


def _perturb(model):
    """Give every trainable delta a non-zero value so 'adapters on' differs from 'off'."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---- RoPE ---------------------------------------------------------------------------------------


def test_resolve_fills_factor_and_target():
    config = tiny_model("llama").config  # native 256
    assert RopeScaling.resolve(config, "linear", 4.0).target_length == 1024
    s = RopeScaling.resolve(config, target_length=2048)
    assert (s.rope_type, s.factor) == ("yarn", 8.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_type="bogus", factor=2.0), "unknown RoPE type"),
        (dict(rope_type="linear"), "--rope-factor or --target-length"),
        (dict(rope_type="linear", target_length=128), "not above the model's native length 256"),
        (dict(rope_type="linear", factor=0.5), "above 1"),
        (dict(rope_type="linear", factor=float("nan")), "above 1"),
    ],
)
def test_resolve_rejects_bad_input(kwargs, message):
    with pytest.raises(UserError, match=message):
        RopeScaling.resolve(tiny_model("llama").config, **kwargs)


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_scaled_config_round_trips_through_both_dialects(rope_type, tmp_path):
    model = tiny_model("llama")
    scaling = RopeScaling.resolve(model.config, rope_type, 4.0)
    config = scaled_config(model.config, scaling)
    assert model.config.rope_parameters["rope_type"] == "default"  # the original is untouched
    if rope_type == "abf":
        assert config.rope_parameters["rope_theta"] > model.config.rope_parameters["rope_theta"]
    else:
        assert config.rope_parameters["rope_type"] == rope_type
        assert native_length(config) == 256
    expected_max = 256 if rope_type == "dynamic" else 1024
    assert config.max_position_embeddings == expected_max
    legacy = legacy_rope_fields(config)
    assert legacy["rope_theta"] == config.rope_parameters["rope_theta"]
    # A 4.x-style config.json is read back into the same parameters.
    as_4x = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"} | legacy
    back = rope_parameters_from_dict(as_4x)
    assert back["rope_type"] == config.rope_parameters["rope_type"]
    assert back["rope_theta"] == config.rope_parameters["rope_theta"]
    # And transformers itself builds a working model from the 4.x form.
    (tmp_path / "config.json").write_text(json.dumps(as_4x))
    reloaded = AutoModelForCausalLM.from_config(type(config).from_pretrained(tmp_path))
    assert reloaded.config.rope_parameters["rope_type"] == config.rope_parameters["rope_type"]


def test_scaling_a_scaled_config_is_refused():
    config = tiny_model("llama").config
    scaled = scaled_config(config, RopeScaling.resolve(config, "yarn", 4.0))
    with pytest.raises(UserError, match="already RoPE-scaled"):
        scaled_config(scaled, RopeScaling(rope_type="yarn", factor=2.0, original_length=1024, target_length=2048))


def test_gemma3_scales_only_global_layers():
    config = tiny_model("gemma3").config
    scaled = scaled_config(config, RopeScaling.resolve(config, "linear", 4.0))
    assert scaled.rope_parameters["sliding_attention"] == config.rope_parameters["sliding_attention"]
    assert scaled.rope_parameters["full_attention"]["rope_type"] == "linear"


# ---- adapters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapters_switch_off_merge_and_checkpoint(mode):
    base = tiny_model("llama")
    with torch.no_grad():
        reference = base(IDS).logits
    model = add_adapters(tiny_model("llama"), mode, rank=4, alpha=8)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and trainable_parameters(model)
    _perturb(model)
    with torch.no_grad():
        adapted = model(IDS).logits
        switch = AdapterSwitch(model)
        with switch.off():
            with switch.off():  # nested: still off after the inner block
                pass
            off = model(IDS).logits
        assert torch.equal(model(IDS).logits, adapted)  # back on after the outer block
    assert torch.equal(off, reference)
    assert not torch.allclose(adapted, reference)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    fresh = add_adapters(tiny_model("llama"), mode, rank=4, alpha=8)
    load_adapter_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.allclose(fresh(IDS).logits, adapted, atol=1e-6)
        merged = tiny_model("llama")
        merged.load_state_dict(merged_state_dict(fresh))  # strict: exactly the plain model's names
        assert torch.allclose(merged(IDS).logits, adapted, atol=1e-5)
        assert torch.equal(fresh(IDS).logits, adapted)  # the adapted model is left as it was


def test_adapter_errors():
    with pytest.raises(UserError, match="unknown adapter mode"):
        add_adapters(tiny_model("llama"), "bogus")
    with pytest.raises(UserError, match="no linear layers named"):
        add_adapters(tiny_model("llama"), "lora", targets=("wq",))
    model = add_adapters(tiny_model("llama"), "lora", rank=4)
    with pytest.raises(UserError, match="do not match"):
        load_adapter_state_dict(model, {"nope": torch.zeros(1)})


def test_phi3_fused_projection_is_the_default_target():
    model = add_adapters(tiny_model("phi3"), "dense")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("qkv_proj" in n for n in names)


# ---- teacher / student --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_is_the_base_model_and_capture_sees_every_layer(family):
    base = tiny_model(family)
    with torch.no_grad():
        reference = base(IDS).logits
    model = add_adapters(tiny_model(family), "lora", rank=4, alpha=8)
    _perturb(model)
    ts = TeacherStudent(model, RopeScaling.resolve(model.config, "linear", 4.0))
    seen = {}

    def record(layer, inputs):
        seen[layer] = inputs

    with torch.no_grad():
        with ts.teacher(), ts.capture(record):
            teacher = model(IDS).logits
        with ts.student():
            student = model(IDS).logits
    assert torch.equal(teacher, reference)
    assert not torch.allclose(student, reference)
    config = base.config
    assert sorted(seen) == list(range(config.num_hidden_layers))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, k, v = seen[0].query, seen[0].key, seen[0].value
    assert q.shape == (2, config.num_attention_heads, 40, head_dim)
    assert k.shape == v.shape == (2, config.num_key_value_heads, 40, head_dim)
    assert seen[0].scaling == pytest.approx(base.model.layers[0].self_attn.scaling)
    # Outside the blocks the model computes exactly what it did before.
    assert model.base_model.model.model.rotary_emb is ts.native_rope
    with torch.no_grad(), AdapterSwitch(model).off():
        assert torch.equal(model(IDS).logits, reference)


def test_capture_reads_rotated_queries():
    """Q from the capture equals q_proj output rotated by the role's own RoPE."""
    model = tiny_model("llama")
    ts = TeacherStudent(model, RopeScaling.resolve(model.config, "linear", 4.0))
    got = {}
    with torch.no_grad():
        for role in ("teacher", "student"):
            with getattr(ts, role)(), ts.capture(lambda i, a, role=role: got.setdefault((role, i), a)):
                model(IDS)
    q_t, q_s = got[("teacher", 0)].query, got[("student", 0)].query
    assert torch.allclose(q_t[:, :, 0], q_s[:, :, 0])  # position 0 is not rotated
    assert not torch.allclose(q_t[:, :, 5:], q_s[:, :, 5:])
    # Linear PI ×4: student position 4 sees the teacher's angle for position 1.
    ids = IDS[:, [0, 0, 0, 0, 0]]
    with torch.no_grad():
        with ts.teacher(), ts.capture(lambda i, a: got.__setitem__("t", a)):
            model(ids)
        with ts.student(), ts.capture(lambda i, a: got.__setitem__("s", a)):
            model(ids)
    cos_t, sin_t = ts.native_rope(ids.float(), torch.arange(5)[None])
    cos_s, sin_s = ts.student_rope(ids.float(), torch.tensor([[0, 4, 8, 12, 16]]))
    assert torch.allclose(cos_t, cos_s, atol=1e-6) and torch.allclose(sin_t, sin_s, atol=1e-6)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_types_use_long_context_frequencies(rope_type):
    model = tiny_model("llama")
    scaling = RopeScaling.resolve(model.config, rope_type, 4.0)
    ts = TeacherStudent(model, scaling)
    long_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](ts.student_config, None, seq_len=scaling.target_length)
    assert not torch.allclose(long_freq, ts.native_rope.inv_freq)
    # A short input must still use the long-context frequencies.
    ts.student_rope(torch.zeros(1, 8, 4), torch.arange(8)[None])
    assert torch.allclose(ts.student_rope.rope.inv_freq, long_freq)


def test_yarn_attention_scaling_enters_the_captured_queries():
    model = tiny_model("llama")
    ts = TeacherStudent(model, RopeScaling.resolve(model.config, "yarn", 4.0))
    assert ts.student_rope.rope.attention_scaling > 1.0
    got = {}
    with torch.no_grad(), ts.student(), ts.capture(lambda i, a: got.setdefault(i, a)):
        model(IDS)
    layer = model.model.layers[0]
    with torch.no_grad():
        q = layer.self_attn.q_proj(layer.input_layernorm(model.model.embed_tokens(IDS)))
    # Position 0 is not rotated: the captured query is the projection times YaRN's attention scaling.
    expected = q.view(2, 40, 4, 16)[:, 0] * ts.student_rope.rope.attention_scaling
    assert torch.allclose(got[0].query[:, :, 0], expected, atol=1e-5)


def test_unsupported_architecture():
    with pytest.raises(UserError, match="unsupported architecture"):
        TeacherStudent(torch.nn.Linear(2, 2), RopeScaling("linear", 2.0, 16, 32))


# ---- loading ------------------------------------------------------------------------------------


def test_split_spec():
    assert split_spec("smollm2-135m@linear:4") == ("smollm2-135m", ("linear", 4.0))
    assert split_spec("some/dir") == ("some/dir", None)


def test_load_local_folder_with_and_without_scaling(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded, tok = load_model(str(tmp_path), device="cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, model(IDS).logits, atol=1e-6)
    scaled, _ = load_model(f"{tmp_path}@yarn:4", device="cpu")  # rebuilt from its config, weights copied
    # loading draws no random numbers of the caller's (which then initialise the adapters), whichever way
    # the model is built, so a seed gives the same run with the embedded model converted or cached
    assert torch.equal(torch.get_rng_state(), torch.random.manual_seed(0).get_state())
    assert scaled.config.rope_parameters["rope_type"] == "yarn"
    assert scaled.config.max_position_embeddings == 1024
    assert tok("ab")["input_ids"] == [97, 98]


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="not a .gguf"):
        load_model(str(tmp_path / "x.bin"))


@pytest.mark.slow
def test_embedded_default_model_loads_and_predicts():
    model, tok = load_model("smollm2-135m", device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.config.max_position_embeddings == 8192
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Rome"


def test_teacher_student_undoes_its_attention_hook_on_close():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registered = (set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS))
    model = tiny_model("llama")
    own = model.config._attn_implementation
    with TeacherStudent(model, RopeScaling.resolve(model.config, "linear", 4.0)) as ts:
        assert model.config._attn_implementation != own
        seen = []
        with torch.no_grad(), ts.teacher(), ts.capture(lambda i, _: seen.append(i)):
            model(IDS)
        assert seen == [0, 1]
        other = tiny_model("llama")  # a model loaded meanwhile is not touched either
        assert other.config._attn_implementation == own
    assert model.config._attn_implementation == own
    assert (set(ALL_ATTENTION_FUNCTIONS), set(ALL_MASK_ATTENTION_FUNCTIONS)) == registered
    after = tiny_model("llama")
    assert after.config._attn_implementation == own
    with torch.no_grad():
        model(IDS)  # the closed pair's model runs on its own attention
    ts.close()  # twice is harmless


@pytest.mark.parametrize(
    ("family", "length", "skipped"),
    [("llama", 48, True), ("mistral", 48, True), ("mistral", 80, False), ("gemma2", 48, False)],
    ids=["sdpa", "window-covers", "window-shorter", "eager"],
)
def test_unpadded_rows_need_no_mask_tensor_where_the_kernel_is_causal(family, length, skipped, monkeypatch):
    # sdpa applies causality itself; a sliding window shorter than the rows, or eager attention, needs the mask
    from linearard.models import teacher_student

    model = tiny_model(family, max_position_embeddings=128)
    ids = torch.randint(0, 256, (2, length))
    built = []
    real_builder = teacher_student._mask_builder

    def counting(build):  # counts the inner implementation's mask builds
        return real_builder(lambda *a, **k: (built.append(1), build(*a, **k))[1])

    monkeypatch.setattr(teacher_student, "_mask_builder", counting)
    scaling = RopeScaling.resolve(model.config, "linear", 2.0)
    with TeacherStudent(model, scaling) as ts, torch.no_grad(), ts.student():
        reference = model(input_ids=ids).logits
        with ts.causal_only(length):
            built.clear()
            logits = model(input_ids=ids).logits
    assert (built == []) == skipped
    assert torch.allclose(logits, reference, atol=1e-5)
