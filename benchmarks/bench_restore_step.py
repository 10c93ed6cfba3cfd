"""Restore-step benchmark: the same as `linearard bench restore` (results to benchmarks/results/).

    python benchmarks/bench_restore_step.py --shape smollm2 --lengths 4096,8192
    python benchmarks/bench_restore_step.py --shape llama2-7b --lengths 4096 --longest 8192,16384,32768
"""

import sys

from linearard.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "restore", *sys.argv[1:]]))
