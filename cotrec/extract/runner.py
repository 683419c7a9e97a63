"""The extraction runner: per-row async programs on a Ray Data actor pool, streamed to parquet.

Ray Data shards the input rows (users, items or (user, candidate) pairs) across a pool of
`ExtractWorker` actors (`ActorPoolStrategy`, sizes and resources from `extract.*`). Each actor
holds one engine and runs up to `extract.in_flight` programs at once on the engine's own event
loop: a user's steps stay in order while the engine batches the steps of many users. A batch's
rows run in lanes (`concurrency.Lanes`). Several Ray Data batches are in flight per actor, so a
batch's slowest row never idles the engine.

Each finished batch is written by its actor as one shard (`shards.write_shard`). A batch's rows
are isolated: a program that crashes yields failure rows for its own row only. Faults lose nothing:
Ray Data restarts an actor whose process died and runs its batches again, and an actor whose engine
died ends its own process (`replace_actor`) instead of writing the batch's failures, so it is
replaced the same way; a batch written twice is resolved by the shard store (newest row per key).
"""

from __future__ import annotations

import gc
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd
import pyarrow as pa

from cotrec.cluster import ensure_ray
from cotrec.config import Config, ExtractConfig
from cotrec.extract.concurrency import Lanes, Slots
from cotrec.extract.programs import PROGRAMS, Program
from cotrec.extract.prompts import PROMPT_VERSION, domain_of
from cotrec.extract.shards import write_shard
from cotrec.extract.steps import Steps
from cotrec.llm import load_actor_engine
from cotrec.llm.base import EngineDeadError
from cotrec.progress import log
from cotrec.storage import as_path

# The actor's collector thresholds (generation 0, 1, 2): far rarer than Python's (700, 10, 10),
# since thousands of waiting programs keep the same live objects for a collection to walk again.
GC_THRESHOLDS = (50_000, 50, 100)


# -- the actor -------------------------------------------------------------------------------
class ProgramContext:
    """What every program of one actor shares: the engine's steps, the domain, the config."""

    def __init__(self, steps: Steps, domain: str, config: ExtractConfig, labels: list[str] | None,
                 incremental: bool):
        self.steps = steps
        self.domain = domain_of(domain)
        self.config = config
        self.incremental = incremental
        self._labels = labels or []

    def labels_of(self, items: list[int]) -> list[str]:
        labels = self._labels
        return [labels[i] for i in items]


class ProgramPool:
    """Runs a kind's program over rows, `in_flight` at a time, on the engine's loop. Its records
    lack the columns a whole batch shares (`batch_columns`), which the shard writer adds."""

    def __init__(self, kind: str, engine: Any, config: ExtractConfig, domain: str,
                 labels: list[str] | None = None, incremental: bool = False):
        self.program = PROGRAMS[kind]
        self.engine = engine
        self.context = ProgramContext(Steps(engine, config.temperature, config.repetition_penalty), domain, config, labels, incremental)
        self._slots = Slots(config.in_flight)  # used on the engine's loop only

    def batch_columns(self) -> dict[str, Any]:
        """What every record of a batch written now shares: the model, the prompts, the time."""
        return {"model": self.engine.model_name, "prompt_version": PROMPT_VERSION, "created_at": time.time()}

    async def _one(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            return await self.program.run(row, self.context)
        except Exception as exc:  # noqa: BLE001 - one bad row must not sink its batch
            return self.program.failed(row, f"{type(exc).__name__}: {exc}")

    async def _all(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Every row's records, in row order, the rows run in lanes (see `concurrency.Lanes`)."""
        lanes = Lanes(rows, self._one, self._slots)
        try:
            return await lanes.results()
        finally:
            lanes.cancel()  # none left running when the batch is cancelled

    async def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every row's output records (flattened, in row order)."""
        results = await self.engine.run_on_loop(self._all(rows))
        return [record for records in results for record in records]


COUNTS = ("rows", "records", "failed", "calls", "prompt_tokens", "completion_tokens")


class ExtractionRun(TypedDict):
    """What one `run_programs` did: the counts summed over its batches, and its times."""

    rows: int
    records: int
    failed: int
    calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    engine_load_s: float
    seconds_after_load: float
    rows_seconds: float


def batch_summary(records: list[dict[str, Any]], rows: int, seconds: float) -> dict[str, float]:
    return {"rows": rows, "records": len(records),
            "failed": sum(r["status"] != "ok" for r in records),
            "calls": sum(r["calls"] for r in records),
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "seconds": seconds}


def replace_actor(reason: str) -> None:
    """End this actor's process: Ray Data starts a new actor (a fresh engine) and runs its batches
    again. An exception would fail the whole dataset instead; a process that dies is retried."""
    log(f"extract: {reason}; ending this actor so that Ray Data replaces it")
    os._exit(70)


class ExtractWorker:
    """The Ray Data actor: one engine, many programs in flight, one shard per batch."""

    def __init__(self, kind: str, llm: dict[str, Any], extract: dict[str, Any], domain: str, folder: str,
                 labels: list[str] | None = None, incremental: bool = False):
        self.engine, self.load_seconds = load_actor_engine(llm)
        self.pool = ProgramPool(kind, self.engine, ExtractConfig.model_validate(extract), domain, labels, incremental)
        self.folder = as_path(folder)
        self.tag = uuid.uuid4().hex[:8]
        self.count = 0
        # Freeze what the imports and the engine left behind out of the collector, which would
        # otherwise walk it at every full collection; garbage here is freed by reference counts.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def _replace_if_the_engine_died(self) -> None:
        """A batch whose rows failed for want of an engine is not theirs to record: run it elsewhere."""
        try:
            self.engine.check_health()
        except EngineDeadError as exc:
            replace_actor(f"its engine died ({exc})")
            raise

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully: close the engine in order
        # (a vLLM engine killed under its output handler logs an EngineDeadError).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    async def __call__(self, batch: pa.Table) -> pd.DataFrame:
        started_at, started = time.time(), time.perf_counter()
        rows = batch.to_pylist()
        try:
            records = await self.pool.run(rows)
        finally:
            self._replace_if_the_engine_died()
        self.count += 1
        write_shard(self.folder, records, self.pool.program.schema, tag=f"{self.tag}-{self.count:06d}",
                    constants=self.pool.batch_columns())
        summary = batch_summary(records, len(rows), time.perf_counter() - started)
        summary["engine_load_s"] = self.load_seconds if self.count == 1 else 0.0  # once per actor
        summary["started_at"], summary["finished_at"] = started_at, time.time()
        return pd.DataFrame([summary])


# -- the driver ------------------------------------------------------------------------------
def run_programs(program: Program, rows: pd.DataFrame, folder: Path, config: Config, *, domain: str,
                 labels: list[str] | None = None, incremental: bool = False) -> ExtractionRun:
    """Run `program` over `rows` on the Ray Data actor pool; returns the summary of this run."""
    import ray  # here, not at the top: `bench models` imports this module (through the retriever's) without Ray

    ec = config.extract
    started_ray = ensure_ray()
    counts = dict.fromkeys(COUNTS, 0)
    started = time.perf_counter()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Arrow blocks: ray.data.from_pandas would pickle every block's object columns (histories).
        table = pa.Table.from_pandas(rows, preserve_index=False)
        chunk = ec.batch_size * 4
        blocks = [table.slice(i, chunk) for i in range(0, len(table), chunk)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            ExtractWorker, batch_size=ec.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs=dict(kind=program.kind, llm=config.llm.model_dump(mode="json"),
                                       extract=ec.model_dump(mode="json"), domain=domain, folder=str(folder),
                                       labels=labels, incremental=incremental),
            compute=ray.data.ActorPoolStrategy(min_size=ec.min_actors, max_size=ec.max_actors,
                                               max_tasks_in_flight_per_actor=math.ceil(ec.in_flight / ec.batch_size) + 1),
            num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor, resources=ec.resources or None,
        )
        last_report = time.perf_counter()
        engine_load = 0.0
        first_started, last_finished = math.inf, -math.inf
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            for column in counts:
                counts[column] += int(batch[column].sum())
            engine_load = max(engine_load, float(batch["engine_load_s"].max()))
            first_started = min(first_started, float(batch["started_at"].min()))
            last_finished = max(last_finished, float(batch["finished_at"].max()))
            now = time.perf_counter()
            if now - last_report >= 10 or counts["rows"] == len(rows):
                last_report = now
                log(progress_line(program.kind, counts, len(rows), now - started))
    finally:
        if started_ray:
            ray.shutdown()
    seconds = round(time.perf_counter() - started, 3)
    return ExtractionRun(
        rows=counts["rows"], records=counts["records"], failed=counts["failed"], calls=counts["calls"],
        prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"], seconds=seconds,
        # Actors load their engines in parallel: the slowest load is the time no row could run.
        engine_load_s=round(engine_load, 3), seconds_after_load=round(max(seconds - engine_load, 1e-9), 3),
        # From the first batch's start to the last one's end in the actors: the time rows were running
        # (neither Ray Data's nor the actors' start-up, nor the engine's load).
        rows_seconds=round(max(last_finished - first_started, 1e-9), 3) if counts["rows"] else 0.0)


def progress_line(kind: str, summary: dict[str, int], total: int, seconds: float) -> str:
    done = summary["rows"]
    rate = done / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (f"extract {kind}: {done:,}/{total:,} rows ({done / max(total, 1):.0%}), {rate:,.1f} rows/s, "
            f"{summary['calls']:,} LLM calls, {summary['completion_tokens'] / max(seconds, 1e-9):,.1f} gen tok/s, "
            f"{summary['failed']:,} failed, ETA {eta:,.0f} s")
