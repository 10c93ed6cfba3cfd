"""`torchrun --nproc_per_node 2 -m linearard restore --strategy ddp|fsdp` on CPU (gloo) against one process.

Two processes with one block each per step see the same global batch as one process accumulating two
blocks (the corpus is dealt to the ranks round-robin, and not shuffled here), so after the same
optimizer steps the adapters must agree within float tolerance.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from linearard.config import build_config
from linearard.errors import UserError
from linearard.training.checkpoint import latest_checkpoint, read_checkpoint
from linearard.training.loop import restore
from linearard.training.metrics import read_metrics
from tiny import save_tiny, write_corpus

pytestmark = pytest.mark.distributed

SRC = str(Path(__file__).resolve().parents[1] / "src")
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_tiny(root / "model", "qwen3-tied")  # as Qwen3-0.6B: the output embedding is the input one
    write_corpus(root / "data", docs=3, words=120)
    flags = dict(
        model=str(root / "model"), data=[str(root / "data")], seq_len=64, lora_rank=4, lora_alpha=8,
        warmup_steps=1, lr=1e-2, rope_type="yarn", rope_factor=4.0, shuffle_buffer=0, save_every=2,
        eval_tokens=64,
    )
    single = build_config(flags={**flags, "grad_accum": 2, "max_tokens": 64 * 2 * STEPS, "output": str(root / "one"),
                                 "eval": False, "export": False})
    restore(single, log=lambda _: None)
    return root, flags, single


def _torchrun(args, timeout=120, program=("-m", "linearard"), env=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, "restore", *args]
    # its own session, so that a hung run's workers can be ended with it
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _flag_args(flags):
    out = []
    for key, value in flags.items():
        out.append("--" + key.replace("_", "-"))
        out.extend(value if isinstance(value, list) else [str(value)])
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, strategy):
    root, flags, single = setup
    output = root / strategy
    done = _torchrun([*_flag_args({**flags, "max_tokens": 64 * 2 * STEPS, "output": str(output)}),
                      "--strategy", strategy])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 4 steps, 512 tokens") == 1  # only the main process reports

    losses = [r["loss"] for r in read_metrics(output)]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    reference = [r["loss"] for r in read_metrics(single.output)]
    assert losses == pytest.approx(reference, rel=1e-4)

    mine = load_file(latest_checkpoint(output) / "adapters.safetensors")
    theirs = load_file(latest_checkpoint(single.output) / "adapters.safetensors")
    assert mine.keys() == theirs.keys()
    assert all("lora_" in name for name in mine)  # the tied output embedding is not an adapter
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4)
    # the trained adapters really moved away from their initial values
    assert any(name.endswith("lora_B.default.weight") and mine[name].abs().max() > 0 for name in mine)

    # checkpoints remember both processes' data positions, so only a 2-process run may resume them
    state = read_checkpoint(latest_checkpoint(output), rank=1, world_size=2)
    assert state.rank_state["data"]["config"]["rank"] == 1
    assert "held-out perplexity" in done.stdout
    exported = AutoModelForCausalLM.from_pretrained(output / "model")
    assert exported.config.max_position_embeddings == 1024
    assert exported.lm_head.weight is exported.model.embed_tokens.weight


def test_resume_needs_the_same_world_size(setup):
    root, flags, _ = setup
    output = root / "ddp"
    if latest_checkpoint(output) is None:
        pytest.skip("needs the checkpoints of the 2-process DDP run above")
    cfg = build_config(flags={**flags, "max_tokens": 64 * 2 * STEPS, "output": str(output), "resume": True})
    with pytest.raises(UserError, match=r"written by 2 process\(es\) but this run has 1.*--nproc_per_node 2"):
        restore(cfg, log=lambda _: None)


def test_a_signal_to_one_process_stops_all_at_the_same_step(setup):
    # SIGTERM reaches rank 1 only, in step 1; the processes compare their flags at the step-2 checkpoint
    root, flags, single = setup
    output = root / "preempted"
    args = [*_flag_args({**flags, "max_tokens": 64 * 2 * STEPS, "output": str(output)}), "--no-eval"]
    stopped = _torchrun([*args, "--strategy", "ddp"], program=(str(Path(__file__).with_name("torchrun_signal.py")),),
                        env={"SIGNAL_RANK": "1"})
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if "stopped on SIGTERM" in line]
    assert len(lines) == 1, stopped.stderr[-3000:]  # said once, by the main process
    assert "stopped on SIGTERM after step 2" in lines[0]
    command = lines[0].split("continue with: ", 1)[1]
    assert command.startswith("torchrun --nproc_per_node 2 -m linearard restore ") and command.endswith(" --resume")
    state = read_checkpoint(latest_checkpoint(output), rank=1, world_size=2)
    assert state.trainer.step == 2

    resumed = _torchrun([*args, "--strategy", "ddp", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(output)] == pytest.approx(
        [r["loss"] for r in read_metrics(single.output)], rel=1e-4
    )
    mine = load_file(latest_checkpoint(output) / "adapters.safetensors")
    theirs = load_file(latest_checkpoint(single.output) / "adapters.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4)
    assert AutoModelForCausalLM.from_pretrained(output / "model").config.tie_word_embeddings
