"""Progress lines on stderr, so stdout stays for results; everything else a run's processes print
goes to the run's log file.

A command on a run directory names that run's log (`use_run_log`: `<run>/logs/run.log`, or a local
file for a run on a store). The Ray session it starts sends Ray's own driver messages there, and
every worker process of a local session (engines, Train workers, Serve replicas) sends its whole
output there (`send_output_to_run_log`): vLLM's, DeepSpeed's and transformers' start-up warnings
and progress bars are a log's business, not the terminal's. cotrec's own lines (`log`,
`worker_log`) keep the terminal: a worker writes them to the stream Ray forwards to the driver.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

_START = time.perf_counter()
RUN_LOG_ENV = "COTREC_RUN_LOG"  # set for a local session's workers: where their output goes
_terminal: Optional[TextIO] = None  # a worker whose output goes to the run log: the stream Ray forwards
_run_log: Optional[Path] = None


def _progress_stream() -> TextIO:
    return _terminal if _terminal is not None else sys.stderr


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=_progress_stream(), flush=True)


def worker_log(message: str) -> None:
    """A line from inside a training loop, written to the stream Ray forwards to the driver once:
    Ray Train routes a worker's `print` through its logger and also echoes it, so a printed line
    reached the driver twice."""
    stream = _terminal if _terminal is not None else sys.__stderr__
    stream.write(message + "\n")
    stream.flush()


def run_log_path(root: Any) -> Path:
    """A run's log file: `<run>/logs/run.log` on disk; for a run on a store, a local file named after
    it (appending to an object is not a store's operation)."""
    from cotrec.storage import is_remote

    if not is_remote(root):
        return Path(root) / "logs" / "run.log"
    digest = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return Path(tempfile.gettempdir()) / "cotrec-logs" / f"{Path(str(root)).name}-{digest}.log"


def use_run_log(root: Any) -> Path:
    """Make `root`'s log file the one this process's Ray session writes to (see the module's doc)."""
    global _run_log
    _run_log = run_log_path(root)
    _run_log.parent.mkdir(parents=True, exist_ok=True)
    return _run_log


def run_log() -> Optional[Path]:
    return _run_log


def send_native_errors_to_run_log() -> None:
    """In a command's own process: what native code writes to the error descriptor (Ray's core
    worker, glog) to the run log; Python's writes (progress lines, errors, tracebacks, the lines Ray
    forwards from workers) keep the terminal through a duplicate of it."""
    if _run_log is None or getattr(sys.stderr, "_cotrec_terminal", False):
        return
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    terminal._cotrec_terminal = True  # type: ignore[attr-defined]
    target = os.open(_run_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = terminal


def send_ray_messages_to_run_log(loggers: tuple[str, ...] = ("ray", "ray.data")) -> None:
    """Ray's own driver messages (session start, dataset plans, deprecations) to the run log; its
    errors still reach the terminal too. Called before Ray starts (which keeps the handlers it finds)."""
    if _run_log is None:
        return
    to_file = logging.FileHandler(_run_log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.ERROR)
    for name in loggers:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # Ray Data's console handler
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
        logger.setLevel(logging.INFO)
        logger.addHandler(to_file)
        logger.addHandler(to_terminal)
        logger.propagate = False


def send_output_to_run_log() -> None:
    """In a worker process with RUN_LOG_ENV set: its standard output and error (at the descriptor,
    so native code and child processes too) to the run log, cotrec's lines to what Ray forwards."""
    global _terminal
    path = os.environ.get(RUN_LOG_ENV)
    if not path or _terminal is not None:
        return
    _terminal = os.fdopen(os.dup(2), "w", buffering=1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(target, 1)
    os.dup2(target, 2)
    os.close(target)


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
