"""Progress lines on stderr, so stdout stays for results."""

from __future__ import annotations

import sys
import time
from typing import Callable

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def worker_log(message: str) -> None:
    """A line from inside a training loop, written to the process's own stderr: Ray forwards that to
    the driver once, whereas Ray Train routes a worker's `print` through its logger and also echoes
    it, so a printed line reached the driver twice."""
    sys.__stderr__.write(message + "\n")
    sys.__stderr__.flush()


class Progress:
    """A progress line at most every `every` seconds, and when the last of `total` is done."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every = total, every
        self.started = self.last = time.perf_counter()

    def update(self, done: int, line: Callable[[float], str]) -> None:
        """`line(rate)` is the message, `rate` the units done per second so far."""
        now = time.perf_counter()
        if now - self.last > self.every or done >= self.total:
            log(line(done / max(now - self.started, 1e-9)))
            self.last = now
