"""`torchrun --nproc_per_node 2 -m linearard restore --strategy ddp|fsdp` on CPU (gloo) against one process.

Two processes with one block each per step see the same global batch as one process accumulating two
blocks (the corpus is dealt to the ranks round-robin, and not shuffled here), so after the same
optimizer steps the adapters must agree within float tolerance.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from linearard.config import build_config
from linearard.errors import UserError
from linearard.objectives import ObjectiveSpec
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


def _torchrun(args, timeout=120, program=("-m", "linearard", "restore"), env=None):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, *args]
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


# compiled layers: what torchrun runs on CUDA by default, here with inductor's CPU code
@pytest.mark.parametrize(("strategy", "compiled"), [("ddp", False), ("fsdp", False), ("ddp", True)])
def test_two_processes_match_one(setup, strategy, compiled):
    root, flags, single = setup
    output = root / (strategy + "-compiled" * compiled)
    done = _torchrun([*_flag_args({**flags, "max_tokens": 64 * 2 * STEPS, "output": str(output)}),
                      "--strategy", strategy, *["--compile"] * compiled], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: 4 steps, 512 tokens") == 1  # only the main process reports
    assert ("compiled layers" in done.stdout) == compiled

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
    signal_program = (str(Path(__file__).with_name("torchrun_signal.py")), "restore")
    stopped = _torchrun([*args, "--strategy", "ddp"], program=signal_program, env={"SIGNAL_RANK": "1"})
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


# Objective settings whose terms reach some adapters and not others (the deepest layer's unused
# projections, the layers past the deepest distilled one), and every objective alone.
CASES = {
    "cpt": {"objective": "cpt"},
    "logits": {"objective": "logits"},
    "hidden": {"objective": "hidden"},
    "attention": {"objective": "attention"},
    "hidden-layer-0": {"objective": "hidden", "layers": "0"},
    "no-q": {"relations": {"k": 1.0, "v": 1.0}},
    "no-k": {"relations": {"q": 1.0, "k": 0.0, "v": 1.0}},
    "no-v": {"relations": {"q": 1.0, "k": 1.0, "v": 0.0}},
    "layer-0": {"layers": "0"},
    "logits+ard": {"objective": "logits+ard"},
    "ard+cpt": {"objective": "ard+cpt", "weights": {"cpt": 0.5}},
    "bf16-reduce": {"reduce_dtype": "bf16"},  # the one process it is compared with reduces nothing
    # the teacher's Q/K/V recomputed inside each checkpointed student layer, FSDP's gathered weights too
    "recomputed-teacher": {"gradient_checkpointing": True, "recompute_teacher": True},
}
CASE_STEPS = 2


@pytest.fixture(scope="module")
def cases(setup):
    """Every case under DDP and FSDP in one torchrun launch, and in one process for reference."""
    root, flags, _ = setup
    base = {**flags, "max_tokens": 64 * 2 * CASE_STEPS, "eval": False, "export": False}
    runs = [{"output": str(root / "cases" / strategy / name), "flags": {**base, **case, "strategy": strategy}}
            for strategy in ("ddp", "fsdp") for name, case in CASES.items()]
    (root / "cases.json").write_text(json.dumps({"runs": runs}))
    done = _torchrun([str(root / "cases.json")], timeout=600,
                     program=[str(Path(__file__).with_name("distributed_cases.py"))])
    for name, case in CASES.items():
        alone = {k: v for k, v in case.items() if k != "reduce_dtype"}
        config = build_config(flags={**base, **alone, "grad_accum": 2, "output": str(root / "cases" / "one" / name)})
        restore(config, log=lambda _: None)
    return root, done


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_setting_matches_one_process(cases, case, strategy):
    root, done = cases
    assert done.returncode == 0, done.stderr[-3000:]
    output, single = root / "cases" / strategy / case, root / "cases" / "one" / case
    losses = [r["loss"] for r in read_metrics(output)]
    assert len(losses) == CASE_STEPS
    # Averaged in bf16, each process's gradients lose all but 8 bits of mantissa first: the same steps up to
    # that rounding, which the loss and the gradient norm show. The adapters are not compared element by
    # element there: where two processes' gradients nearly cancel, the rounding can flip the sign of an
    # Adam update (a move of the whole learning rate).
    bf16 = case == "bf16-reduce"
    rel = 1e-3 if bf16 else 1e-4
    assert losses == pytest.approx([r["loss"] for r in read_metrics(single)], rel=rel)
    norms, exact = ([r["grad_norm"] for r in read_metrics(run)] for run in (output, single))
    assert norms == pytest.approx(exact, rel=rel)  # averaged, not summed
    if bf16:  # and really rounded: fp32 reductions agree to about 1e-7 here, bf16 ones to about 3e-5
        assert max(abs(n - e) / e for n, e in zip(norms, exact)) > 1e-6
    mine = load_file(latest_checkpoint(output) / "adapters.safetensors")
    theirs = load_file(latest_checkpoint(single) / "adapters.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine if not bf16 else ():
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-5, rtol=1e-4)
    # what the spec says the objective cannot reach was left alone (LoRA's B starts at zero)
    spec = build_config(yaml_source=output / "config.yaml").objective_spec()
    unreached = [n for n in mine if not spec.reaches(n, 2)]
    assert all(not mine[n].any() for n in unreached if "lora_B" in n)
    if case.startswith(("no-", "layer-", "hidden-layer-")):
        assert unreached
    assert ObjectiveSpec.from_dict(yaml.safe_load((output / "objective.yaml").read_text())["restore"]) == spec


def test_the_bf16_hook_averages_gradients_rounded_to_bf16(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from linearard.training.distributed import bf16_average

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        layer = torch.nn.Linear(37, 5)
        inputs = torch.randn(3, 37)
        layer(inputs).pow(2).sum().backward()
        exact = layer.weight.grad.clone()
        layer.zero_grad()
        wrapped = DistributedDataParallel(layer)
        wrapped.register_comm_hook(None, bf16_average)
        wrapped(inputs).pow(2).sum().backward()
        del wrapped  # DDP's reducer holds the process group: freed after the group ends, it can hang
    finally:
        dist.destroy_process_group()
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, exact.to(torch.bfloat16).float())  # one process: the average is itself
    assert not torch.equal(layer.weight.grad, exact)


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_distributed.py"


def _bench():
    """The benchmark script as a module (it lives outside the package)."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_distributed
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench_distributed


def test_the_distributed_benchmark_checks_its_adapters_against_one_process(setup, tmp_path):
    """What the GPU scaling runs record: N processes' final adapters, and one process's with its batch split
    otherwise, against one process's with the same global batch: within bf16 rounding (here fp32 on CPU:
    much closer)."""
    root = setup[0]
    args = ["--device", "cpu", "--model", str(root / "model"), "--data", str(root / "data"), "--seq-len", "64",
            "--tokens-per-step", "128", "--steps", "3"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for name, extra in (("one", []), ("split", ["--batch-size", "1"])):
        run = subprocess.run([sys.executable, str(BENCH), *args, *extra, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
    two = _torchrun([*args, "--strategy", "ddp", "--out", str(tmp_path / "ddp")], program=(str(BENCH),))
    assert two.returncode == 0, two.stderr[-2000:]
    folders = [str(tmp_path / name) for name in ("ddp", "split", "one")]
    merged = subprocess.run([sys.executable, str(BENCH), "--merge", *folders, "--results", str(tmp_path / "rows.json")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr[-2000:]
    ddp, split, single = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert "adapters_vs_one_process" not in single and ddp["world_size"] == 2 and split["batch_size"] == 1
    assert single["precision"] == ddp["precision"] == "fp32"
    assert single["micro_batches"] == [2, 1] and split["micro_batches"] == [1, 2] and ddp["micro_batches"] == [1, 1]
    assert ddp["first_step"]["loss"] == pytest.approx(single["first_step"]["loss"], rel=1e-5)
    assert ddp["scaling_efficiency"] == pytest.approx(ddp["tokens_per_s"] / 2 / single["tokens_per_s"], abs=1e-3)
    assert "scaling_efficiency" not in split
    for row in (ddp, split):
        check = row["adapters_vs_one_process"]
        assert check["within_bf16_rounding"] and check["relative_difference"] < 1e-4 < check["bf16_rounding"]

    # the check itself: a difference beyond bf16 rounding in one tensor is found and named
    compare_adapters = _bench().compare_adapters
    final = read_checkpoint(latest_checkpoint(tmp_path / "one" / "run")).adapters
    name = sorted(final)[3]
    moved = {**final, name: final[name] * 1.01}
    assert compare_adapters(final, final)["relative_difference"] == 0
    check = compare_adapters(moved, final)
    assert check["worst_tensor"] == name and not check["within_bf16_rounding"]
    assert check["relative_difference"] == pytest.approx(0.01, rel=1e-6)


def test_the_distributed_benchmark_pairs_each_run_with_one_process_of_the_same_batch_and_precision():
    reference_run = _bench().reference_run
    run = dict(model="m", rope_factor=4.0, seq_len=1024, tokens_per_step=32768, steps=3, precision="bf16",
               world_size=1, batch_size=None)
    rows = [dict(run, world_size=2), dict(run, precision="fp32"), dict(run, batch_size=16), dict(run, steps=4),
            dict(run), dict(run, precision="fp32", world_size=2)]
    assert [reference_run(row, rows) for row in rows] == [4, None, 4, None, None, 1]
