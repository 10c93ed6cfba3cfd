"""Runs of a study on several devices at once: one worker process per device, one run per worker at a time.

The parent plans the study, hands each unfinished run to the next free device as a worker process
(``linearard study <the same options> --only RUN``, with ``CUDA_VISIBLE_DEVICES`` set to that device),
and writes the report when all have ended. A GPU listed n times runs n workers at once, each allowed
1/n of its memory (so each run's memory plan fits beside the others): a small model leaves most of a
large GPU idle while its host launches kernels, and a second worker fills those gaps. Every run
keeps its own folder, so workers never write the same file; a run whose learning rate comes from a
sweep starts once that sweep's runs have ended.
A worker's output goes to ``OUTPUT/logs/<run>.log``.

Example:
    >>> jobs = [Job("native"), Job("ard lr=0.001 (sweep)"), Job("ard", after=("ard lr=0.001 (sweep)",))]
    >>> launch = WorkerLauncher("linearard study --output s", Path("s"), ["0", "1"])
    >>> schedule(jobs, ["0", "1"], launch)  # doctest: +SKIP
    {}
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from linearard.study.arms import slugify

# launch(job, device) -> None when the job finished, else why it did not.
Launch = Callable[["Job", str], "str | None"]


@dataclass(frozen=True)
class Job:
    """One run to carry out: its label, and the labels of the jobs that must end before it starts."""

    label: str
    after: tuple[str, ...] = ()


def schedule(jobs: Sequence[Job], devices: Sequence[str], launch: Launch) -> dict[str, str]:
    """Carry out `jobs` on `devices`, each device running one job at a time, in list order where possible.

    A job starts when every job in its ``after`` has ended (successfully or not: a sweep whose runs
    fail still decides, or refuses, in the job that waits for it); a job that waits for a label no job
    has starts at once. A device listed several times runs that many jobs at once, and the next job
    goes to the least busy device that has a free worker: three jobs on ``0,0,0,1,1,1`` run two on one
    GPU and one on the other, not three on the first.

    Returns:
        label -> error for every job that did not finish (what `launch` said, or the exception it raised).
    """
    pending = list(jobs)
    ended: set[str] = set()
    labels = {j.label for j in jobs}
    failures: dict[str, str] = {}
    lock = threading.Condition()
    workers, running = Counter(devices), Counter[str]()

    def next_job(device: str) -> Job | None:
        with lock:
            while pending:
                ready = [j for j in pending if all(a in ended or a not in labels for a in j.after)]
                least = min(running[d] for d in workers if running[d] < workers[d])
                if ready and running[device] == least:
                    pending.remove(ready[0])
                    running[device] += 1
                    lock.notify_all()  # another device may be the least busy now
                    return ready[0]
                lock.wait()
            lock.notify_all()  # nothing left: let the other workers see it too
            return None

    def worker(device: str) -> None:
        while (job := next_job(device)) is not None:
            try:
                error = launch(job, device)
            except Exception as err:  # one job's crash must not stop the others
                error = f"{type(err).__name__}: {err}"
            with lock:
                if error:
                    failures[job.label] = error
                ended.add(job.label)
                running[device] -= 1
                lock.notify_all()

    threads = [threading.Thread(target=worker, args=(d,), name=f"study-device-{d}", daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def visible_devices() -> list[str]:
    """Every CUDA device this process sees, as indices (empty without CUDA)."""
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


class WorkerLauncher:
    """A `Launch` that runs ``command --only LABEL`` as a process on the given device, logging to a file.

    `command` is the study's own command line (``linearard study ...``); the worker is started as
    ``python -m linearard`` with the same interpreter, so it runs the same installation. `stop` ends
    every running worker and refuses new ones (the parent was interrupted: a rerun must not find
    workers of the old run still writing into the study's folders).
    """

    def __init__(self, command: str, output: Path, devices: Sequence[str]):
        self.program = [sys.executable, "-m", "linearard"]
        self.argv = shlex.split(command)[1:]  # without the program name
        self.threads = max(1, (os.cpu_count() or 1) // max(1, len(devices)))
        self.shares = Counter(d for d in devices if d != "cpu")  # workers per GPU
        self.logs = output / "logs"
        self.running: set[subprocess.Popen] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def __call__(self, job: Job, device: str) -> str | None:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
        env["OMP_NUM_THREADS"] = str(self.threads)
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{slugify(job.label)}.log"
        with open(log_path, "w") as log:
            with self.lock:
                if self.stopped:
                    return "not started: the study was interrupted"
                process = subprocess.Popen([*self.program, *self.argv, "--only", job.label, *self.share(device)],
                                           stdout=log, stderr=subprocess.STDOUT, env=env)
                self.running.add(process)
            code = process.wait()
            with self.lock:
                self.running.discard(process)
        if code == 0:
            return None
        last = _last_line(log_path)
        return f"its worker on device {device} exited with code {code}" + (f": {last}" if last else "") + \
            f" (log: {log_path})"

    def share(self, device: str) -> list[str]:
        """The worker's extra arguments on `device`: its memory fraction when other workers share the GPU."""
        n = self.shares.get(device, 1)
        return ["--memory-fraction", str(1 / n)] if n > 1 else []

    def stop(self, grace: float = 30.0) -> None:
        """Interrupt every running worker (as Ctrl-C would), wait up to `grace` seconds, then kill."""
        with self.lock:
            self.stopped = True
            running = list(self.running)
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
