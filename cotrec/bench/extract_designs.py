"""The stage-per-step design against the per-row async programs (`cotrec bench extract --parts waves,stages`).

The stage-per-step design runs window step t of every user at once, with a barrier after every
step (with the programs' lookahead, a step's merges go to the engine together with the next
windows' short-term interests). It is measured over the run's users and their whole histories:
- `waves` vs `async`: in-process, on the same vLLM engine, back to back: the stage design at its
  best (no stage start-up, no engine per stage);
- `stages`: both on Ray Data: the real users job against one Ray Data stage per window step,
  each with its own actor and engine, each stage's output materialised for the next.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pandas as pd
import ray

from cotrec.bench.common import load_average, rate
from cotrec.bench.extract_job import first_users, record_totals, run_domain, run_labels
from cotrec.cluster import ensure_ray
from cotrec.config import Config, ExtractConfig
from cotrec.extract.preference import WalkState, planned_steps, settled_after, walk_bounds
from cotrec.extract.prompts import Domain, domain_of, merge_preference, short_term_interest
from cotrec.extract.runner import ProgramPool
from cotrec.extract.stage import extract_users
from cotrec.extract.steps import read_text
from cotrec.extract.windows import capped_start
from cotrec.llm import load_actor_engine
from cotrec.llm.base import Generation, SamplingSettings
from cotrec.progress import log
from cotrec.rundir import RunDir


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

    def begin_step(self, t: int) -> None:
        if t == self.train_count:  # the test walk continues from the settled train state
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
    lengths = np.array([len(r["history"]) for r in rows])
    windows = planned_steps(lengths, config.extract)
    return rows, {"users": len(rows), "max_windows": config.extract.max_windows,
                  "history_length": {"min": int(min(lengths)), "median": float(np.median(lengths)), "max": int(max(lengths))},
                  "windows_per_user": {"min": int(min(windows)), "max": int(max(windows)),
                                       "mean": round(float(np.mean(windows)), 2), "total": int(sum(windows))}}


def measure_waves_and_async(engine: Any, config: Config, tmp: RunDir, users: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage-per-step design at its best (in-process, on the same engine as the async programs,
    no stage start-up) against the per-row async programs, back to back."""
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
