"""Peak memory and CPU seconds of a benchmark's process tree (the driver and the local Ray)."""

from __future__ import annotations

import threading
from typing import Any


class MemorySampler:
    """Peak RSS of this process and of its descendants (the local Ray's processes), sampled in a thread;
    also their CPU seconds (the last sample of each process, with one more taken at the exit, so a
    span shorter than the interval still counts; up to one interval of a process that exited before
    the span ended is missed)."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        # driver_private_mb: the driver's RSS less the pages it shares (files, and the Ray object
        # store's shared memory, which the RSS counts once the driver has written or read them);
        # largest_process_rss_mb: the largest single Ray worker (an actor, a Train worker)
        self.peak = {"driver_rss_mb": 0.0, "driver_private_mb": 0.0, "ray_workers_rss_mb": 0.0, "ray_all_rss_mb": 0.0,
                     "total_rss_mb": 0.0, "largest_process_rss_mb": 0.0}
        self.cpu: dict[int, tuple[str, str, float]] = {}  # pid -> (kind, name, user + system seconds)
        self._cpu_start = sum(self.me.cpu_times()[:2])
        self._baseline: dict[int, float] = {}  # CPU seconds of processes that were there before sampling
        for child in self.me.children(recursive=True):
            try:
                self._baseline[child.pid] = sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def _sample(self) -> None:
        mb = 1024 * 1024
        memory = self.me.memory_info()
        driver, private = memory.rss / mb, (memory.rss - getattr(memory, "shared", 0)) / mb
        self.cpu[self.me.pid] = ("driver", "driver", sum(self.me.cpu_times()[:2]) - self._cpu_start)
        workers = others = 0.0
        for child in self.me.children(recursive=True):
            try:
                with child.oneshot():
                    if child.status() == self.psutil.STATUS_ZOMBIE:
                        continue
                    rss = child.memory_info().rss / mb
                    name = child.name()
                    cpu = sum(child.cpu_times()[:2]) - self._baseline.get(child.pid, 0.0)
            except self.psutil.Error:
                continue
            kind = "extract_workers" if "ExtractWorker" in name or "MapWorker" in name else \
                "other_ray_workers" if name.startswith("ray::") else "ray_system"
            if kind == "extract_workers":  # the process title changes (and is cut to 15 characters at times)
                name = "ray::MapWorker(MapBatches(ExtractWorker))"
            self.cpu[child.pid] = (kind, name, cpu)
            if name.startswith("ray::"):
                workers += rss
                self.peak["largest_process_rss_mb"] = max(self.peak["largest_process_rss_mb"], round(rss, 1))
            else:
                others += rss
        for key, value in (("driver_rss_mb", driver), ("driver_private_mb", private),
                           ("ray_workers_rss_mb", workers), ("ray_all_rss_mb", workers + others),
                           ("total_rss_mb", driver + workers + others)):
            self.peak[key] = max(self.peak[key], round(value, 1))

    def _sample_if_possible(self) -> None:
        try:
            self._sample()
        except Exception:  # noqa: BLE001 - a process vanished mid-sample
            pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample_if_possible()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_if_possible()

    def cpu_seconds(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        names: dict[str, float] = {}
        for kind, name, seconds in self.cpu.values():
            out[kind] = round(out.get(kind, 0.0) + seconds, 2)
            names[name] = round(names.get(name, 0.0) + seconds, 2)
        out["total"] = round(sum(out.values()), 2)
        out["by_process_name"] = dict(sorted(names.items(), key=lambda kv: -kv[1]))
        return out
