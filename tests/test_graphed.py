"""Optimizer steps replayed from a CUDA graph: the optimizer and scheduler state it needs round-trips
through a checkpoint; on a GPU, graph-replayed steps train as eager ones (one process, tied and untied
embeddings, compiled layers too; DDP under torchrun, its all-reduce recorded too) and resume after a stop."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linearard.config import build_config
from linearard.errors import Interrupted
from linearard.training.checkpoint import latest_checkpoint
from linearard.training.graphed import make_capturable, portable_state
from linearard.training.interrupt import StopRequest
from linearard.training.loop import restore
from linearard.training.metrics import read_metrics
from linearard.training.schedule import current_lr, lr_factor, warmup_cosine
from tiny import save_tiny, write_corpus

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _optimizer(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    return params, optimizer, warmup_cosine(optimizer, warmup_steps=2, total_steps=6, min_ratio=0.1)


def _step(params, optimizer, scheduler):
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()


def test_capturable_state_goes_to_a_checkpoint_as_an_eager_run_reads_it():
    params, optimizer, scheduler = _optimizer()
    _step(params, optimizer, scheduler)
    make_capturable(optimizer)
    group = optimizer.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor)
    assert all(optimizer.state[p]["step"].dtype == torch.float32 for p in params)
    scheduler.step()  # the scheduler fills the tensor in place
    assert current_lr(scheduler) == pytest.approx(1e-2 * lr_factor(2, warmup_steps=2, total_steps=6, min_ratio=0.1))
    assert group["lr"].item() == pytest.approx(current_lr(scheduler))

    saved_optimizer, saved_scheduler = portable_state(optimizer.state_dict()), portable_state(scheduler.state_dict())
    json.dumps(saved_scheduler)  # the trainer state is JSON
    assert isinstance(saved_optimizer["param_groups"][0]["lr"], float)
    assert saved_optimizer["param_groups"][0]["capturable"] is False

    # an eager optimizer continues from it exactly as the original would have without graphs
    ref_params, ref_optimizer, ref_scheduler = _optimizer()
    _step(ref_params, ref_optimizer, ref_scheduler)
    ref_scheduler.step()
    new_params, new_optimizer, new_scheduler = _optimizer(seed=1)
    with torch.no_grad():
        for new, ref in zip(new_params, ref_params):
            new.copy_(ref)
    new_optimizer.load_state_dict(saved_optimizer)
    new_scheduler.load_state_dict(saved_scheduler)
    assert new_optimizer.param_groups[0]["lr"] == pytest.approx(ref_optimizer.param_groups[0]["lr"])
    for _ in range(3):
        _step(ref_params, ref_optimizer, ref_scheduler)
        _step(new_params, new_optimizer, new_scheduler)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(new_params, ref_params))


def test_graphs_refuse_what_their_recording_does_not_cover(tmp_path):
    from linearard.errors import UserError

    with pytest.raises(UserError, match="--cuda-graphs and --gradient-checkpointing"):
        build_config(flags=dict(cuda_graphs=True, gradient_checkpointing=True)).validate()
    with pytest.raises(UserError, match="--cuda-graphs does not record FSDP's steps: leave it off with --strategy"):
        build_config(flags=dict(cuda_graphs=True, strategy="fsdp")).validate()
    if not torch.cuda.is_available():
        config = build_config(flags=dict(cuda_graphs=True, max_tokens=512, seq_len=64, output=str(tmp_path / "r")))
        with pytest.raises(UserError, match="--cuda-graphs needs a CUDA device"):
            restore(config, log=lambda _: None)


def test_the_plan_says_how_steps_are_launched():
    from linearard.errors import UserError
    from linearard.training.plan import dry_run_plan

    def processes(**flags):
        plan = dry_run_plan(build_config(flags=dict(max_tokens=40_000, tokens_per_step=1024, **flags)))
        return next(line for line in plan.describe().splitlines() if line.strip().startswith("processes"))

    assert processes(device="cuda").endswith("bf16 autocast, compiled layers, steps replayed from a CUDA graph")
    assert processes(device="cuda", gradient_checkpointing=True).endswith("gradient checkpointing, compiled layers")
    assert processes(device="cuda", compile=False).endswith("bf16 autocast, steps replayed from a CUDA graph")
    assert processes(device="cpu").endswith("on cpu, fp32")
    with pytest.raises(UserError, match="--cuda-graphs needs a CUDA device"):
        processes(device="cpu", cuda_graphs=True)
    # DDP records its steps when asked to, and only when every stage trains every adapter: its search for
    # adapters without a gradient reads the device each step
    assert processes(device="cuda", strategy="ddp").endswith("bf16 autocast, compiled layers")
    assert processes(device="cuda", strategy="ddp", cuda_graphs=True).endswith("steps replayed from a CUDA graph")
    assert processes(device="cuda", layers="0-1").endswith("steps replayed from a CUDA graph")
    # under torchrun the plan names the process's own GPU, and says the same
    plan = dry_run_plan(build_config(flags=dict(max_tokens=40_000, tokens_per_step=1024, device="cuda",
                                                strategy="ddp", cuda_graphs=True)))
    own_gpu = dataclasses.replace(plan, device="cuda:1")
    assert own_gpu.graphs and "on cuda:1, bf16 autocast, compiled layers, steps replayed" in own_gpu.describe()
    with pytest.raises(UserError, match=r"--cuda-graphs with --strategy ddp needs every adapter trained in every "
                                        r"stage, and the restore stage's objective reaches 12 of 180 adapter tensors"):
        processes(device="cuda", strategy="ddp", cuda_graphs=True, layers="0-1")


@pytest.fixture(scope="module", params=["llama", "qwen3-tied"])
def model_and_corpus(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("graphed")
    return str(save_tiny(root / request.param, request.param)), str(write_corpus(root / "corpus", docs=4, words=300))


def _run(model_and_corpus, folder, **overrides):
    model, corpus = model_and_corpus
    flags = dict(
        model=model, data=[corpus], seq_len=64, tokens_per_step=64 * 4, batch_size=2, max_tokens=64 * 4 * 12,
        lora_rank=4, lora_alpha=8, warmup_steps=2, lr=1e-2, rope_type="linear", rope_factor=8.0,
        precision="fp32", compile=False, device="cuda", output=str(folder), save_every=4, eval=False, export=False,
    )
    return build_config(flags={**flags, **overrides})


def _adapters(config):
    return load_file(latest_checkpoint(config.output) / "adapters.safetensors")


def _worst_difference(a, b):
    """The largest relative difference (in norm) between two runs' adapters."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-12)) for k in a)


@gpu
@pytest.mark.gpu
def test_graph_replayed_steps_train_as_eager_steps_and_resume_after_a_stop(model_and_corpus, tmp_path, monkeypatch):
    eager = _run(model_and_corpus, tmp_path / "eager", cuda_graphs=False)
    restore(eager, log=lambda _: None)
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), real_replay(graph)))
    graphed = _run(model_and_corpus, tmp_path / "graphed", cuda_graphs=True)
    restore(graphed, log=lambda _: None)
    assert len(replays) == 12 - 3  # three eager steps, then every step from the graph
    losses = [[r["loss"] for r in read_metrics(c.output)] for c in (eager, graphed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # the graph's optimizer keeps its step count and bias corrections on the device, in fp32
    a, b = _adapters(eager), _adapters(graphed)
    assert _worst_difference(a, b) < 1e-3

    # a stop after step 6 (a replayed one) writes a checkpoint; the resumed run records its own graph
    stopped = _run(model_and_corpus, tmp_path / "stopped", cuda_graphs=True, save_every=0)
    monkeypatch.setattr(StopRequest, "due", lambda self, step, ctx, checkpoint: step == 6)
    with pytest.raises(Interrupted):
        restore(stopped, log=lambda _: None)
    monkeypatch.undo()
    resumed = build_config(flags={**stopped.to_dict(), "resume": True})
    restore(resumed, log=lambda _: None)
    assert _worst_difference(b, _adapters(resumed)) < 1e-3


@gpu
@pytest.mark.gpu
def test_the_cuda_default_compiled_layers_replayed_trains_as_eager_layers_from_four_graphs(model_and_corpus, tmp_path):
    import torch._dynamo.utils

    eager = _run(model_and_corpus, tmp_path / "eager", cuda_graphs=False)
    restore(eager, log=lambda _: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _run(model_and_corpus, tmp_path / "compiled", compile=True)
    assert compiled.replays_graphs("cuda")
    restore(compiled, log=lambda _: None)
    # the teacher and the student, each a graph on either side of the Q/K/V capture
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4
    losses = [[r["loss"] for r in read_metrics(c.output)] for c in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert _worst_difference(_adapters(eager), _adapters(compiled)) < 1e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_ddp_steps_replayed_from_a_graph_train_as_eager_ddp_steps(model_and_corpus, tmp_path, reduce_dtype):
    """torchrun with one process per GPU present (NCCL): DDP's gradient hooks and all-reduce, recorded in the
    graph, train as DDP's eager steps; 16 steps: DDP's 11 eager ones, then replays."""
    configs = {
        graphs: _run(model_and_corpus, tmp_path / f"graphs_{graphs}", strategy="ddp", reduce_dtype=reduce_dtype,
                     cuda_graphs=graphs, max_tokens=64 * 4 * 16, save_every=0)
        for graphs in (False, True)
    }
    for graphs, config in configs.items():
        saved = tmp_path / f"graphs_{graphs}.yaml"
        config.save(saved)
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             str(torch.cuda.device_count()), "-m", "linearard", "restore", "--config", str(saved)],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
            capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("steps replayed from a CUDA graph" in done.stdout) == graphs
    losses = [[r["loss"] for r in read_metrics(c.output)] for c in configs.values()]
    assert len(losses[1]) == 16 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert _worst_difference(*(_adapters(c) for c in configs.values())) < 1e-3
