"""`linearard restore` under torchrun, with SIGTERM sent to one process (rank $SIGNAL_RANK) during its
first training step: what a cluster does to a preempted job, as seen by one node (tests/test_distributed.py)."""

import os
import signal
import sys

from linearard.cli import main
from linearard.training.loop import _Run

_original = _Run._objective_step
_calls = {"n": 0}


def _step_with_signal(self, batch):
    _calls["n"] += 1
    if _calls["n"] == 1 and os.environ["RANK"] == os.environ["SIGNAL_RANK"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return _original(self, batch)


if __name__ == "__main__":
    _Run._objective_step = _step_with_signal
    sys.exit(main())
