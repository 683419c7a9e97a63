"""A run's histories for the retriever's trainings and evaluations: read once, as flat arrays, and in
a Ray job put in the object store once, with the training rows' Ray Datasets cut from them."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import numpy as np

from cotrec.heap import return_freed_memory
from cotrec.progress import log
from cotrec.retriever.data import sequence_arrays
from cotrec.retriever.ingest import training_dataset
from cotrec.rundir import RunDir, read_table


def read_sequences(run: RunDir) -> dict[str, np.ndarray]:
    """The histories as flat arrays, never a per-user list: each Train worker cuts its rows and
    valid queries from them, and each evaluation actor its queries."""
    num_items = len(read_table(run, "items", columns=["item_idx"]))
    return sequence_arrays(read_table(run, "interactions", columns=["user_idx", "item_idx", "position", "split"]),
                           num_items=num_items)


class Histories:
    """A run's histories (`read_sequences`), read once, and in a Ray job put in the object store
    once, with the training rows' Ray Datasets cut from them: what the trainings that run at once
    in threads, and their evaluations, share instead of each holding and shipping its own copy
    (Ray workers map the one stored copy)."""

    def __init__(self, run: RunDir):
        self.run, self._lock = run, threading.Lock()
        self._arrays: Optional[dict[str, np.ndarray]] = None
        self._stored: Any = None
        self._rows: dict[tuple[int, bool, int], Any] = {}
        self._rows_lock = threading.Lock()

    def arrays(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._arrays is None:
                self._arrays = read_sequences(self.run)
                return_freed_memory()  # the read's buffers, many times the arrays, for the stage's rest
            return self._arrays

    def for_ray_workers(self) -> Any:
        """An object-store reference to the arrays (`cluster.from_object_store` resolves it)."""
        arrays = self.arrays()
        with self._lock:
            if self._stored is None:
                import ray

                self._stored = ray.put(arrays)
            return self._stored

    def training_rows(self, max_len: int, user_token: bool, stride: int) -> Any:
        """The materialised Ray Dataset of the training rows (`ingest.training_dataset`), built once
        per row layout: the variants and seeds of a grid read the same rows."""
        stored = self.for_ray_workers()
        key = (max_len, user_token, stride)
        with self._rows_lock:
            if key not in self._rows:
                started = time.perf_counter()
                self._rows[key] = training_dataset(stored, int(self.arrays()["num_users"]), max_len, user_token,
                                                   stride)
                log(f"retriever: {self._rows[key].count():,} training rows as a Ray Dataset "
                    f"({self._rows[key].num_blocks()} blocks, {time.perf_counter() - started:.1f} s)")
            return self._rows[key]
