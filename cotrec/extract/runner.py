"""The extraction runner: per-row async programs on a Ray Data actor pool, streamed to parquet.

Ray Data shards the input rows (users, items or (user, candidate) pairs) across a pool of
`ExtractWorker` actors (`ActorPoolStrategy`, sizes and resources from `extract.*`). Each actor
holds one engine and runs up to `extract.in_flight` programs at once on the engine's own event
loop: a user's steps stay in order while the engine batches the steps of many users. A batch's
rows run in lanes, tasks that each take the next row when their program ends. Several Ray Data
batches are in flight per actor, so a batch's slowest row never idles the engine.

Each finished batch is written by its actor as one parquet shard, under a hidden name and
renamed into place, so a shard either exists whole or not at all. A rerun reads the shards'
keys and skips rows already done from the same inputs (`source_digest`); rows that failed are
tried again. A batch's rows are isolated: a program that crashes yields failure rows for its
own row only. When the inputs changed, newer rows supersede older ones (`created_at`), and
the runner compacts the folder at the end.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cotrec.config import Config, ExtractConfig, LLMConfig
from cotrec.extract.description import failed_item_rows, item_program
from cotrec.extract.perception import failed_pair_rows, pair_program
from cotrec.extract.preference import failed_user_rows, user_program
from cotrec.extract.prompts import PROMPT_VERSION, domain_of
from cotrec.extract.steps import Steps
from cotrec.progress import log
from cotrec.rundir import COMPLETE_MARKER, write_json

_COMMON = [("source_digest", pa.string()), ("status", pa.string()), ("error", pa.string()),
           ("calls", pa.int32()), ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
           ("model", pa.string()), ("prompt_version", pa.string()), ("created_at", pa.float64())]


GC_THRESHOLDS = (50_000, 50, 100)  # the actor's collector: generation 0, 1, 2 (Python's default 700, 10, 10)


@dataclass(frozen=True)
class Program:
    """One kind of extraction: its per-row program, its failure rows, its output table."""

    kind: str
    folder: str  # under the run directory
    key: tuple[str, ...]  # what identifies an output row
    run: Callable[[dict[str, Any], Any], Awaitable[list[dict[str, Any]]]]
    failed: Callable[[dict[str, Any], str], list[dict[str, Any]]]
    schema: pa.Schema
    rows_per_input: int = 1


PROGRAMS = {
    "items": Program("items", "extract/item_descriptions", ("item_idx",), item_program, failed_item_rows, pa.schema(
        [("item_idx", pa.int32()), ("description", pa.string()), *_COMMON])),
    "users": Program("users", "extract/preferences", ("user_idx", "horizon"), user_program, failed_user_rows, pa.schema(
        [("user_idx", pa.int32()), ("horizon", pa.string()), ("preference", pa.string()),
         ("short_term", pa.list_(pa.string())), ("windows", pa.int32()), ("items_consumed", pa.int32()),
         ("history_start", pa.int32()), ("target_item_idx", pa.int32()), ("settled_windows", pa.int32()),
         ("settled_preference", pa.string()), ("consumed_digest", pa.string()), ("continued", pa.bool_()),
         ("failed_steps", pa.int32()), *_COMMON]), rows_per_input=3),
    "perceptions": Program("perceptions", "extract/perceptions", ("user_idx", "horizon", "item_idx"), pair_program,
                           failed_pair_rows, pa.schema(
        [("user_idx", pa.int32()), ("horizon", pa.string()), ("item_idx", pa.int32()), ("review", pa.string()),
         ("key_terms", pa.list_(pa.string())), *_COMMON])),
}


# -- shards ----------------------------------------------------------------------------------
def shard_files(folder: Path) -> list[Path]:
    """The finished shards of a folder, oldest first (names start with a nanosecond clock)."""
    return sorted(Path(folder).glob("part-*.parquet")) if Path(folder).is_dir() else []


def write_shard(folder: Path, records: list[dict[str, Any]], schema: pa.Schema, tag: str = "",
                constants: dict[str, Any] | None = None) -> Path:
    """Write one shard under a hidden name and rename it into place: whole or absent.
    `constants`: columns with one value for every record (a batch's model, prompt version, time)."""
    name = f"part-{time.time_ns():020d}-{tag or uuid.uuid4().hex[:8]}.parquet"
    final = Path(folder) / name
    tmp = final.with_name(f".{name}.tmp")
    pq.write_table(records_table(records, schema, constants or {}), tmp)
    os.replace(tmp, final)
    return final


def records_table(records: list[dict[str, Any]], schema: pa.Schema, constants: dict[str, Any]) -> pa.Table:
    """Records as a table of `schema`, with the `constants` columns added. itemgetter and zip turn
    the records into columns in C and each column converts in one call: 0.78x the instructions of
    `pa.Table.from_pylist`, which looks every value up by name. Records that leave a column out
    (hand-made ones; a program's records have them all) go through from_pylist, which writes nulls."""
    fields = pa.schema([f for f in schema if f.name not in constants])
    names = fields.names
    values = itemgetter(*names) if len(names) > 1 else (lambda record: (record[names[0]],))
    try:
        columns = list(zip(*map(values, records))) or [()] * len(names)
        table = pa.Table.from_arrays([pa.array(column, f.type) for column, f in zip(columns, fields)], schema=fields)
    except KeyError:
        table = pa.Table.from_pylist(records, schema=fields)
    for column, value in constants.items():
        table = table.append_column(schema.field(column), pa.repeat(pa.scalar(value, schema.field(column).type), len(table)))
    return table.select(schema.names)


def read_shards(folder: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """All rows of a folder's shards, newest row per key winning is left to the caller."""
    files = shard_files(folder)
    if not files:
        return pd.DataFrame(columns=columns or [])
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="default").to_pandas()


def latest_rows(frame: pd.DataFrame, key: tuple[str, ...]) -> pd.DataFrame:
    """The newest row per key (by created_at)."""
    if frame.empty:
        return frame
    if "created_at" in frame.columns:
        frame = frame.sort_values("created_at", kind="stable")
    return frame.drop_duplicates(list(key), keep="last")


def compact(folder: Path, program: Program) -> int:
    """Rewrite a folder whose rows were superseded as one row per key; returns rows dropped."""
    files = shard_files(folder)
    frame = read_shards(folder)
    latest = latest_rows(frame, program.key)
    dropped = len(frame) - len(latest)
    if dropped == 0:
        return 0
    records = latest.sort_values(list(program.key)).to_dict("records")
    for start in range(0, len(records), 200_000):
        write_shard(folder, [_plain(r) for r in records[start:start + 200_000]], program.schema, tag="compact")
    for path in files:
        path.unlink()
    return dropped


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """pandas -> python values for pyarrow (lists from numpy arrays, NaN -> None)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


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


class Slots:
    """A counting semaphore whose release is O(1). Python 3.11's asyncio.Semaphore scans its waiter
    queue on every release, past the waiters already woken but not yet run: with thousands of
    programs waiting for a slot (several Ray Data batches per actor) the runner spent most of its
    time there (measured: 5.4 of 12.9 s over 30,000 users, zero-latency engine)."""

    def __init__(self, count: int):
        self.free = count
        self.waiters: deque[asyncio.Future] = deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        slot = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # handed a slot, then cancelled: pass it on
                self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self.waiters:  # hand the slot straight to the first waiter still waiting
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.free += 1


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
        """Every row's records, in row order, the rows run in lanes (see `_Lanes`)."""
        lanes = _Lanes(rows, self._one, self._slots)
        try:
            return await lanes.results()
        finally:
            lanes.cancel()  # none left running when the batch is cancelled

    async def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every row's output records (flattened, in row order)."""
        results = await self.engine.run_on_loop(self._all(rows))
        return [record for records in results for record in records]


class _Lanes:
    """A batch's rows, run by lanes: tasks that each take the batch's next row when their program ends.

    A task per row is Python code in 3.11 (its creation, its scheduling, the all-tasks registry):
    2.7% of the users job's instructions per user with the zero-latency engine. A lane runs rows
    one after another, so a batch needs a task per program in flight, not per row. Lanes start
    while slots are free: a lane that took a slot, when no lane it started has begun yet, starts as
    many as are running, up to the free slots and the rows left (a batch's programs in flight
    double per turn of the loop). Programs that never wait (every window settled, an instant
    engine) run a whole batch in one lane.
    """

    def __init__(self, rows: list[dict[str, Any]], run_row: Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]],
                 slots: Slots):
        self.rows, self.run_row, self.slots = rows, run_row, slots
        self.records: list[list[dict[str, Any]]] = [[] for _ in rows]
        self.next = 0  # the next row to take
        self.running = 0  # lanes running a row
        self.loop = asyncio.get_running_loop()
        self.tasks = [self.loop.create_task(self._lane())] if rows else []
        self.starting = len(self.tasks)  # lanes started that have not begun

    async def _lane(self) -> None:
        self.starting -= 1
        rows, slots = self.rows, self.slots
        while self.next < len(rows):
            index = self.next
            self.next += 1
            async with slots:
                self.running += 1
                if not self.starting and slots.free:
                    more = min(self.running, slots.free, len(rows) - self.next)
                    self.starting += more
                    self.tasks += [self.loop.create_task(self._lane()) for _ in range(more)]
                try:
                    self.records[index] = await self.run_row(rows[index])
                finally:
                    self.running -= 1

    async def results(self) -> list[list[dict[str, Any]]]:
        done = 0
        while done < len(self.tasks):  # lanes start lanes: the list grows until the last one ends
            await self.tasks[done]
            done += 1
        return self.records

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


def batch_summary(records: list[dict[str, Any]], rows: int, seconds: float) -> dict[str, Any]:
    return {"rows": rows, "records": len(records),
            "failed": sum(r["status"] != "ok" for r in records),
            "calls": sum(r["calls"] for r in records),
            "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "seconds": seconds}


def load_actor_engine(llm: dict[str, Any]) -> tuple[Any, float]:
    """A Ray Data actor's engine, from its LLM config as a dict, and the seconds its load took."""
    from cotrec.llm import make_engine

    llm_config = LLMConfig.model_validate(llm)
    # Ray limits an actor's OpenMP threads to its CPU share; an engine on CPU wants the cores.
    os.environ["OMP_NUM_THREADS"] = str(llm_config.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    engine = make_engine(llm_config)
    return engine, time.perf_counter() - started


class ExtractWorker:
    """The Ray Data actor: one engine, many programs in flight, one shard per batch."""

    def __init__(self, kind: str, llm: dict[str, Any], extract: dict[str, Any], domain: str, folder: str,
                 labels: list[str] | None = None, incremental: bool = False):
        self.engine, self.load_seconds = load_actor_engine(llm)
        self.pool = ProgramPool(kind, self.engine, ExtractConfig.model_validate(extract), domain, labels, incremental)
        self.folder = Path(folder)
        self.tag = uuid.uuid4().hex[:8]
        self.count = 0
        # Programs allocate many short-lived objects, and every full collection would walk the
        # hundreds of thousands that the imports and the engine left behind: freeze those out of
        # the collector (12% of the runner's CPU per row with the zero-latency engine). And collect
        # less often: thousands of programs wait at once (on the engine, on the interests asked
        # ahead), each holding its frames and task, so a collection every 700 allocations (the
        # default) keeps walking the same live objects. Garbage here is freed by reference counts;
        # the collector only has cycles to find.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def __del__(self) -> None:
        # Ray Data drops the UDF when the pool shuts down gracefully: close the engine in order
        # (a vLLM engine killed under its output handler logs an EngineDeadError).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    async def __call__(self, batch: pa.Table) -> pd.DataFrame:
        started_at, started = time.time(), time.perf_counter()
        rows = batch.to_pylist()
        records = await self.pool.run(rows)
        self.count += 1
        write_shard(self.folder, records, self.pool.program.schema, tag=f"{self.tag}-{self.count:06d}",
                    constants=self.pool.batch_columns())
        summary = batch_summary(records, len(rows), time.perf_counter() - started)
        summary["engine_load_s"] = self.load_seconds if self.count == 1 else 0.0  # once per actor
        summary["started_at"], summary["finished_at"] = started_at, time.time()
        return pd.DataFrame([summary])


# -- the driver ------------------------------------------------------------------------------
def prepare_folder(folder: Path, fingerprint: str, force: bool) -> None:
    """Keep a folder made with the same settings (to resume it); otherwise start it afresh."""
    manifest = folder / "manifest.json"
    if folder.exists():
        try:
            import json

            same = json.loads(manifest.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        if force or not same:
            if shard_files(folder):
                log(f"{folder}: {'--force' if force else 'made with other settings'}; starting afresh")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE_MARKER).unlink(missing_ok=True)
    if not manifest.exists():
        write_json(manifest, {"fingerprint": fingerprint, "prompt_version": PROMPT_VERSION})


def done_keys(folder: Path, program: Program) -> pd.DataFrame:
    """Input keys whose rows are already written, ok, from the same inputs."""
    key = list(program.key)
    if program.kind == "users":
        key = ["user_idx"]
    frame = latest_rows(read_shards(folder, [*program.key, "source_digest", "status", "created_at"]), program.key)
    if frame.empty:
        return pd.DataFrame(columns=[*key, "source_digest"])
    ok = frame[frame["status"] == "ok"]
    if program.kind == "users":  # a user is done when all its horizons are
        counts = ok.groupby(["user_idx", "source_digest"]).size()
        return counts[counts == program.rows_per_input].reset_index()[["user_idx", "source_digest"]]
    return ok[[*key, "source_digest"]]


def pending_rows(rows: pd.DataFrame, folder: Path, program: Program) -> pd.DataFrame:
    key = ["user_idx"] if program.kind == "users" else list(program.key)
    done = done_keys(folder, program)
    if done.empty:
        return rows
    merged = rows.merge(done.assign(_done=True), on=[*key, "source_digest"], how="left")
    return rows[merged["_done"].isna().to_numpy()]


def run_programs(program: Program, rows: pd.DataFrame, folder: Path, config: Config, *, domain: str,
                 labels: list[str] | None = None, incremental: bool = False, total: int | None = None) -> dict[str, Any]:
    """Run `program` over `rows` on the Ray Data actor pool; returns the summary of this run."""
    import ray

    from cotrec.cluster import ensure_ray

    ec = config.extract
    started_ray = ensure_ray()
    summary = {"rows": 0, "records": 0, "failed": 0, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    started = time.perf_counter()
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Arrow blocks: ray.data.from_pandas pickles every block's object columns (a million users'
        # histories took 13 s before the first row ran; as Arrow list columns, 0.4 s).
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
            num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor,
        )
        last_report = time.perf_counter()
        engine_load = 0.0
        first_started, last_finished = math.inf, -math.inf
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            for column in summary:
                summary[column] += int(batch[column].sum())
            engine_load = max(engine_load, float(batch["engine_load_s"].max()))
            first_started = min(first_started, float(batch["started_at"].min()))
            last_finished = max(last_finished, float(batch["finished_at"].max()))
            now = time.perf_counter()
            if now - last_report >= 10 or summary["rows"] == len(rows):
                last_report = now
                log(progress_line(program.kind, summary, len(rows), now - started))
    finally:
        if started_ray:
            ray.shutdown()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    # Actors load their engines in parallel: the slowest load is the time no row could run.
    summary["engine_load_s"] = round(engine_load, 3)
    summary["seconds_after_load"] = round(max(summary["seconds"] - engine_load, 1e-9), 3)
    # From the first batch's start to the last one's end in the actors: the time rows were running
    # (neither Ray Data's nor the actors' start-up, nor the engine's load).
    summary["rows_seconds"] = round(max(last_finished - first_started, 1e-9), 3) if summary["rows"] else 0.0
    return summary


def progress_line(kind: str, summary: dict[str, Any], total: int, seconds: float) -> str:
    done = summary["rows"]
    rate = done / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    return (f"extract {kind}: {done:,}/{total:,} rows ({done / max(total, 1):.0%}), {rate:,.1f} rows/s, "
            f"{summary['calls']:,} LLM calls, {summary['completion_tokens'] / max(seconds, 1e-9):,.1f} gen tok/s, "
            f"{summary['failed']:,} failed, ETA {eta:,.0f} s")
