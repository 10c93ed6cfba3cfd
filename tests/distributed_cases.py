"""Run several restore cases in one ``torchrun`` launch (one process group, one interpreter start).

    torchrun --nproc_per_node 2 tests/distributed_cases.py CASES.json

CASES.json: ``{"runs": [{"output": DIR, "flags": {...}}, ...]}``; each run is `restore` with those
flags (strategy included). Used by tests/test_distributed.py.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from linearard.config import build_config
from linearard.training.loop import restore


def main(path: str) -> None:
    dist.init_process_group("gloo")
    try:
        for run in json.loads(Path(path).read_text())["runs"]:
            restore(build_config(flags={**run["flags"], "output": run["output"]}), log=lambda _: None)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
