"""The restore loop on tiny models: the loss falls, resume is exact, failures stop cleanly."""

import errno
import itertools
import math
import pathlib
import random

import pytest
import torch
from safetensors.torch import load_file

from linearard.config import build_config
from linearard.errors import UserError
from linearard.models.rope import RopeScaling
from linearard.objectives import ObjectiveSpec
from linearard.training import checkpoint as ckpt
from linearard.training.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from linearard.training.loop import _Run, restore
from linearard.training.metrics import read_metrics
from linearard.training.plan import ModelShape, Stage, estimate_memory
from linearard.training.schedule import lr_factor
from tiny import FAMILIES, byte_tokenizer, tiny_model, word_text, write_corpus


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> a folder holding that tiny model and the byte tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
        byte_tokenizer().save_pretrained(root / family)
        out[family] = str(root / family)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_corpus(tmp_path_factory.mktemp("corpus"), docs=4, words=150))


def _config(models, corpus, tmp_path, **overrides):
    flags = dict(
        model=models["llama"], data=[corpus], seq_len=64, max_tokens=64 * 4, lora_rank=4, lora_alpha=8,
        warmup_steps=1, lr=1e-2, rope_type="linear", rope_factor=8.0, output=str(tmp_path / "run"),
        save_every=0, eval=False, export=False,
    )
    flags.update(overrides)
    return build_config(flags=flags)


def _quiet(_):
    return None


def _losses(output):
    return [record["loss"] for record in read_metrics(output)]


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_lowers_the_relation_loss(models, corpus, tmp_path, family):
    # one 64-token document, seen every step: the same batch, so the loss must fall
    doc = tmp_path / "one.txt"
    doc.write_text(word_text(14, random.Random(1)))
    rope = "longrope" if family == "phi3" else "linear"  # transformers' Phi-3 config takes LongRoPE only
    cfg = _config(models, str(doc), tmp_path, model=models[family], max_tokens=64 * 8, shuffle_buffer=0,
                  rope_type=rope)
    result = restore(cfg, log=_quiet)
    losses = _losses(cfg.output)
    assert len(losses) == 8 and result.tokens == 8 * 64
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    record = read_metrics(cfg.output)[-1]
    for key in ("ard/qq", "ard/kk", "ard/vv", "lr", "grad_norm", "tokens_per_s"):
        assert key in record


def test_held_out_report_compares_three_distinct_models(models, corpus, tmp_path):
    # The untrained scaled student is the scaled RoPE with the adapters off: training cannot move it.
    def report(steps):
        cfg = _config(models, corpus, tmp_path / str(steps), max_tokens=64 * steps, eval=True, eval_tokens=256)
        return restore(cfg, log=_quiet).perplexity

    short, long = report(1), report(6)
    assert short["teacher"] == pytest.approx(long["teacher"], rel=1e-6)
    assert short["scaled student"] == pytest.approx(long["scaled student"], rel=1e-6)
    # a tiny random model barely moves on Hamlet, but the trained adapters must make some difference
    assert long["restored student"] != long["scaled student"]
    assert long["restored student"] != short["restored student"]


def _crash_on_call(monkeypatch, n, error):
    calls = {"n": 0}
    original = _Run._objective_step

    def step(self, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return original(self, batch)

    monkeypatch.setattr(_Run, "_objective_step", step)


class SimulatedCrash(Exception):
    pass


# the second leaves the deepest layer's v_proj adapter out of the optimizer (no term reaches it)
@pytest.mark.parametrize("objective", [{}, {"relations": {"q": 1.0, "k": 1.0}}], ids=["all", "unreached"])
def test_resume_continues_exactly(models, corpus, tmp_path, monkeypatch, objective):
    # dropout and a shuffle buffer make the run depend on every RNG and the data position
    common = dict(max_tokens=64 * 6, save_every=2, lora_dropout=0.2, shuffle_buffer=16, **objective)
    reference = _config(models, corpus, tmp_path / "a", **common)
    restore(reference, log=_quiet)

    interrupted = _config(models, corpus, tmp_path / "b", **common)
    _crash_on_call(monkeypatch, 5, SimulatedCrash())
    with pytest.raises(SimulatedCrash):
        restore(interrupted, log=_quiet)
    assert latest_checkpoint(interrupted.output).name == "step-00000004"
    monkeypatch.undo()

    with pytest.raises(UserError, match=r"already holds a run \(checkpoints up to step-00000004\); pass --resume"):
        restore(interrupted, log=_quiet)
    resumed = build_config(flags={**interrupted.to_dict(), "resume": True})
    result = restore(resumed, log=_quiet)
    assert _losses(resumed.output) == _losses(reference.output)  # bit for bit, all six steps
    final = [load_file(latest_checkpoint(c.output) / "adapters.safetensors") for c in (reference, resumed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert result.steps == 6


def test_resume_refuses_changed_settings_and_missing_checkpoints(models, corpus, tmp_path):
    cfg = _config(models, corpus, tmp_path, resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        restore(cfg, log=_quiet)
    restore(_config(models, corpus, tmp_path), log=_quiet)
    with pytest.raises(UserError, match=r"lr 0.01 -> 0.002"):
        restore(_config(models, corpus, tmp_path, resume=True, lr=2e-3), log=_quiet)
    with pytest.raises(UserError, match=r"written by 1 process\(es\) but this run has 2"):
        read_checkpoint(latest_checkpoint(cfg.output), world_size=2)


def test_resume_takes_another_spelling_of_the_same_layers(models, corpus, tmp_path):
    cfg = _config(models, corpus, tmp_path, max_tokens=64 * 2)
    restore(cfg, log=_quiet)
    saved = latest_checkpoint(cfg.output) / "config.yaml"
    assert "\nlayers: null\n" in saved.read_text()
    resume = {**cfg.to_dict(), "resume": True}
    restore(build_config(flags={**resume, "layers": "all"}), log=_quiet)  # every layer of ard, either way
    # earlier versions wrote the default as "all" (and no manifest)
    saved.write_text(saved.read_text().replace("\nlayers: null\n", "\nlayers: all\n"))
    (saved.parent / ckpt.MANIFEST).unlink()
    assert restore(build_config(flags=resume), log=_quiet).steps == 2
    # for hidden, "all" is every layer and the default four: a real change
    saved.write_text(saved.read_text().replace("\nobjective: ard\n", "\nobjective: hidden\n"))
    with pytest.raises(UserError, match=r"different settings than the checkpoint: layers 'all' -> None$"):
        restore(build_config(flags={**resume, "objective": "hidden"}), log=_quiet)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(models, corpus, tmp_path, monkeypatch):
    original = _Run._objective_step
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss, metrics = original(self, batch)
        if calls["n"] == 3:
            return loss * float("nan"), {**metrics, "loss": torch.tensor(float("nan"))}
        return loss, metrics

    monkeypatch.setattr(_Run, "_objective_step", poisoned)
    cfg = _config(models, corpus, tmp_path, save_every=2)
    with pytest.raises(UserError, match=r"non-finite loss nan at step 3 .*step-00000002"):
        restore(cfg, log=_quiet)
    assert [p.name for p in list_checkpoints(cfg.output)] == ["step-00000002"]


def test_layers_compile_without_dynamos_ddp_graph_splitting_and_the_setting_is_put_back(models, corpus, tmp_path,
                                                                                       monkeypatch):
    seen = []

    def run(self):
        seen.append(torch._dynamo.config.optimize_ddp)
        raise UserError("stop here")

    monkeypatch.setattr(_Run, "run", run)
    before = torch._dynamo.config.optimize_ddp
    with pytest.raises(UserError, match="stop here"):
        restore(_config(models, corpus, tmp_path), log=_quiet)
    assert seen == [False] and torch._dynamo.config.optimize_ddp == before


def test_out_of_memory_is_a_user_error_with_a_hint(models, corpus, tmp_path, monkeypatch):
    _crash_on_call(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(UserError, match="out of memory: lower --seq-len .* --gradient-checkpointing"):
        restore(_config(models, corpus, tmp_path), log=_quiet)


def test_a_full_disk_keeps_the_previous_checkpoint(models, corpus, tmp_path, monkeypatch):
    saves = {"n": 0}
    original = ckpt.torch.save

    def failing_save(obj, path):
        if str(path).endswith("optimizer.pt"):
            saves["n"] += 1
            if saves["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    cfg = _config(models, corpus, tmp_path, save_every=2)
    with pytest.raises(UserError) as caught:
        restore(cfg, log=_quiet)
    good = latest_checkpoint(cfg.output)
    assert str(caught.value) == (
        f"could not write checkpoint {pathlib.Path(cfg.output) / 'checkpoints' / 'step-00000004'}: the disk is full; "
        f"the newest checkpoint is still {good}"
    )
    assert good.name == "step-00000002" and ckpt.verify_checkpoint(good) is None
    assert read_checkpoint(good).trainer.step == 2
    folder = cfg.output + "/checkpoints"
    assert sorted(p.name for p in pathlib.Path(folder).iterdir()) == ["step-00000002"]  # no temporary folder


def test_two_stages_share_one_budget(models, corpus, tmp_path):
    cfg = _config(models, corpus, tmp_path, max_tokens=64 * 4 + 128 * 2, cpt_tokens=128 * 2, cpt_seq_len=128,
                  save_every=1, keep_checkpoints=2, gradient_checkpointing=True)
    result = restore(cfg, log=_quiet)
    records = read_metrics(cfg.output)
    assert [r["stage"] for r in records] == ["restore"] * 4 + ["cpt"] * 2
    assert "ard/qq" in records[0] and "cpt/loss" in records[-1]
    assert [r["tokens"] for r in records] == [64, 128, 192, 256, 384, 512]
    assert result.tokens == cfg.max_tokens
    # a checkpoint after every step, the newest two kept
    assert [p.name for p in list_checkpoints(cfg.output)] == ["step-00000005", "step-00000006"]
    assert read_checkpoint(latest_checkpoint(cfg.output)).trainer.stage == 1


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup_steps=3, total_steps=10, min_ratio=0.1) for s in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in itertools.pairwise(factors[2:]))
    assert factors[-1] == pytest.approx(0.1)


def test_memory_estimate_responds_to_the_settings(models, corpus, tmp_path):
    model = tiny_model("llama")
    shape = ModelShape.of(model, model.config)
    stages = [Stage("restore", ObjectiveSpec.parse("ard"), 4096, 10, 4096, 1, 1)]

    def peak(blocks=1, **kw):
        config = _config(models, corpus, tmp_path, **kw)
        chosen = [Stage("restore", config.objective_spec(), 4096, 10, 4096 * blocks, blocks, 1)]
        return estimate_memory(config, shape, chosen, world_size=2, bf16=False)

    base = peak()
    qkv = "teacher Q/K/V (ard, distilled layers)"
    assert peak(gradient_checkpointing=True).parts["activations (restore)"] < base.parts["activations (restore)"]
    assert peak(strategy="fsdp").parts["frozen weights"] == base.parts["frozen weights"] // 2
    assert peak(layers="0").parts[qkv] * 2 == base.parts[qkv]
    # the forwards stop at the deepest distilled layer: one of the two runs
    assert peak(layers="0").parts["activations (restore)"] * 2 == base.parts["activations (restore)"]
    assert peak(relations={"q": 1}).parts[qkv] * 2 == base.parts[qkv]  # 4 query heads, 2 + 2 key/value heads
    # every term counts what it keeps, in any order
    both = peak(objective="logits+ard")
    assert both.parts[qkv] == base.parts[qkv] and both.parts["logits chunk (fp32)"] > 0
    assert peak(blocks=2).peak > base.peak
    assert stages[0].tokens == 40960


def test_the_teacher_is_recomputed_only_where_keeping_its_q_k_v_would_not_fit_one_block(
        models, corpus, tmp_path, monkeypatch):
    from linearard.training import plan

    model = tiny_model("llama", num_hidden_layers=8)
    shape = ModelShape.of(model, model.config)
    scaling = RopeScaling("linear", 4.0, 256, 1024)
    ard = ObjectiveSpec.parse("ard")

    def needs(recompute: bool) -> int:  # one 256-token block, under checkpointing
        cfg = _config(models, corpus, tmp_path, gradient_checkpointing=True)
        return plan._fixed_memory(cfg, shape, 1) + sum(
            plan._stage_memory(cfg, shape, ard, 256, 1, False, recompute).values())

    def stages(budget: int, **kw):
        monkeypatch.setattr(plan, "_memory_budget", lambda device: budget)
        cfg = _config(models, corpus, tmp_path, **{"seq_len": 256, "max_tokens": 1 << 16, **kw})
        return plan.plan_stages(cfg, scaling, shape, world_size=1, device="cpu", bf16=False)

    tight = needs(False) - 1  # the teacher's Q/K/V kept do not fit one block; recomputed they do
    assert needs(True) <= tight
    # the teacher keeps each layer's attention input (hidden 64) instead of its Q/K/V (4 + 2 + 2 heads of 16)
    kept, recomputed = (plan._stage_memory(_config(models, corpus, tmp_path), shape, ard, 256, 1, False, r)
                        for r in (False, True))
    inputs = recomputed["teacher attention inputs (distilled layers)"]
    assert inputs * 2 == kept["teacher Q/K/V (ard, distilled layers)"]
    assert [s.recompute_teacher for s in stages(tight, gradient_checkpointing=True)] == [True]
    assert [s.recompute_teacher for s in stages(tight)] == [False]  # without checkpointing it would save nothing
    monkeypatch.setattr(shape, "num_layers", 2)  # two layers keep no more Q/K/V than recomputing holds
    assert [s.recompute_teacher for s in stages(1, gradient_checkpointing=True)] == [False]
    monkeypatch.setattr(shape, "num_layers", 8)
    assert [s.recompute_teacher for s in stages(1 << 40, gradient_checkpointing=True)] == [False]
    assert [s.recompute_teacher for s in stages(1 << 40, gradient_checkpointing=True, recompute_teacher=True)] == [True]
    assert [s.recompute_teacher for s in stages(tight, gradient_checkpointing=True, recompute_teacher=False)] == [False]
    both = stages(tight, gradient_checkpointing=True, cpt_tokens=1 << 15, cpt_seq_len=256)
    assert [s.recompute_teacher for s in both] == [True, False]  # next-token training has no teacher
    with pytest.raises(UserError, match="--recompute-teacher needs --gradient-checkpointing"):
        _config(models, corpus, tmp_path, recompute_teacher=True).validate()


def test_a_run_that_recomputes_the_teacher_trains_as_one_that_keeps_it(models, corpus, tmp_path, monkeypatch):
    from linearard.models.teacher_student import TeacherStudent

    recomputed, original = [], TeacherStudent.teacher_attention

    def counted(self, layer, call):
        recomputed.append(layer)
        return original(self, layer, call)

    monkeypatch.setattr(TeacherStudent, "teacher_attention", counted)
    logs = {}
    for recompute in (False, True):
        lines = []
        cfg = _config(models, corpus, tmp_path / str(recompute), gradient_checkpointing=True,
                      recompute_teacher=recompute)
        restore(cfg, log=lines.append)
        logs[recompute] = (_losses(cfg.output), "\n".join(lines), len(recomputed))
    assert logs[True][0] == pytest.approx(logs[False][0], rel=1e-5)
    assert "teacher's Q/K/V recomputed in the student's layers" in logs[True][1]
    assert "recomputed" not in logs[False][1]
    assert logs[False][2] == 0 and logs[True][2] > 0  # the run did what its plan says


def test_each_stage_takes_the_same_tokens_per_step_in_micro_batches_that_fit(models, corpus, tmp_path, monkeypatch):
    from linearard.training import plan

    model = tiny_model("llama")
    shape = ModelShape.of(model, model.config)
    scaling = RopeScaling("linear", 4.0, 256, 1024)

    def stages(**kw):
        cfg = _config(models, corpus, tmp_path, **{"max_tokens": 1 << 20, **kw})
        return plan.plan_stages(cfg, scaling, shape, world_size=2, device="cpu", bf16=False)

    restore_stage, cpt = stages(seq_len=64, tokens_per_step=4096, cpt_tokens=1 << 19, cpt_seq_len=1024)
    assert (restore_stage.batch_size, restore_stage.grad_accum, restore_stage.tokens_per_step) == (32, 1, 4096)
    assert (cpt.batch_size, cpt.grad_accum, cpt.tokens_per_step) == (2, 1, 4096)
    assert restore_stage.steps == cpt.steps == (1 << 19) // 4096
    # blocks the memory budget does not fit into one micro-batch are accumulated
    monkeypatch.setattr(plan, "_memory_budget", lambda device: plan._fixed_memory(
        _config(models, corpus, tmp_path), shape, 2) + sum(plan._stage_memory(
            _config(models, corpus, tmp_path), shape, ObjectiveSpec.parse("ard"), 64, 8, False, False).values()))
    (limited,) = stages(seq_len=64, tokens_per_step=4096)
    assert (limited.batch_size, limited.grad_accum) == (8, 4)
    (given,) = stages(seq_len=64, tokens_per_step=4096, batch_size=4)
    assert (given.batch_size, given.grad_accum) == (4, 8)
    (cpu_default,) = stages(seq_len=64)
    assert (cpu_default.batch_size, cpu_default.grad_accum, cpu_default.tokens_per_step) == (1, 1, 128)
    with pytest.raises(UserError, match="--tokens-per-step 4096 contradicts --batch-size 2 x --grad-accum 2"):
        stages(seq_len=64, tokens_per_step=4096, batch_size=2, grad_accum=2)


@pytest.mark.slow
def test_a_short_run_on_the_embedded_model(tmp_path):
    from linearard.models.load import resolve_path

    try:
        resolve_path("smollm2-135m")
    except UserError as err:
        pytest.skip(str(err))
    cfg = build_config(flags=dict(seq_len=64, max_tokens=64 * 4, warmup_steps=1, output=str(tmp_path / "run"),
                                  eval_tokens=128, save_every=0))
    result = restore(cfg, log=_quiet)
    ppl = result.perplexity
    assert ppl["scaled student"] > ppl["teacher"]  # linear x4 hurts short texts before training
    assert all(math.isfinite(v) for v in ppl.values())
    assert (result.export / "model.safetensors").exists()
