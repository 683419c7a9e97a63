"""The runner's own overhead at scale (`cotrec bench extract --parts scale`): a million SYNTHETIC
users through the real runner on the zero-latency engine (no model): users/s, CPU per user, peak
memory. It measures orchestration only, never results."""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from cotrec.bench.common import load_average, rate
from cotrec.bench.memory import MemorySampler
from cotrec.cluster import ensure_ray
from cotrec.config import Config
from cotrec.extract.programs import PROGRAMS
from cotrec.extract.runner import run_programs
from cotrec.extract.shards import shard_files
from cotrec.extract.windows import history_digest
from cotrec.progress import log

# The runner's settings for a million zero-latency users on a 2-core machine.
SCALE_SETTINGS = {"extract.batch_size": 2000, "extract.in_flight": 8000, "extract.min_actors": 2,
                  "extract.max_actors": 2, "extract.cpus_per_actor": 1.0}
SCALE_ITEMS = 1000
SCALE_HISTORY = (5, 12)  # synthetic history lengths, uniform, inclusive


def synthetic_user_rows(count: int, items: int = SCALE_ITEMS, lengths: tuple[int, int] = SCALE_HISTORY,
                        seed: int = 0) -> pd.DataFrame:
    """SYNTHETIC users (random histories), as the users job's input rows."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lengths[0], lengths[1] + 1, count)
    flat = rng.integers(0, items, int(sizes.sum())).astype(np.int32)
    histories = np.split(flat, np.cumsum(sizes)[:-1])
    return pd.DataFrame({"user_idx": np.arange(count, dtype=np.int64), "history": histories,
                         "source_digest": [history_digest(h) for h in histories]})


def synthetic_labels(count: int = SCALE_ITEMS) -> list[str]:
    genres = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi", "Horror", "Animation"]
    return [f"Synthetic Movie {i} ({1950 + i % 70}; {genres[i % 8]}, {genres[(i * 7 + 3) % 8]})" for i in range(count)]


def steady_rate(shards: list[Path], started_ns: int) -> dict[str, Any]:
    """Start-up latency and the steady rate, from the shards' names (they start with their write time in ns)
    and their row counts: users/s from the first shard's write to the last one's."""
    if len(shards) < 2:
        return {}
    stamps = [int(p.name.split("-")[1]) for p in shards]
    users = [pq.ParquetFile(p).metadata.num_rows // 3 for p in shards]  # 3 horizons per user
    order = np.argsort(stamps)
    first, last = stamps[order[0]], stamps[order[-1]]
    after_first = sum(users) - users[order[0]]
    return {"first_shard_after_s": round((first - started_ns) / 1e9, 2),
            "steady_users_per_s": round(after_first / max((last - first) / 1e9, 1e-9), 1)}


def scale_config(config: Config, overrides: dict[str, Any]) -> Config:
    raw = config.model_dump(mode="json")
    raw["llm"]["backend"] = "zero-latency"
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return Config.model_validate(raw)


class _Passthrough:
    """The warm-up dataset's actor: an actor pool is what starts Ray Data's actor location tracker."""

    def __call__(self, batch: Any) -> Any:
        return batch


def start_ray_data() -> float:
    """Start Ray Data's cluster-wide actors (its stats actor, autoscaling coordinator and actor
    location tracker are detached: the first dataset of a cluster starts them, later jobs find them)
    with a dataset of two rows on a one-actor pool (only an actor pool starts the tracker: after a
    pool of tasks, its process started inside the runner's timing); returns its seconds. The runner
    is then timed as on a cluster that has run an actor-pool dataset before, without their start in
    its first shard's latency."""
    started = time.perf_counter()
    ray.data.range(2, override_num_blocks=2).map_batches(_Passthrough, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    return time.perf_counter() - started


def measure_scale(config: Config, users: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = {**SCALE_SETTINGS, **(settings or {})}
    cfg = scale_config(config, settings)
    started = time.perf_counter()
    rows = synthetic_user_rows(users)
    rows_s = time.perf_counter() - started
    labels = synthetic_labels()
    folder = Path(tempfile.mkdtemp(prefix="cotrec-bench-scale-"))
    log(f"bench extract: scale: {users:,} synthetic users, zero-latency engine, {settings}")
    try:
        with MemorySampler() as memory:
            started = time.perf_counter()
            ensure_ray()  # started here so the runner's figures exclude Ray's start; shut down below
            ray_start = time.perf_counter() - started
            ray_data_start = start_ray_data()
            try:
                load_before = load_average()
                runner_started_ns = time.time_ns()
                summary = run_programs(PROGRAMS["users"], rows, folder, cfg, domain="movie", labels=labels)
                memory._sample()
            finally:
                ray.shutdown()
            wall = time.perf_counter() - started
        shards = shard_files(folder)
        written = sum(p.stat().st_size for p in shards)
        steady = steady_rate(shards, runner_started_ns)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "users": users, "synthetic": True, "history_lengths": list(SCALE_HISTORY), "items": SCALE_ITEMS,
        "backend": "zero-latency", "settings": settings, "rows_build_s": round(rows_s, 2),
        "ray_start_s": round(ray_start, 2), "ray_data_start_s": round(ray_data_start, 2), "runner_seconds": summary["seconds"], "wall_s": round(wall, 2),
        "users_per_s": rate(summary["rows"], summary["seconds"]), **steady, "rows_done": summary["rows"],
        "records": summary["records"], "failed_records": summary["failed"], "calls": summary["calls"],
        "calls_per_s": rate(summary["calls"], summary["seconds"]),
        "shards": len(shards), "shard_mb": round(written / 2**20, 1),
        "peak_memory_mb": memory.peak,
        "cpu_seconds": (cpu := memory.cpu_seconds()),
        "extract_worker_cpu_us_per_user": round(cpu.get("extract_workers", 0.0) / max(users, 1) * 1e6, 1),
        "all_cpu_us_per_user": round(cpu["total"] / max(users, 1) * 1e6, 1),
        "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }
