"""Export: the merged model reloads with plain transformers and reproduces the in-memory student."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from linearard.errors import UserError
from linearard.export import check_exportable, export_model, exported_config
from linearard.models.adapters import add_adapters, merged_state_dict, trainable_parameters
from linearard.models.rope import RopeScaling
from linearard.models.teacher_student import TeacherStudent
from linearard.outputs import MARKER
from tiny import FAMILIES, TIED, byte_tokenizer, is_tied, tiny_config, tiny_model

# families whose configs keep one RoPE setting per layer type
PER_LAYER_TYPE_FAMILIES = [f for f in FAMILIES if "sliding_attention" in (tiny_config(f).rope_parameters or {})]

# every family, and the tied variant where a family has one
VARIANTS = FAMILIES + tuple(v for v in TIED if v not in FAMILIES)

# the tiny models' native length is 256: 64 tokens is short, 320 beyond native
SHORT, LONG = 64, 320


def _student(family, rope_type, mode="lora", dtype=torch.float32):
    model = tiny_model(family).to(dtype)
    scaling = RopeScaling.resolve(model.config, rope_type, 4.0)
    model = add_adapters(model, mode, rank=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters (LoRA's B starts at zero), in fp32 as the loop keeps them
        for p in trainable_parameters(model):
            p.data = p.data.float() + 0.05 * torch.randn(p.shape, generator=g)
    return model, scaling


def _rope_type(family):
    return "longrope" if family.startswith("phi3") else "yarn"  # transformers' Phi-3 config accepts LongRoPE only


def _snapshot(model):
    return {n: (p, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    params = dict(model.named_parameters())
    assert params.keys() == snapshot.keys()
    for name, (param, value) in snapshot.items():
        assert params[name] is param, name  # the same parameter, so the same dtype, device and requires_grad
        assert param.dtype == value.dtype and param.device == value.device and torch.equal(param, value), name


def _student_logits(model, scaling, length):
    ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), TeacherStudent(model, scaling).student():
        return ids, model(input_ids=ids).logits


def _reload(path, family):
    kwargs = {"attn_implementation": "eager"} if family.startswith("gemma") else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@pytest.mark.parametrize("mode", ["lora", "dense"])
@pytest.mark.parametrize("family", VARIANTS)
def test_reloaded_export_matches_student_and_the_model_stays_usable(tmp_path, family, mode):
    model, scaling = _student(family, _rope_type(family), mode)
    expected = [_student_logits(model, scaling, n) for n in (SHORT, LONG)]
    ids = expected[0][0]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits  # native RoPE, adapters on
    before = _snapshot(model)
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    # the model exported is not touched: a run may evaluate (or train) it afterwards
    _assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)
    assert torch.equal(_student_logits(model, scaling, SHORT)[1], expected[0][1])
    reloaded = _reload(tmp_path / "out", family)
    assert reloaded.config.max_position_embeddings == scaling.target_length
    assert is_tied(reloaded) == is_tied(tiny_model(family))
    for ids, logits in expected:
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
@pytest.mark.parametrize("family", VARIANTS)
def test_merged_weights_are_peft_merge_and_unload(family):
    model, _ = _student(family, _rope_type(family))
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        assert merged[name].device.type == "cpu"
        torch.testing.assert_close(merged[name], tensor, rtol=1.3e-6, atol=1e-5, msg=name)  # fp32 tolerance
    if is_tied(model.get_base_model()):
        assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]


@pytest.mark.parametrize("mode", ["lora", "dense", "full"])
def test_a_bf16_model_merges_in_fp32_as_before(mode):
    # the loop on a GPU: bf16 base weights, fp32 adapters; the merge is the fp32 sum rounded once
    model, _ = _student("qwen2-tied", "yarn", mode, dtype=torch.bfloat16)
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).float()
    if mode == "lora":
        reference = reference.merge_and_unload()
    else:
        with torch.no_grad():
            for name, module in list(reference.named_modules()):
                if hasattr(module, "delta"):
                    parent, _, attr = name.rpartition(".")
                    module.base.weight += module.delta
                    setattr(reference.get_submodule(parent), attr, module.base)
    reference = reference.to(torch.bfloat16).state_dict()
    assert merged.keys() == reference.keys()
    assert all(merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], reference[k]) for k in reference)


@pytest.mark.parametrize(
    "model_dtype, dtype, saved",
    [
        pytest.param(torch.float32, None, torch.float32, id="fp32-default"),
        pytest.param(torch.float32, torch.bfloat16, torch.bfloat16, id="fp32-as-bf16"),
        pytest.param(torch.bfloat16, None, torch.bfloat16, id="bf16-default"),
    ],
)
def test_the_requested_dtype_is_saved_and_ties_kept(tmp_path, model_dtype, dtype, saved):
    model, scaling = _student("llama-tied", "yarn", dtype=model_dtype)
    model.get_base_model().generation_config.eos_token_id = [257, 258]  # as Llama 3's generation config
    before = _snapshot(model)
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out", dtype=dtype)
    _assert_unchanged(model, before)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [257, 258]
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: saved once
    assert {t.dtype for t in tensors.values()} == {saved}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
    fp32 = merged_state_dict(model, torch.float32)  # merged in fp32, rounded once to the saved dtype
    assert all(torch.equal(t, fp32[k].to(saved)) for k, t in tensors.items())
    assert is_tied(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))


def test_a_compiled_model_exports_as_the_model(tmp_path):
    model, scaling = _student("llama", "yarn")
    export_model(torch.compile(model), byte_tokenizer(), scaling, tmp_path / "compiled")
    export_model(model, byte_tokenizer(), scaling, tmp_path / "plain")
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = (load_file(tmp_path / folder / name) for folder in ("compiled", "plain"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The in-memory dynamic-NTK student fails beyond the native length: StudentRope renames its type to
# "dynamic@<target>", which transformers' `"dynamic" in rope_type` test still treats as dynamic.
@pytest.mark.parametrize(
    "family, rope_type, lengths",
    [
        pytest.param("llama", "linear", (SHORT, LONG), id="llama-linear"),
        pytest.param("llama", "llama3", (SHORT, LONG), id="llama-llama3"),
        pytest.param("llama", "abf", (SHORT, LONG), id="llama-abf"),
        pytest.param("llama", "longrope", (SHORT, LONG), id="llama-longrope"),
        # per-layer-type RoPE: only the global layers are scaled
        pytest.param("gemma3", "longrope", (SHORT, LONG), id="gemma3-longrope"),
        pytest.param("llama", "dynamic", (SHORT,), id="llama-dynamic-short"),
        pytest.param("gemma3", "dynamic", (SHORT,), id="gemma3-dynamic-short"),
        pytest.param("llama", "dynamic", (LONG,), id="llama-dynamic-long"),
    ],
)
def test_every_rope_type_reloads_exactly(tmp_path, family, rope_type, lengths):
    # dynamic NTK and LongRoPE switch frequencies with the input length in transformers; the export
    # must give the student's long-context frequencies at short and long lengths alike
    model, scaling = _student(family, rope_type)
    expected = [_student_logits(model, scaling, n) for n in lengths]
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    reloaded = _reload(tmp_path / "out", family)
    for ids, logits in expected:
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_legacy_dialect_alone_gives_the_same_model(tmp_path, rope_type):
    model, scaling = _student("qwen2", rope_type)
    ids, logits = _student_logits(model, scaling, SHORT)
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    assert config["rope_scaling"]["type"] == rope_type and "rope_theta" in config
    del config["rope_parameters"]  # what a transformers-4.x reader uses
    path.write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(_reload(tmp_path / "out", "qwen2")(input_ids=ids).logits, logits)


def test_a_rope_type_the_architecture_cannot_save_is_refused():
    config = tiny_model("phi3").config
    with pytest.raises(UserError, match="Phi3Config cannot hold a yarn RoPE scaling"):
        check_exportable(config, RopeScaling.resolve(config, "yarn", 4.0))
    check_exportable(config, RopeScaling.resolve(config, "longrope", 4.0))


def test_dense_adapters_export_and_dtype(tmp_path):
    model, scaling = _student("phi3", "longrope", mode="dense")
    ids, logits = _student_logits(model, scaling, SHORT)
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out", dtype=torch.bfloat16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        got = reloaded.float()(input_ids=ids).logits
    torch.testing.assert_close(got, logits, atol=0.05, rtol=0.05)  # bf16 weights
    adapters = load_file(tmp_path / "out" / "adapter" / "adapters.safetensors")
    assert adapters and all(".delta" in name for name in adapters)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_lora_adapter_folder_loads_with_peft(tmp_path):
    from peft import PeftModel

    model, scaling = _student("llama", "linear")
    ids, logits = _student_logits(model, scaling, SHORT)
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    # the adapter folder on the base weights with the exported (scaled) config = the student
    base = AutoModelForCausalLM.from_config(exported_config(tiny_model("llama").config, scaling))
    base.load_state_dict(tiny_model("llama").state_dict())
    student = PeftModel.from_pretrained(base.eval(), tmp_path / "out" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, logits, atol=2e-5, rtol=1e-4)


def test_export_writes_only_where_nothing_is_lost(tmp_path):
    model, scaling = _student("llama", "linear")
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"out is not empty and was not written by linearard export"):
        export_model(model, byte_tokenizer(), scaling, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    (target / "notes.txt").unlink()  # an empty folder is filled in place
    export_model(model, byte_tokenizer(), scaling, target)
    assert (target / "model.safetensors").exists() and (target / MARKER).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    with pytest.raises(UserError, match="holds an earlier export; pass --overwrite to replace it"):
        export_model(model, byte_tokenizer(), scaling, target)

    model, scaling = _student("llama", "linear")
    (target / "model.safetensors").write_bytes(b"old")
    export_model(model, byte_tokenizer(), scaling, target, overwrite=True)
    assert (target / "model.safetensors").stat().st_size > 3
    (target / "notes.md").write_text("my notes")  # not the export's: --overwrite must not delete it
    with pytest.raises(UserError, match="holds 'notes.md', which linearard export did not write"):
        export_model(model, byte_tokenizer(), scaling, target, overwrite=True)
    assert (target / "notes.md").read_text() == "my notes"


def test_a_full_disk_during_export_is_one_line_and_leaves_no_trace(tmp_path, monkeypatch):
    import errno

    import linearard.export as export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "_add_legacy_rope", full)
    model, scaling = _student("llama", "linear")
    with pytest.raises(UserError, match=r"^could not write the exported model to .*out: the disk is full$"):
        export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", PER_LAYER_TYPE_FAMILIES)
@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_per_layer_type_rope_is_complete_in_the_4x_dialect(tmp_path, family, rope_type):
    # what a transformers-4.x reader of Gemma 3 takes: rope_theta + rope_scaling for the global layers,
    # rope_local_base_freq for the sliding-window ones
    model, scaling = _student(family, rope_type)
    native = tiny_model(family).config.rope_parameters
    export_model(model, byte_tokenizer(), scaling, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_local_base_freq"] == native["sliding_attention"]["rope_theta"] == 10000.0
    assert config["rope_theta"] == native["full_attention"]["rope_theta"]
    assert config["rope_scaling"]["type"] == config["rope_scaling"]["rope_type"] == rope_type
    assert config["rope_scaling"]["factor"] == 4.0
    assert config["rope_parameters"]["full_attention"]["rope_type"] == rope_type  # the 5.x dialect too
