"""`cotrec bench extract`: the extraction runner against its ceiling and against the alternatives.

Each comparison is measured in one run, on one machine, with every setting written to the JSON:

- `users` vs `ceiling`: the real users job (`extract_users` through the Ray Data runner, vLLM
  backend) on a temporary copy of the run's prepared data; then, in the bench process, one vLLM
  engine with the same LLM settings gets the same number of requests, of the job's mean prompt
  length and mean reply length, all at once (one offline batch, no dependencies between them).
  generated tokens/s of the job (after its engine loaded) over the ceiling's is the fraction of
  the engine's batch throughput the dependent, per-user programs keep.
- `naive`: the reference code's way: one user at a time, one call at a time, on the transformers
  backend (in-process `ProgramPool` with `in_flight=1`, one row per run), over the first users of
  the job's own users (by user_idx).
- the stage-per-step design (window step t of every user at once, a barrier after every step; with
  the programs' lookahead, a step's merges go with the next windows' short-term interests) against
  the per-row async programs, over the run's users and their whole, real, skewed histories, twice:
  - `waves` vs `async`: in-process, on the same vLLM engine, back to back: the stage design at
    its best (no stage start-up, no engine per stage);
  - `stages`: both on Ray Data: the real users job against one Ray Data stage per window step,
    each stage with its own actor and engine, its output materialised for the next stage.
- `scale`: orchestration overhead: a million synthetic users through the real runner on the
  zero-latency engine (no model): users/s and peak memory.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cotrec.bench.common import load_average, machine, rate, ratio
from cotrec.config import Config, load_config
from cotrec.errors import CotrecError
from cotrec.extract.preference import WalkState, planned_steps, settled_after, walk_bounds
from cotrec.extract.prompts import Domain, domain_of, item_labels, merge_preference, short_term_interest
from cotrec.extract.steps import read_text
from cotrec.extract.windows import capped_start, history_digest
from cotrec.llm.base import Generation, SamplingSettings
from cotrec.progress import log
from cotrec.rundir import RunDir, write_json

PARTS = ("users", "ceiling", "naive", "waves", "stages", "scale")
DEFAULT_OUT = "bench/extract.json"

# Chosen so that every part together runs in about 15 minutes on a 2-core CPU with the embedded
# SmolLM2-135M (vLLM ~60 generated tokens/s for batches). The user's --set overrides win.
BENCH_DEFAULTS = ["extract.max_windows=2"]  # the users job / ceiling / naive: 5 LLM calls per user
DEFAULT_USERS = 48  # the users job (and the ceiling's request count comes from it)
DEFAULT_NAIVE_USERS = 4
# waves / stages: every user of the run (None) over their whole history (0: no window cap), so the
# designs meet the real skew of history lengths (the demo's 47 users: 2 to 16 windows each).
DEFAULT_WAVES_USERS = None
DEFAULT_WAVES_MAX_WINDOWS = 0
DEFAULT_SCALE_USERS = 1_000_000
# The scale part's runner settings (zero-latency engine; tuned on the 2-core machine).
SCALE_SETTINGS = {"extract.batch_size": 2000, "extract.in_flight": 8000, "extract.min_actors": 2,
                  "extract.max_actors": 2, "extract.cpus_per_actor": 1.0}
SCALING_CONCURRENCY = (1, 4, 16)  # batch sizes the ceiling's engine is also timed at
SCALE_ITEMS = 1000
SCALE_HISTORY = (5, 12)  # synthetic history lengths, uniform, inclusive


def bench_config(spec: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config the bench runs with: the bench's defaults, then the user's --set overrides."""
    return load_config(spec, [*BENCH_DEFAULTS, *overrides])


# -- helpers ---------------------------------------------------------------------------------
class MemorySampler:
    """Peak RSS of this process and of its descendants (the local Ray's processes), sampled in a thread;
    also their CPU seconds (the last sample of each process: up to one interval of a process that
    exited before it is missed)."""

    def __init__(self, interval: float = 0.25):
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.me = psutil.Process()
        self.peak = {"driver_rss_mb": 0.0, "ray_workers_rss_mb": 0.0, "ray_all_rss_mb": 0.0, "total_rss_mb": 0.0}
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
        driver = self.me.memory_info().rss / mb
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
            else:
                others += rss
        for key, value in (("driver_rss_mb", driver), ("ray_workers_rss_mb", workers),
                           ("ray_all_rss_mb", workers + others), ("total_rss_mb", driver + workers + others)):
            self.peak[key] = max(self.peak[key], round(value, 1))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a process vanished mid-sample
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        names: dict[str, float] = {}
        for kind, name, seconds in self.cpu.values():
            out[kind] = round(out.get(kind, 0.0) + seconds, 2)
            names[name] = round(names.get(name, 0.0) + seconds, 2)
        out["total"] = round(sum(out.values()), 2)
        out["by_process_name"] = dict(sorted(names.items(), key=lambda kv: -kv[1]))
        return out


def temp_run(config: Config, run: RunDir) -> RunDir:
    """A temporary run directory holding the run's prepared data (prepared afresh if the run has none)."""
    from cotrec.data.prepare import STAGE_DIR, prepare

    tmp = RunDir(tempfile.mkdtemp(prefix="cotrec-bench-extract-"))
    if run.is_complete(STAGE_DIR, config.fingerprint("data")):
        shutil.copytree(run / STAGE_DIR, tmp / STAGE_DIR)
    else:
        log(f"bench extract: {run / STAGE_DIR} is not prepared for this config; preparing into {tmp.root}")
        prepare(config, tmp)
    tmp.write_config(config)
    return tmp


def first_users(run: RunDir, config: Config, count: int) -> pd.DataFrame:
    """The first `count` users by user_idx, as the users job's rows (what `extract_users --limit` runs)."""
    from cotrec.data.prepare import read_table
    from cotrec.extract.stage import user_histories, user_rows

    rows = user_rows(user_histories(read_table(run, "interactions")), config)
    return rows.sort_values("user_idx").head(count).reset_index(drop=True)


def run_labels(run: RunDir) -> list[str]:
    from cotrec.data.prepare import read_table

    return item_labels(read_table(run, "items"))


def run_domain(run: RunDir) -> str:
    from cotrec.data.prepare import read_stats

    return read_stats(run)["domain"]


def record_totals(records: list[dict[str, Any]]) -> dict[str, int]:
    return {"calls": sum(r["calls"] for r in records), "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "failed_rows": sum(r["status"] != "ok" for r in records)}


# -- 1. the users job ---------------------------------------------------------------------------
def measure_users_job(config: Config, tmp: RunDir, users: int) -> dict[str, Any]:
    from cotrec.extract.stage import extract_users

    log(f"bench extract: users job: {users} users, {config.llm.backend}, max_windows {config.extract.max_windows}")
    load_before = load_average()
    started = time.perf_counter()
    summary = extract_users(config, tmp, force=True, limit=users)
    wall = time.perf_counter() - started
    after = max(summary["seconds_after_load"], 1e-9)
    calls = max(summary["calls"], 1)
    return {
        "users": summary["rows"], "records": summary["records"], "failed_records": summary["failed"],
        "calls": summary["calls"], "prompt_tokens": summary["prompt_tokens"],
        "completion_tokens": summary["completion_tokens"],
        "mean_prompt_tokens": round(summary["prompt_tokens"] / calls, 1),
        "mean_completion_tokens": round(summary["completion_tokens"] / calls, 1),
        "engine_load_s": summary["engine_load_s"], "runner_seconds": summary["seconds"],
        "seconds_after_load": summary["seconds_after_load"], "rows_seconds": summary["rows_seconds"],
        "stage_wall_s": round(wall, 2),
        "users_per_s": rate(summary["rows"], after),
        "generated_tokens_per_s": rate(summary["completion_tokens"], after),
        "generated_tokens_per_s_while_rows_ran": rate(summary["completion_tokens"], summary["rows_seconds"]),
        "load_avg_before": load_before, "load_avg_after": load_average(),
        "runner": {k: getattr(config.extract, k) for k in ("min_actors", "max_actors", "cpus_per_actor",
                                                            "batch_size", "in_flight")},
    }


# -- 2. the engine's ceiling --------------------------------------------------------------------
def ceiling_prompts(engine: Any, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids: realistic window prompts (bench movie titles),
    truncated or padded (by repeating the prompt) to the length."""
    from cotrec.bench.prompts import MOVIES

    rng = random.Random(seed)
    domain = domain_of("movie")
    prompts = []
    for _ in range(count):
        ids = engine.encode(short_term_interest(domain, rng.sample(MOVIES, len(MOVIES))))
        while len(ids) < length:
            ids = ids + ids
        prompts.append(ids[:length])
    return prompts


async def _offline_batch(engine: Any, prompts: list[list[int]], params: Any) -> list[Any]:
    return list(await asyncio.gather(*(engine._request(ids, params) for ids in prompts)))


def measure_ceiling(engine: Any, config: Config, requests: int, prompt_length: int,
                    output_length: int) -> dict[str, Any]:
    """The same number of requests, mean prompt and mean reply as the job, in one batch."""
    from vllm import SamplingParams

    log(f"bench extract: ceiling: {requests} requests x {prompt_length} prompt / {output_length} generated tokens")
    prompts = ceiling_prompts(engine, requests, prompt_length)
    params = SamplingParams(max_tokens=output_length, min_tokens=output_length, ignore_eos=True, temperature=0.0,
                            repetition_penalty=config.extract.repetition_penalty)
    engine.forget_prompts()
    load_before = load_average()
    started = time.perf_counter()
    outputs = asyncio.run(engine.run_on_loop(_offline_batch(engine, prompts, params)))
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    by_concurrency = {}
    for concurrency in SCALING_CONCURRENCY:  # how the engine's throughput grows with the batch
        if concurrency >= requests:
            break
        engine.forget_prompts()
        t0 = time.perf_counter()
        few = asyncio.run(engine.run_on_loop(_offline_batch(engine, prompts[:concurrency], params)))
        by_concurrency[str(concurrency)] = rate(sum(len(o.outputs[0].token_ids) for o in few), time.perf_counter() - t0)
    by_concurrency[str(requests)] = rate(generated, seconds)
    return {
        "requests": requests, "prompt_tokens_each": prompt_length, "completion_tokens_each": output_length,
        "prompt_tokens": requests * prompt_length, "completion_tokens": generated, "seconds": round(seconds, 2),
        "generated_tokens_per_s": rate(generated, seconds),
        "sampling": {"temperature": 0.0, "ignore_eos": True, "min_tokens": output_length,
                     "repetition_penalty": config.extract.repetition_penalty},
        "max_num_seqs": config.llm.max_num_seqs, "prefix_cache_reset_before": True,
        "generated_tokens_per_s_by_batch": by_concurrency,
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }


# -- 3. naive: one user at a time, one call at a time -------------------------------------------
def measure_naive(config: Config, tmp: RunDir, users: int) -> dict[str, Any]:
    from cotrec.extract.runner import ProgramPool
    from cotrec.llm import make_engine

    llm = config.llm.model_copy(update={"backend": "transformers"})
    extract = config.extract.model_copy(update={"in_flight": 1})
    rows = first_users(tmp, config, users).to_dict("records")
    log(f"bench extract: naive: {len(rows)} users one at a time on transformers")
    started = time.perf_counter()
    engine = make_engine(llm)
    loaded = time.perf_counter() - started
    try:
        pool = ProgramPool("users", engine, extract, run_domain(tmp), run_labels(tmp))
        load_before = load_average()
        started = time.perf_counter()
        records = []
        for row in rows:
            records += asyncio.run(pool.run([row]))
        seconds = time.perf_counter() - started
    finally:
        engine.close()
    totals = record_totals(records)
    return {
        "backend": "transformers", "dtype": getattr(engine, "dtype", llm.dtype), "users": len(rows),
        "user_idx": [int(r["user_idx"]) for r in rows], "in_flight": 1, "engine_load_s": round(loaded, 2),
        **totals, "seconds": round(seconds, 2),
        "users_per_s": rate(len(rows), seconds), "generated_tokens_per_s": rate(totals["completion_tokens"], seconds),
        "load_avg_before": load_before, "load_avg_after": load_average(),
    }


# -- 4. waves (one stage per window step) vs the async programs ----------------------------------
class WavePlan:
    """One user's windows as the recurrence walks them: the train walk, then the test continuation."""

    def __init__(self, row: dict[str, Any], config: Any, labels_of: Any):
        history = np.asarray(row["history"], dtype=np.int64).tolist()  # as the users program holds it
        n = len(history)
        state = WalkState(start=capped_start(n - 2, config.window, config.overlap, config.max_windows))
        train = walk_bounds(state, n - 2, config)
        self.settled = settled_after(state, train, config)
        test = walk_bounds(WalkState(start=state.start, settled_windows=self.settled), n - 1, config)
        self.user_idx = int(row["user_idx"])
        self.windows = [labels_of(history[b:e]) for b, e in train + test]
        self.train_count = len(train)
        self.interests: dict[int, str | None] = {}  # window index -> its short-term interest, once asked
        self.preference: str | None = None
        self.after: list[str | None] = []  # the preference after each train window
        self.train_preference: str | None = None

    def begin_step(self, t: int) -> None:
        if t == self.train_count:  # the test walk continues from the settled train state
            self.train_preference = self.preference
            self.preference = self.after[self.settled - 1] if self.settled else None

    def end_step(self, t: int) -> None:
        if t < self.train_count:
            self.after.append(self.preference)


async def _texts(engine: Any, conversations: list[Any], max_tokens: int, config: Any) -> list[tuple[str | None, Generation]]:
    """One batch through the engine, each reply read as the programs read theirs (`read_text`)."""
    if not conversations:
        return []
    settings = SamplingSettings(max_tokens=max_tokens, temperature=config.temperature,
                                repetition_penalty=config.repetition_penalty, retry_truncated=False)
    return [read_text(reply) for reply in await engine.chat(conversations, settings)]


STEP_COUNTS = ("calls", "prompt_tokens", "completion_tokens")


async def window_step(engine: Any, current: list[list[str] | None], interests: list[str | None],
                      ahead: list[list[list[str]]], preferences: list[str | None], config: Any,
                      domain: Domain) -> tuple[list[str | None], list[list[str | None]], dict[str, Any]]:
    """Window step t of the stage-per-step design for a batch of users, with the same lookahead as
    the async programs (`extract.interests_ahead`):
    - `current[i]`: user i's window t when its short-term interest is still to be asked (always
      without lookahead; else only at t = 0), None when it came with an earlier step (`interests[i]`);
    - `ahead[i]`: the later windows whose interests this step asks for, beside its merges.
    An interest still to be asked is a barrier before the merges; the merges and the interests asked
    ahead go to the engine together. Returns the new preferences, the interests asked ahead, and
    each user's LLM calls and tokens (and the step's engine rounds: its barriers)."""
    counts: dict[str, Any] = {key: [0] * len(current) for key in STEP_COUNTS}

    def count(i: int, reply: Generation) -> None:
        counts["calls"][i] += reply.attempts
        counts["prompt_tokens"][i] += reply.prompt_tokens * reply.attempts
        counts["completion_tokens"][i] += reply.completion_tokens

    flat_ahead = [(i, w) for i, windows in enumerate(ahead) for w in windows]
    ahead_prompts = [short_term_interest(domain, w) for _, w in flat_ahead]
    now = [i for i, w in enumerate(current) if w is not None]
    interests = list(interests)
    rounds = 0
    asked_ahead: list[tuple[str | None, Generation]] = []
    if now:  # the barrier: these interests are needed by this step's merges
        rounds += 1
        first, asked_ahead = await asyncio.gather(
            _texts(engine, [short_term_interest(domain, current[i]) for i in now], config.interest_tokens, config),
            _texts(engine, ahead_prompts, config.interest_tokens, config))
        for i, (text, reply) in zip(now, first):
            count(i, reply)
            interests[i] = text
    out = list(preferences)
    merging = []
    for i, text in enumerate(interests):
        if text:
            if out[i] is None:
                out[i] = text
            else:
                merging.append(i)
    if merging or (flat_ahead and not now):
        rounds += 1
        merged, later = await asyncio.gather(
            _texts(engine, [merge_preference(domain, out[i], interests[i]) for i in merging],
                   config.preference_tokens, config),
            _texts(engine, [] if now else ahead_prompts, config.interest_tokens, config))
        asked_ahead = asked_ahead if now else later
        for i, (text, reply) in zip(merging, merged):
            count(i, reply)
            if text:
                out[i] = text
    ahead_out: list[list[str | None]] = [[] for _ in current]
    for (i, _), (text, reply) in zip(flat_ahead, asked_ahead):
        count(i, reply)
        ahead_out[i].append(text)
    counts["rounds"] = rounds
    return out, ahead_out, counts


def walk_in_steps(rows: list[dict[str, Any]], config: Any, labels: list[str], run_step: Any) -> dict[str, Any]:
    """The stage-per-step design's driver: window step t of every user that has one, for t = 0, 1, ...
    `run_step(current, interests, ahead, preferences)` runs one step (in-process or as a Ray Data
    stage; see `window_step`) and returns the new preferences, the interests asked ahead, each
    user's LLM counts, the step's engine rounds and anything to record about the step."""
    plans = [WavePlan(row, config, lambda items: [labels[int(i)] for i in items]) for row in rows]
    totals = dict.fromkeys(STEP_COUNTS, 0)
    steps = []
    t = 0
    while True:
        active = [p for p in plans if t < len(p.windows)]
        if not active:
            break
        current, interests, ahead, asked = [], [], [], []
        for plan in active:
            plan.begin_step(t)
            known = t in plan.interests
            current.append(None if known else plan.windows[t])
            interests.append(plan.interests.get(t))
            later = [k for k in range(t + 1, min(t + config.interests_ahead, len(plan.windows) - 1) + 1)
                     if k not in plan.interests]
            ahead.append([plan.windows[k] for k in later])
            asked.append(later)
        started = time.perf_counter()
        preferences, ahead_interests, counts, extra = run_step(current, interests, ahead,
                                                               [p.preference for p in active])
        for plan, preference, later, texts in zip(active, preferences, asked, ahead_interests):
            plan.preference = preference
            plan.interests.update(zip(later, texts))
            plan.end_step(t)
        for key in totals:
            totals[key] += int(sum(counts[key]))
        steps.append({"step": t, "users": len(active), "rounds": int(counts["rounds"]),
                      "seconds": round(time.perf_counter() - started, 2), **extra})
        t += 1
    return {**totals, "steps": steps, "barriers": sum(step["rounds"] for step in steps),
            "test_preferences": {p.user_idx: p.preference for p in plans}}


class WindowStepStage:
    """A Ray Data stage of the stage-per-step design: its own engine, one window step over its batch."""

    def __init__(self, llm: dict[str, Any], extract: dict[str, Any], domain: str):
        from cotrec.config import ExtractConfig
        from cotrec.extract.runner import load_actor_engine

        self.engine, self.load_seconds = load_actor_engine(llm)  # as the users job's actor loads its own
        self.config = ExtractConfig.model_validate(extract)
        self.domain = domain_of(domain)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        current = [None if w is None else list(w) for w in batch["window"]]
        interests = [x if isinstance(x, str) else None for x in batch["interest"]]
        ahead = [[list(w) for w in windows] for windows in batch["ahead"]]
        preferences = [p if isinstance(p, str) else None for p in batch["preference"]]
        out, asked, counts = asyncio.run(self.engine.run_on_loop(
            window_step(self.engine, current, interests, ahead, preferences, self.config, self.domain)))
        return pd.DataFrame({"order": batch["order"], "preference": out, "asked": asked,
                             **{key: counts[key] for key in STEP_COUNTS}, "rounds": counts["rounds"],
                             "engine_load_s": self.load_seconds})


def waves_rows(tmp: RunDir, config: Config, users: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The users of the comparison (the first by user_idx; all by default) and their window counts."""
    rows = first_users(tmp, config, users or 10**9).to_dict("records")
    windows = [planned_steps(len(r["history"]), config.extract) for r in rows]
    lengths = [len(r["history"]) for r in rows]
    return rows, {"users": len(rows), "max_windows": config.extract.max_windows,
                  "history_length": {"min": int(min(lengths)), "median": float(np.median(lengths)), "max": int(max(lengths))},
                  "windows_per_user": {"min": int(min(windows)), "max": int(max(windows)),
                                       "mean": round(float(np.mean(windows)), 2), "total": int(sum(windows))}}


def measure_waves_and_async(engine: Any, config: Config, tmp: RunDir, users: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage-per-step design at its best (in-process, on the same engine as the async programs,
    no stage start-up) against the per-row async programs, back to back."""
    from cotrec.extract.runner import ProgramPool

    rows, common = waves_rows(tmp, config, users)
    labels, domain = run_labels(tmp), run_domain(tmp)
    log(f"bench extract: waves (in-process): {len(rows)} users, {common['windows_per_user']['total']} windows "
        f"(max {common['windows_per_user']['max']} for one user)")

    def in_process_step(current: list[Any], interests: list[Any], ahead: list[Any],
                        preferences: list[str | None]) -> tuple[Any, Any, Any, dict]:
        out, asked, counts = asyncio.run(engine.run_on_loop(
            window_step(engine, current, interests, ahead, preferences, config.extract, domain_of(domain))))
        return out, asked, counts, {}

    engine.forget_prompts()
    load_before = load_average()
    started = time.perf_counter()
    waves = walk_in_steps(rows, config.extract, labels, in_process_step)
    waves_s = time.perf_counter() - started
    waves_load = [load_before, load_average()]

    log(f"bench extract: async (in-process): the same {len(rows)} users as per-row programs")
    extract = config.extract.model_copy(update={"in_flight": max(config.extract.in_flight, len(rows))})
    pool = ProgramPool("users", engine, extract, domain, labels)
    engine.forget_prompts()
    load_before = load_average()
    started = time.perf_counter()
    records = asyncio.run(pool.run(rows))
    async_s = time.perf_counter() - started
    totals = record_totals(records)
    test_async = {int(r["user_idx"]): r["preference"] for r in records if r["horizon"] == "test"}
    same = sum(test_async.get(u) == (p or "") for u, p in waves.pop("test_preferences").items())

    wave_result = {**common, "design": "one batch per window step (a barrier; two per step without lookahead), in-process",
                   "seconds": round(waves_s, 2), "calls": waves["calls"], "prompt_tokens": waves["prompt_tokens"],
                   "completion_tokens": waves["completion_tokens"], "barriers": waves["barriers"],
                   "interests_ahead": config.extract.interests_ahead,
                   "users_per_s": rate(len(rows), waves_s),
                   "generated_tokens_per_s": rate(waves["completion_tokens"], waves_s),
                   "steps": waves["steps"], "load_avg_before_after": waves_load,
                   "same_test_preference_as_async": same}
    async_result = {**common, "design": "per-row async programs (ProgramPool), in-process",
                    "in_flight": extract.in_flight, "seconds": round(async_s, 2), **totals,
                    "users_per_s": rate(len(rows), async_s),
                    "generated_tokens_per_s": rate(totals["completion_tokens"], async_s),
                    "load_avg_before_after": [load_before, load_average()]}
    return wave_result, async_result


def measure_stages_on_ray_data(config: Config, tmp: RunDir, users: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two designs as they run on Ray Data, on the same users: the per-row async programs are
    the real users job (one stage, one actor pool, one engine); the stage-per-step design is one
    Ray Data stage per window step, each with its own actor and engine (as a chain of Ray Data LLM
    stages is built), run one after the other (this machine holds one engine at a time), each
    stage's output materialised for the next (the barrier)."""
    import ray

    from cotrec.cluster import ensure_ray
    from cotrec.extract.stage import extract_users

    rows, common = waves_rows(tmp, config, users)
    labels, domain = run_labels(tmp), run_domain(tmp)
    started_ray = ensure_ray()  # one Ray session for both designs: neither pays Ray's own start
    try:
        log(f"bench extract: async (Ray Data): the users job over the same {len(rows)} users")
        load_before = load_average()
        job = extract_users(config, tmp, force=True, limit=len(rows))
        async_result = {**common, "design": "per-row async programs: the users job (one Ray Data stage)",
                        "seconds": job["seconds"], "engine_load_s": job["engine_load_s"], "calls": job["calls"],
                        "prompt_tokens": job["prompt_tokens"], "completion_tokens": job["completion_tokens"],
                        "users_per_s": rate(len(rows), job["seconds"]),
                        "generated_tokens_per_s": rate(job["completion_tokens"], job["seconds"]),
                        "in_flight": config.extract.in_flight, "load_avg_before_after": [load_before, load_average()]}

        log(f"bench extract: stage per step (Ray Data): {common['windows_per_user']['max']} stages")
        stage_kwargs = dict(llm=config.llm.model_dump(mode="json"), extract=config.extract.model_dump(mode="json"),
                            domain=domain)

        def ray_data_step(current: list[Any], interests: list[Any], ahead: list[Any],
                          preferences: list[str | None]) -> tuple[Any, Any, Any, dict]:
            frame = pd.DataFrame({"order": np.arange(len(current)), "window": current, "interest": interests,
                                  "ahead": ahead, "preference": preferences})
            out = ray.data.from_pandas(frame).map_batches(
                WindowStepStage, batch_size=None, batch_format="pandas", fn_constructor_kwargs=stage_kwargs,
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=config.extract.cpus_per_actor,
                num_gpus=config.extract.gpus_per_actor).to_pandas().sort_values("order")
            preferences = [p if isinstance(p, str) else None for p in out["preference"]]
            asked = [[x if isinstance(x, str) else None for x in texts] for texts in out["asked"]]
            counts = {key: out[key].tolist() for key in STEP_COUNTS}
            counts["rounds"] = int(out["rounds"].max())
            return preferences, asked, counts, {"engine_load_s": round(float(out["engine_load_s"].max()), 2)}

        load_before = load_average()
        started = time.perf_counter()
        stages = walk_in_steps(rows, config.extract, labels, ray_data_step)
        seconds = time.perf_counter() - started
    finally:
        if started_ray:
            ray.shutdown()
    stages.pop("test_preferences")
    loads = sum(step["engine_load_s"] for step in stages["steps"])
    stage_result = {**common, "design": "one Ray Data stage per window step, each with its own engine; "
                                        "each stage's output materialised for the next",
                    "stages": len(stages["steps"]), "barriers": stages["barriers"],
                    "interests_ahead": config.extract.interests_ahead, "seconds": round(seconds, 2), "engine_load_s": round(loads, 2),
                    "seconds_without_engine_loads": round(seconds - loads, 2),
                    "calls": stages["calls"], "prompt_tokens": stages["prompt_tokens"],
                    "completion_tokens": stages["completion_tokens"], "users_per_s": rate(len(rows), seconds),
                    "generated_tokens_per_s": rate(stages["completion_tokens"], seconds),
                    "steps": stages["steps"], "load_avg_before_after": [load_before, load_average()]}
    return stage_result, async_result


# -- 5. scale: a million synthetic users on the zero-latency engine -----------------------------
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
    import pyarrow.parquet as pq

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
    import ray

    started = time.perf_counter()
    ray.data.range(2, override_num_blocks=2).map_batches(_Passthrough, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    return time.perf_counter() - started


def measure_scale(config: Config, users: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    import ray

    from cotrec.cluster import ensure_ray
    from cotrec.extract.runner import PROGRAMS, run_programs, shard_files

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


# -- the bench -----------------------------------------------------------------------------------
def bench_extract(config: Config, run: RunDir, out: str | Path = DEFAULT_OUT, parts: tuple[str, ...] = PARTS,
                  users: int = DEFAULT_USERS, naive_users: int = DEFAULT_NAIVE_USERS,
                  waves_users: int | None = DEFAULT_WAVES_USERS, waves_max_windows: int | None = DEFAULT_WAVES_MAX_WINDOWS,
                  scale_users: int = DEFAULT_SCALE_USERS, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise CotrecError(f"--parts: unknown part {unknown[0]!r} (parts: {', '.join(PARTS)})")
    if "ceiling" in parts and "users" not in parts:
        raise CotrecError("--parts: ceiling needs users in the same run (it mirrors the job's requests)")
    if naive_users > users and "users" in parts and "naive" in parts:
        raise CotrecError(f"--naive-users ({naive_users}) must not exceed --users ({users}): naive runs the job's first users")
    bench_started = time.perf_counter()
    waves_max_windows = waves_max_windows or None  # 0: no cap
    waves_config = config.model_copy(update={"extract": config.extract.model_copy(
        update={"max_windows": waves_max_windows})})
    report: dict[str, Any] = {
        "bench": "extract", "machine": machine(), "parts": list(parts),
        "settings": {"config_overrides": [*BENCH_DEFAULTS, *overrides], "model": config.llm.model,
                     "llm": config.llm.model_dump(mode="json"), "extract": config.extract.model_dump(mode="json"),
                     "users": users, "naive_users": naive_users, "waves_users": waves_users,
                     "waves_max_windows": waves_max_windows, "scale_users": scale_users,
                     "run_dir": str(run.root)},
        "notes": [],
    }
    notes = report["notes"]
    needs_data = any(p in parts for p in ("users", "naive", "waves", "stages"))
    if "scale" in parts:  # first: before vLLM and torch load into this process (the driver's RSS is its own)
        report["scale"] = measure_scale(config, scale_users)
    tmp = temp_run(config, run) if needs_data else None
    try:
        if "users" in parts:
            report["users_job"] = measure_users_job(config, tmp, users)
        if "ceiling" in parts or "waves" in parts:
            from cotrec.llm import make_engine

            llm = config.llm.model_copy(update={"backend": "vllm"})
            started = time.perf_counter()
            engine = make_engine(llm)
            report["bench_engine_load_s"] = round(time.perf_counter() - started, 2)
            try:
                engine.chat_sync([short_term_interest(domain_of("movie"), ["Toy Story (1995)"])],
                                 SamplingSettings(max_tokens=8))  # warm-up
                if "ceiling" in parts:
                    job = report["users_job"]
                    report["ceiling"] = measure_ceiling(
                        engine, config, job["calls"], round(job["mean_prompt_tokens"]),
                        max(1, round(job["mean_completion_tokens"])))
                    report["job_over_ceiling"] = ratio(job["generated_tokens_per_s"],
                                                        report["ceiling"]["generated_tokens_per_s"])
                    report["job_over_ceiling_while_rows_ran"] = ratio(
                        job["generated_tokens_per_s_while_rows_ran"], report["ceiling"]["generated_tokens_per_s"])
                if "waves" in parts:
                    report["waves"], report["async"] = measure_waves_and_async(engine, waves_config, tmp, waves_users)
                    report["async_over_waves"] = ratio(report["waves"]["seconds"], report["async"]["seconds"])
                    report["async_over_waves_tokens_per_s"] = ratio(
                        report["async"]["generated_tokens_per_s"], report["waves"]["generated_tokens_per_s"])
            finally:
                engine.close()
        if "naive" in parts:
            report["naive"] = measure_naive(config, tmp, naive_users)
            if "users_job" in report:
                job, naive = report["users_job"], report["naive"]
                report["job_over_naive_users_per_s"] = ratio(job["users_per_s"], naive["users_per_s"])
                report["job_over_naive_tokens_per_s"] = ratio(job["generated_tokens_per_s"],
                                                               naive["generated_tokens_per_s"])
            if "ceiling" in report:  # the most any scheduling on this engine could give over naive
                report["ceiling_over_naive_tokens_per_s"] = ratio(report["ceiling"]["generated_tokens_per_s"],
                                                                   report["naive"]["generated_tokens_per_s"])
        if "stages" in parts:  # last of the LLM parts: no other engine may be alive (one fits at a time)
            report["stages_ray_data"], report["async_ray_data"] = measure_stages_on_ray_data(waves_config, tmp,
                                                                                             waves_users)
            report["async_over_stages_ray_data"] = ratio(report["stages_ray_data"]["seconds"],
                                                         report["async_ray_data"]["seconds"])
    finally:
        if tmp is not None:
            shutil.rmtree(tmp.root, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - bench_started, 1)
    notes += bench_notes(report)
    write_json(Path(out), report)
    return report


def bench_notes(report: dict[str, Any]) -> list[str]:
    notes = []
    if "users_job" in report:
        notes.append("users job: the real `extract_users(limit=N)` (first N users by user_idx) through the Ray Data "
                     "runner into a temporary copy of the run's data; tokens/s and users/s are over the runner's "
                     "seconds_after_load = runner seconds - the actor's engine load, so Ray Data start-up, the actor "
                     "process start and its imports (before the engine's load timer starts), scheduling and shard "
                     "writes all count against the job.")
    if "ceiling" in report:
        notes.append("job_over_ceiling counts the Ray Data and actor start-up against the job (its clock: the "
                     "runner's seconds after the engine loaded); job_over_ceiling_while_rows_ran times the job as the "
                     "ceiling is timed, from the first batch's start to the last one's end in the actor, which is "
                     "what the per-user dependencies alone cost.")
        notes.append("ceiling: the job's number of requests, each of the job's mean prompt length (window prompts of "
                     "bench movie titles, cut to length; prefix caching on, as in the job) and exactly the job's mean "
                     "reply length (ignore_eos), all submitted at once to one AsyncLLM with the same LLM settings. "
                     "generated_tokens_per_s_by_batch: the same requests, the first 1, 4, 16 of them alone.")
    if "naive" in report:
        notes.append("naive: the first users (by user_idx) of the job's own users; with extract.max_windows=2 every "
                     "demo user makes the same 5 calls (3 windows), so users/s compare like with like; tokens/s also "
                     "compare the engines (transformers vs vLLM, same model and dtype).")
    if "waves" in report:
        notes.append("waves: the stage-per-step design at its best: in-process, on the same engine as the async "
                     "programs, no stage start-up and no engine per stage, and with the programs' lookahead "
                     "(extract.interests_ahead): each window step sends every user's merge to the engine together "
                     "with the short-term interests of the next windows (one barrier per step; without lookahead, "
                     "one batch of interests then one of merges: two). The "
                     "prefix cache is reset before each design; both make the same calls with the same prompts and "
                     "greedy settings (same_test_preference_as_async counts the users whose final preference came "
                     "out identical: in bfloat16 a reply can change with the batch it was computed in).")
        by_batch = report.get("ceiling", {}).get("generated_tokens_per_s_by_batch", {})
        if "1" in by_batch and "16" in by_batch:
            top = max(by_batch, key=int)
            notes.append(f"this engine generates {by_batch['1']:.1f} tok/s for 1 sequence, {by_batch['16']:.1f} for 16 "
                         f"and {by_batch[top]:.1f} for {top} at once: where the throughput is flat past a small "
                         "batch (a CPU), a barrier costs little as long as a step still holds a dozen users; what "
                         "remains is the tail of steps that only the longest histories reach.")
    if "stages_ray_data" in report:
        notes.append("stages: both designs on Ray Data over the same users, one Ray session for both. async: the real "
                     "users job (one stage; its seconds include its actor's start and engine load). stage per step: "
                     "one Ray Data stage per window step, each stage with its own actor and engine (the shape of a "
                     "chain of Ray Data LLM stages), run one after the other (this machine holds one engine at a "
                     "time; on a cluster the stages would hold their engines at once, each idle while it waits for "
                     "its input), each stage's output materialised for the next.")
    if "scale" in report:
        notes.append("scale: SYNTHETIC users and the zero-latency engine (no model): this measures the runner's own "
                     "overhead only. Peak memory: RSS sampled every 0.25 s of the driver and of its descendant "
                     "processes (the local Ray: workers named ray::*, plus raylet/GCS/...); RSS sums count shared "
                     "object-store pages once per process that maps them.")
    if "scale" in report and report["scale"].get("all_cpu_us_per_user"):
        sc = report["scale"]
        cores = os.cpu_count() or 1
        notes.append(f"scale is CPU-bound: {sc['all_cpu_us_per_user']:.0f} CPU-us per user in all ({sc['extract_worker_cpu_us_per_user']:.0f} "
                     f"in the ExtractWorker actors), i.e. at most {cores / sc['all_cpu_us_per_user'] * 1e6:,.0f} users/s on "
                     f"{cores} fully free cores; steady_users_per_s excludes the start-up before the first shard "
                     f"({sc.get('first_shard_after_s', 0):.0f} s).")
    if (report.get("ceiling_over_naive_tokens_per_s") or 10) < 10:  # absent or None: nothing to explain
        notes.append(f"job / naive is bounded by the engines on this machine: even the ceiling (every request at once) "
                     f"generates only {report['ceiling_over_naive_tokens_per_s']:.1f}x the tokens/s of one-call-at-a-time "
                     "transformers, so no scheduling of these calls can reach 10x here.")
    loads = [v for part in ("users_job", "ceiling", "naive", "scale") for k, v in report.get(part, {}).items()
             if k.startswith("load_avg")]
    if any(l[0] > 2.5 for l in loads):
        notes.append("the 1-minute load average exceeded 2.5 on this 2-core machine during some part: other work "
                     "shared the cores, so those figures are pessimistic.")
    return notes


def format_bench(report: dict[str, Any]) -> str:
    lines = [f"{'part':<12}{'users':>9}{'seconds':>10}{'users/s':>11}{'gen tok/s':>11}  notes"]

    def cell(value: float | None) -> str:
        if value is None:
            return f"{'-':>11}"
        return f"{value:>11,.1f}" if value >= 10 else f"{value:>11.3f}"

    def row(name: str, part: dict[str, Any], seconds_key: str, extra: str = "") -> None:
        lines.append(f"{name:<12}{part.get('users', part.get('requests', 0)):>9,}{part[seconds_key]:>10.1f}"
                     f"{cell(part.get('users_per_s'))}{part.get('generated_tokens_per_s', 0):>11.1f}  {extra}")

    if "users_job" in report:
        job = report["users_job"]
        row("users job", job, "seconds_after_load", f"{job['calls']} calls, engine load {job['engine_load_s']:.0f} s")
    if "ceiling" in report:
        c = report["ceiling"]
        row("ceiling", c, "seconds", f"{c['requests']} requests x {c['prompt_tokens_each']}+{c['completion_tokens_each']} tokens")
    if "naive" in report:
        row("naive", report["naive"], "seconds", "transformers, one call at a time")
    if "waves" in report:
        row("waves", report["waves"], "seconds", f"{report['waves']['barriers']} barriers")
        row("async", report["async"], "seconds", f"in_flight {report['async']['in_flight']}")
    if "stages_ray_data" in report:
        st = report["stages_ray_data"]
        row("stages", st, "seconds", f"Ray Data: {st['stages']} stages, engine loads {st['engine_load_s']:.0f} s")
        row("async job", report["async_ray_data"], "seconds", "Ray Data: the users job, engine load "
                                                              f"{report['async_ray_data']['engine_load_s']:.0f} s")
    if "scale" in report:
        s = report["scale"]
        row("scale", s, "runner_seconds", f"zero-latency; steady {s.get('steady_users_per_s', 0):,.0f} users/s; "
                                          f"peak RSS {s['peak_memory_mb']['total_rss_mb']:,.0f} MB")
    for key, label in (("job_over_ceiling", "users job / ceiling gen tok/s"),
                       ("job_over_ceiling_while_rows_ran", "  the same, while rows ran"),
                       ("job_over_naive_users_per_s", "users job / naive users/s"),
                       ("job_over_naive_tokens_per_s", "users job / naive gen tok/s"),
                       ("ceiling_over_naive_tokens_per_s", "ceiling / naive gen tok/s"),
                       ("async_over_waves", "async / waves (wall time)"),
                       ("async_over_stages_ray_data", "async job / stages (wall time)")):
        if report.get(key) is not None:
            lines.append(f"{label:<32}{report[key]:.2f}x")
    lines.append(f"bench wall time {report['wall_s']:.0f} s")
    return "\n".join(lines)
