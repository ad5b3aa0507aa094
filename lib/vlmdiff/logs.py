"""Log lines for workflow jobs: timestamped, flushed, to the rule's log file and stderr."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

Log = Callable[[str], None]
"""What jobs and library functions report progress to: one line per call."""


def job_logger(log_path: str | Path | None, name: str = "vlmdiff") -> Log:
    """A `log(msg)` function; the file is the rule's `log:` so progress shows up there."""
    logger = logging.getLogger(f"{name}.{log_path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger.info


def start_job(log_path: str | Path | None, threads: int | None = None) -> Log:
    """What a workflow script does first: the job's `log(msg)` (see `job_logger`) and, given
    `threads` (the rule's `threads:`), torch's intra-op thread count. torch is imported only
    then, so jobs that only read and write tables never import it."""
    log = job_logger(log_path)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return log


def progress_line(what: str, done: int, total: int, start: float, unit: str = "") -> str:
    """ "what: done/total unit (rate unit/s, ETA)" for a loop begun at `start`
    (`time.perf_counter()`)."""
    elapsed = time.perf_counter() - start
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    u = f" {unit}" if unit else ""
    return f"{what}: {done}/{total}{u} ({rate:,.1f}{u}/s, {elapsed:.0f}s elapsed, ETA {eta:.0f}s)"


class Progress:
    """`progress_line`s for a long loop, at most one per `every_s` seconds, and the last one."""

    def __init__(
        self,
        name: str,
        total: int,
        log: Log,
        unit: str = "rows",
        every_s: float = 5.0,
    ) -> None:
        self.name, self.total, self.log, self.unit = name, total, log, unit
        self.every_s = every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        self.log(progress_line(self.name, done, self.total, self.start, self.unit))
