"""`linearard bench kernel`: argument parsing and result files (the sweep itself needs a GPU)."""

import argparse
import csv
import json

import pytest
import torch

from linearard import bench
from linearard.bench import kernel as bench_kernel
from linearard.errors import UserError


def parse(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_the_issue_sweep():
    args = parse("kernel")
    assert args.lengths == [1024, 4096, 8192, 16384, 32768]
    assert bench_kernel._shapes(args.shapes) == [(32, 128), (9, 64)]
    assert args.dtype == "bfloat16" and args.batch == 1 and args.causal
    assert bench_kernel._impls(args.impls) == ["triton", "sdpa", "naive"]


def test_target_is_positional_and_checked():
    with pytest.raises(SystemExit):
        parse("everything")


@pytest.mark.parametrize("value", ["0", "1x", ""])
def test_bad_lengths_are_argparse_errors(value):
    with pytest.raises(SystemExit):
        parse("kernel", "--lengths", value)


@pytest.mark.parametrize(
    ("flag", "value", "check"), [("--shapes", "32-128", "_shapes"), ("--impls", "cudnn", "_impls")]
)
def test_bad_values_are_user_errors(flag, value, check):
    args = parse("kernel", flag, value)
    with pytest.raises(UserError, match=flag):
        getattr(bench_kernel, check)(getattr(args, flag.removeprefix("--")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_needs_a_gpu():
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        bench.run(parse("kernel", "--lengths", "64"))


ROWS = [
    dict(gpu="NVIDIA H100 80GB HBM3", impl="sdpa", length=1024, fwd_bwd_ms=0.25, note=""),
    dict(gpu="NVIDIA H100 80GB HBM3", impl="naive", length=8192, note="skipped: needs about 96 GiB"),
]


def test_write_csv_json_and_folder(tmp_path):
    csv_path = bench_kernel.write_rows(ROWS, tmp_path / "a.csv")
    read = list(csv.DictReader(csv_path.open()))
    assert list(read[0]) == bench_kernel.FIELDS
    assert read[0]["fwd_bwd_ms"] == "0.25" and read[1]["note"].startswith("skipped")
    json_path = bench_kernel.write_rows(ROWS, tmp_path / "b.json")
    assert json.loads(json_path.read_text()) == ROWS
    named = bench_kernel.write_rows(ROWS, tmp_path)
    assert named.parent == tmp_path and named.name.startswith("relation_kl_nvidia-h100-80gb-hbm3_")
