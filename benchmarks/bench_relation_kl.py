"""Relation-KL kernel benchmark: the same sweep as `linearard bench kernel` (results to benchmarks/results/).

Needs a CUDA GPU and Triton.

    python benchmarks/bench_relation_kl.py                 # the full sweep
    python benchmarks/bench_relation_kl.py --lengths 4096 --shapes 32x128
"""

import sys
from pathlib import Path

from linearard.cli import main

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    sys.exit(main(["bench", "kernel", "--output", str(results), *sys.argv[1:]]))
