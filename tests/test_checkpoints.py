"""Nothing lost: checkpoints of tied and untied models resume and export, damaged ones are passed over,
SIGINT/SIGTERM stop with a checkpoint, and SIGKILL at any moment costs only the steps since the last one."""

import json
import os
import random
import shlex
import shutil
import signal
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from linearard.cli import main
from linearard.config import build_config
from linearard.errors import Interrupted, UserError
from linearard.export import export_checkpoint
from linearard.training import checkpoint as ckpt
from linearard.training.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from linearard.training.loop import _Run, restore
from linearard.training.metrics import read_metrics
from tiny import TIED, byte_tokenizer, is_tied, tiny_model, write_corpus

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return str(write_corpus(tmp_path_factory.mktemp("corpus"), docs=3, words=80))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """variant -> a saved tiny model folder (made on first use)."""
    root = tmp_path_factory.mktemp("models")

    def make(variant):
        folder = root / variant
        if not folder.exists():
            tiny_model(variant).save_pretrained(folder)
            byte_tokenizer().save_pretrained(folder)
        return str(folder)

    return make


def _flags(model, corpus, output, **overrides):
    flags = dict(
        model=model, data=[corpus], seq_len=SEQ, max_tokens=SEQ * 4, lora_rank=4, lora_alpha=8, warmup_steps=1,
        lr=1e-2, rope_type="longrope" if "phi3" in model else "linear", rope_factor=4.0, output=str(output),
        save_every=2, eval=False, export=False, shuffle_buffer=8, lora_dropout=0.1,
    )
    flags.update(overrides)
    return flags


def _quiet(_):
    return None


def _adapters(run):
    # copies: load_file maps the file, and some tests cut checkpoint files short afterwards
    return {k: v.clone() for k, v in load_file(latest_checkpoint(run) / "adapters.safetensors").items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _resume_from_older(run, copy):
    """A copy of a finished run whose newest checkpoint is gone: resuming it must redo those steps exactly."""
    shutil.copytree(run, copy)
    shutil.rmtree(latest_checkpoint(copy))
    return copy


@pytest.mark.parametrize("variant", TIED)
def test_tied_models_checkpoint_resume_and_export(model_dir, corpus, tmp_path, variant):
    model = model_dir(variant)
    assert is_tied(AutoModelForCausalLM.from_pretrained(model))
    flags = _flags(model, corpus, tmp_path / "run")
    restore(build_config(flags=flags), log=_quiet)
    saved = _adapters(flags["output"])
    # exactly the trainable tensors: the tied output embedding is the frozen input embedding, not an adapter
    assert saved and all("lora_" in name for name in saved), sorted(saved)

    copy = _resume_from_older(tmp_path / "run", tmp_path / "copy")
    restore(build_config(flags={**flags, "output": str(copy), "resume": True}), log=_quiet)
    _assert_same(_adapters(copy), saved)
    assert [r["loss"] for r in read_metrics(copy)] == [r["loss"] for r in read_metrics(flags["output"])]

    exported = export_checkpoint(flags["output"], tmp_path / "merged", log=_quiet)
    merged = AutoModelForCausalLM.from_pretrained(exported)
    assert is_tied(merged)
    torch.testing.assert_close(merged.lm_head.weight, AutoModelForCausalLM.from_pretrained(model).lm_head.weight)


def test_older_checkpoints_with_the_tied_copy_still_load(model_dir, corpus, tmp_path):
    # linearard 0.1 saved the tied output embedding among the adapters; resume and export drop it
    model = model_dir("llama-tied")
    flags = _flags(model, corpus, tmp_path / "run")
    restore(build_config(flags=flags), log=_quiet)
    saved = _adapters(flags["output"])
    copy = _resume_from_older(tmp_path / "run", tmp_path / "copy")
    older = latest_checkpoint(copy)
    tensors = load_file(older / "adapters.safetensors")
    tensors["base_model.model.lm_head.weight"] = tiny_model("llama-tied").lm_head.weight.detach()
    save_file(tensors, older / "adapters.safetensors")
    (older / ckpt.MANIFEST).unlink()  # as 0.1 wrote it
    restore(build_config(flags={**flags, "output": str(copy), "resume": True}), log=_quiet)
    _assert_same(_adapters(copy), saved)
    export_checkpoint(older, tmp_path / "merged", log=_quiet)

    tensors["base_model.model.model.layers.0.mlp.nonsense"] = torch.zeros(1)
    save_file(tensors, older / "adapters.safetensors")
    with pytest.raises(UserError, match=r"do not match .*unexpected \['base_model.model.model.layers.0.mlp"):
        export_checkpoint(older, tmp_path / "merged2", log=_quiet)


@pytest.mark.parametrize("damaged", ["adapters.safetensors", "optimizer.pt"])
def test_resume_passes_over_a_damaged_newest_checkpoint(model_dir, corpus, tmp_path, damaged):
    flags = _flags(model_dir("llama"), corpus, tmp_path / "run", max_tokens=SEQ * 2, save_every=1)
    restore(build_config(flags=flags), log=_quiet)
    reference = _adapters(flags["output"])
    newest = latest_checkpoint(flags["output"])
    file = newest / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert verify_checkpoint(newest).startswith(f"{damaged} is {file.stat().st_size} bytes, not ")
    lines = []
    restore(build_config(flags={**flags, "resume": True}), log=lines.append)
    assert any(line.startswith(f"skipping checkpoint {newest}: {damaged} is ") for line in lines), lines
    assert any("resuming from" in line and "step-00000001" in line for line in lines)
    _assert_same(_adapters(flags["output"]), reference)

    # an export of the run folder takes the newest intact checkpoint too; a damaged one named directly is refused
    file.write_bytes(b"x")
    with pytest.raises(UserError, match=rf"checkpoint .*step-00000002 is damaged: {damaged} is 1 bytes"):
        export_checkpoint(newest, tmp_path / "merged", log=_quiet)


# -- SIGINT / SIGTERM ---------------------------------------------------------------------------------


def _signal_on_step(monkeypatch, step, *signals):
    calls = {"n": 0}
    original = _Run._objective_step

    def step_then_signal(self, batch):
        calls["n"] += 1
        if calls["n"] == step:
            for sig in signals:
                os.kill(os.getpid(), sig)
        return original(self, batch)

    monkeypatch.setattr(_Run, "_objective_step", step_then_signal)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint(model_dir, corpus, tmp_path, monkeypatch, capsys, sig):
    flags = _flags(model_dir("qwen2-tied"), corpus, tmp_path / "run", max_tokens=SEQ * 3, save_every=0)
    args = ["restore", *_cli(flags)]
    _signal_on_step(monkeypatch, 2, sig)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 128 + sig
    assert [p.name for p in list_checkpoints(flags["output"])] == ["step-00000002"]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"linearard restore: stopped on {signal.Signals(sig).name} after step 2; checkpoint ")
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[:2] == ["linearard", "restore"] and command[-1] == "--resume"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.undo()
    assert main(command[1:]) == 0
    reference = tmp_path / "reference"
    restore(build_config(flags={**flags, "output": str(reference)}), log=_quiet)
    _assert_same(_adapters(flags["output"]), _adapters(reference))
    assert [r["loss"] for r in read_metrics(flags["output"])] == [r["loss"] for r in read_metrics(reference)]


def test_a_second_ctrl_c_stops_at_once(model_dir, corpus, tmp_path, monkeypatch):
    flags = _flags(model_dir("llama"), corpus, tmp_path / "run", max_tokens=SEQ * 3, save_every=0)
    _signal_on_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        restore(build_config(flags=flags), log=_quiet)
    assert list_checkpoints(flags["output"]) == []


def test_interrupted_is_not_a_user_error():
    assert not issubclass(Interrupted, UserError)


def _cli(flags):
    out = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out.extend([flag, *(value if isinstance(value, list) else [str(value)])])
    return out


# -- SIGKILL at random moments ---------------------------------------------------------------------------

def _child(flags, kill_at, where):
    """Run (or resume) the restore in a forked process that SIGKILLs itself at event number `kill_at`:
    before or after a training step, or before or after writing each part of a checkpoint. The event
    it dies at is written to `where` first; a finished run writes "done"."""
    Path(where).unlink(missing_ok=True)
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return status
    code = 1
    try:
        torch.set_num_threads(1)  # the same arithmetic in every process, so resumed runs match bit for bit
        events = {"n": 0}

        def hooked(fn, label):
            def wrapper(*args, **kwargs):
                for _ in range(2):
                    events["n"] += 1
                    if events["n"] == kill_at:
                        Path(where).write_text(label)
                        os.kill(os.getpid(), signal.SIGKILL)
                    if _ == 0:
                        out = fn(*args, **kwargs)
                return out
            return wrapper

        _Run._objective_step = hooked(_Run._objective_step, "step")
        ckpt.save_file = hooked(ckpt.save_file, "checkpoint")
        ckpt._write_manifest = hooked(ckpt._write_manifest, "checkpoint")
        ckpt._fsync_tree = hooked(ckpt._fsync_tree, "checkpoint")
        ckpt.torch = _TorchWithHookedSave(hooked(torch.save, "checkpoint"))
        resume = bool(list_checkpoints(flags["output"]))
        restore(build_config(flags={**flags, "resume": resume}), log=_quiet)
        Path(where).write_text("done")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


class _TorchWithHookedSave:
    def __init__(self, save):
        self.save = save

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.fixture
def no_tqdm_monitor(monkeypatch):
    """No tqdm monitor thread: a forked child would inherit its lock, held or not."""
    from tqdm import tqdm

    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
    monkeypatch.setattr(tqdm, "monitor_interval", 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_random_moments_loses_nothing(model_dir, corpus, tmp_path, no_tqdm_monitor):
    flags = _flags(model_dir("llama-tied"), corpus, tmp_path / "reference", save_every=1, keep_checkpoints=1)
    where = tmp_path / "where"
    assert os.waitstatus_to_exitcode(_child(flags, 0, where)) == 0
    reference = _adapters(flags["output"])
    # a life has 2 events per step and 10 per checkpoint (adapters, optimizer, rank file, manifest, fsync):
    # 48 in the whole run; three kills at random events, then a life that finishes
    kills = {"step": 0, "checkpoint": 0}
    for seed in range(3):
        rng = random.Random(seed)
        run = {**flags, "output": str(tmp_path / f"seed{seed}")}
        for life in range(4):
            status = _child(run, rng.randint(1, 30) if life < 3 else 0, where)
            if status == 0 and where.read_text() == "done":
                break
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            kills[where.read_text()] += 1
        assert where.read_text() == "done"
        _assert_same(_adapters(run["output"]), reference)
        assert json.loads((latest_checkpoint(run["output"]) / "trainer.json").read_text())["step"] == 4
    assert kills["step"] and kills["checkpoint"], kills
