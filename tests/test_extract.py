"""Extraction: the window grid, the recurrence's horizons, the Ray Data runner, resume, incremental.

Orchestration tests use the zero-latency engine (named as such: it has no model). The tests of
what the LLM writes, of resume after a kill and of `--incremental` use the real embedded model
(transformers backend: it loads in seconds inside the Ray Data actor; vLLM in-process through
the shared session engine).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FLOAT32, REPO, run_cli
from cotrec.config import ExtractConfig, LLMConfig, load_config
from cotrec.extract.programs import PROGRAMS
from cotrec.extract.runner import ProgramPool
from cotrec.extract.shards import compact, latest_rows, read_shards, shard_files, write_shard
from cotrec.extract.stage import item_rows, pair_rows, user_histories, user_rows
from cotrec.extract.windows import capped_start, count_windows, history_digest, window_bounds
from cotrec.llm.base import Generation
from cotrec.llm.zero_latency import ZeroLatencyEngine
from cotrec.rundir import RunDir

# Short budgets keep the real-model tests quick; greedy decoding in float32 keeps them reproducible
# on any CPU (see conftest.FLOAT32).
REAL = ["--set", FLOAT32, "--set", "extract.max_windows=null", "--set", "llm.backend=transformers", "--set", "llm.batch_size=1", "--set", "extract.interest_tokens=12",
        "--set", "extract.preference_tokens=16", "--set", "extract.batch_size=1", "--set", "extract.cpus_per_actor=1"]
ZERO = ["--set", "llm.backend=zero-latency", "--set", "extract.cpus_per_actor=0.5", "--set", "extract.max_windows=null"]


# -- the window grid ---------------------------------------------------------------------------
@pytest.mark.parametrize("length", [1, 9, 10, 11, 18, 19, 26, 27, 100])
def test_windows_cover_the_history_on_a_fixed_grid(length):
    bounds = window_bounds(0, length, 10, 2)
    assert len(bounds) == count_windows(length, 10, 2)
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    for (b0, e0), (b1, _) in zip(bounds, bounds[1:]):
        assert e0 - b0 == 10 and b1 == b0 + 8 and e0 - b1 == 2  # full windows overlapping by 2
    # A longer history keeps every window that was complete.
    longer = window_bounds(0, length + 7, 10, 2)
    complete = [b for b in bounds if b[1] - b[0] == 10]
    assert longer[: len(complete)] == complete


def test_the_history_cap_walks_the_last_windows_on_the_grid():
    start = capped_start(100, 10, 2, max_windows=3)
    assert start % 8 == 0
    assert len(window_bounds(start, 100, 10, 2)) == 3
    assert capped_start(100, 10, 2, None) == 0 and capped_start(15, 10, 2, 3) == 0


# -- helpers -------------------------------------------------------------------------------------
DEMO_100 = ["--set", "data.sample_users=100", "--set", "data.sample_k_core=null"]

@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    # The demo sample these tests were written against (100 users: their ids and history lengths),
    # whatever size the demo preset has today.
    result = run_cli("prepare", "--config", "demo", "--run-dir", str(root), *DEMO_100)
    assert result.returncode == 0, result.stderr
    return root


def small_run(demo: Path, dest: Path, users: list[int], drop_last: int = 0) -> RunDir:
    """A run directory holding only `users`, each history without its last `drop_last` items."""
    shutil.copytree(demo / "data", dest / "data")
    shutil.copy(demo / "config.yaml", dest / "config.yaml")
    frame = pd.read_parquet(dest / "data" / "interactions.parquet")
    frame = frame[frame["user_idx"].isin(users)].sort_values(["user_idx", "position"])
    if drop_last:
        length = frame.groupby("user_idx")["position"].transform("size")
        frame = frame[frame["position"] < length - drop_last]
    frame.to_parquet(dest / "data" / "interactions.parquet", index=False)
    return RunDir(dest)


def preferences(run: Path) -> pd.DataFrame:
    frame = read_shards(Path(run) / "extract" / "preferences")
    return frame.sort_values(["user_idx", "horizon"]).reset_index(drop=True)


def histories(run: Path) -> dict[int, np.ndarray]:
    table = user_histories(pd.read_parquet(Path(run) / "data" / "interactions.parquet"))
    return {int(u): np.asarray(h) for u, h in zip(table["user_idx"], table["history"])}


# -- the users job through Ray Data (zero-latency engine: orchestration only) -------------------------
@pytest.mark.slow
def test_users_job_windows_horizons_and_resume_with_zero_latency_engine(demo_data, tmp_path):
    run = small_run(demo_data, tmp_path, users=list(range(30)))
    args = ["extract", "users", "--run-dir", str(run.root), *ZERO, "--set", "extract.batch_size=4"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "LLM calls" in first.stdout and "rows          30 run" in first.stdout
    table = preferences(run.root)
    assert len(table) == 90 and not table.duplicated(["user_idx", "horizon"]).any()
    for row in table.itertuples():
        history = histories(run.root)[row.user_idx]
        expected_length = len(history) - (1 if row.horizon == "test" else 2)
        assert row.items_consumed == expected_length
        assert row.windows == count_windows(expected_length, 10, 2) == len(row.short_term)
        assert row.target_item_idx == history[expected_length]  # the item right after what it saw
        assert row.status == "ok" and row.preference
        assert row.model == "zero-latency" and row.prompt_version
    assert (run.root / "extract" / "preferences" / ".complete.json").is_file()
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "all 30 rows already done" in again.stderr
    assert len(preferences(run.root)) == 90


def test_zero_latency_replies_vary_with_their_prompt_and_repeat_for_the_same_one():
    """A scale run's caches (distinct texts encoded once) must not hide work: replies differ by prompt."""
    from cotrec.extract.prompts import key_terms_schema

    engine = ZeroLatencyEngine(LLMConfig(backend="zero-latency"))
    try:
        first, second = [{"role": "user", "content": "user 1"}], [{"role": "user", "content": "user 2"}]
        replies = [g.text for g in engine.chat_sync([first, second, first])]
        assert replies[0] == replies[2] != replies[1] and all(r.startswith("Likes ") for r in replies)
        terms = engine.chat_sync([first, second], json_schema=key_terms_schema(5))
        assert all(g.status == "ok" for g in terms), terms
        assert terms[0].parsed != terms[1].parsed
    finally:
        engine.close()


class PromptRecordingEngine(ZeroLatencyEngine):
    """The zero-latency engine (no model) keeping every prompt it was sent: for orchestration tests."""

    def __init__(self):
        super().__init__(LLMConfig(backend="zero-latency"))
        self.prompts: list[str] = []

    async def _generate(self, conversations, settings, json_schema):
        self.prompts += [c[-1]["content"] for c in conversations]
        return await super()._generate(conversations, settings, json_schema)


@pytest.mark.parametrize("length", [3, 10, 11, 12, 19, 20, 27, 41])
def test_no_prompt_of_the_recurrence_shows_a_horizons_own_target(length):
    """Captured prompts: the test target is in no prompt at all; the valid target is in exactly one, the
    test walk's last window (train and valid have not seen it)."""
    labels = [f"item-{i:03d}" for i in range(60)]
    engine = PromptRecordingEngine()
    try:
        pool = ProgramPool("users", engine, ExtractConfig(), "movie", labels)
        train, valid, test = asyncio.run(pool.run([{"user_idx": 0, "history": np.arange(length)}]))
    finally:
        engine.close()
    valid_target, test_target = labels[length - 2], labels[length - 1]
    assert engine.prompts and not any(test_target in p for p in engine.prompts)
    assert sum(valid_target in p for p in engine.prompts) == 1
    assert train["items_consumed"] == valid["items_consumed"] == length - 2 and test["items_consumed"] == length - 1
    assert (valid["target_item_idx"], test["target_item_idx"]) == (length - 2, length - 1)
    # the trajectory: one state per window, in order, each after items all before the horizon's target
    for row, seen in ((train, length - 2), (test, length - 1)):
        assert row["trajectory_ends"] == sorted(row["trajectory_ends"]) and row["trajectory_ends"][-1] == seen
        assert len(row["trajectory"]) == row["windows"] and row["trajectory"][-1] == row["preference"]


def test_a_crashing_row_fails_alone_and_the_rest_of_its_batch_is_kept():
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="zero-latency"))
    try:
        pool = ProgramPool("users", engine, ExtractConfig(), "movie", labels=[f"item {i}" for i in range(20)])
        rows = [{"user_idx": 0, "history": np.arange(12)}, {"user_idx": 1, "history": np.array([1, 2, 99, 3])},
                {"user_idx": 2, "history": np.arange(5)}]
        records = asyncio.run(pool.run(rows))
    finally:
        engine.close()
    by_user = {u: [r for r in records if r["user_idx"] == u] for u in (0, 1, 2)}
    assert all(len(v) == 3 for v in by_user.values())
    assert {r["status"] for r in by_user[1]} == {"error"} and "IndexError" in by_user[1][0]["error"]
    assert {r["status"] for r in by_user[0] + by_user[2]} == {"ok"}


def test_bad_inputs_give_one_line_errors(demo_data, tmp_path):
    run = small_run(demo_data, tmp_path, users=[0, 1])
    bad = tmp_path / "pairs.csv"
    bad.write_text("user_idx,horizon,item_idx\n0,later,3\n")
    result = run_cli("extract", "perceptions", "--run-dir", str(run.root), "--pairs", str(bad), *ZERO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cotrec: error: {bad}: row 1: horizon 'later' is not train, valid, test or train@N (the train walk's state after item N)")
    result = run_cli("extract", "users", "--run-dir", str(tmp_path / "nothing"), *ZERO)
    assert result.returncode == 2 and "run `cotrec prepare` first" in result.stderr
    result = run_cli("extract", "users", "--run-dir", str(run.root), "--set", "extract.overlap=10")
    assert result.returncode == 2 and "extract: overlap (10) must be smaller than window (10)" in result.stderr


# -- the real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_incremental_update_matches_a_full_run_with_far_fewer_calls(demo_data, tmp_path):
    """Greedy decoding: continuing stored states over new items == walking the longer histories."""
    users = [97]  # one of the shortest demo histories (20 items); small windows make several of them
    small = [*REAL, "--set", "extract.window=4", "--set", "extract.overlap=1"]
    old = small_run(demo_data, tmp_path / "inc", users, drop_last=2)
    first = run_cli("extract", "users", "--run-dir", str(old.root), *small)
    assert first.returncode == 0, first.stderr
    # New interactions arrive: the full histories replace the truncated ones.
    full = small_run(demo_data, tmp_path / "full", users)
    shutil.copy(full.root / "data" / "interactions.parquet", old.root / "data" / "interactions.parquet")
    incremental = run_cli("extract", "users", "--run-dir", str(old.root), "--incremental", *small)
    assert incremental.returncode == 0, incremental.stderr
    fresh = run_cli("extract", "users", "--run-dir", str(full.root), *small)
    assert fresh.returncode == 0, fresh.stderr

    def calls(output: str) -> int:
        return int(next(line for line in output.splitlines() if line.startswith("LLM calls")).split()[2].replace(",", ""))

    a, b = preferences(old.root), preferences(full.root)
    assert len(a) == len(b) == 3 and a["continued"].all() and not b["continued"].any()
    assert (a["windows"] == b["windows"]).all()
    assert a["preference"].tolist() == b["preference"].tolist()
    assert [list(x) for x in a["short_term"]] == [list(x) for x in b["short_term"]]
    assert [list(x) for x in a["trajectory"]] == [list(x) for x in b["trajectory"]]
    assert [list(x) for x in a["trajectory_ends"]] == [list(x) for x in b["trajectory_ends"]]
    assert calls(incremental.stdout) <= 0.4 * calls(fresh.stdout)


@pytest.mark.slow
def test_a_killed_users_job_resumes_without_redoing_or_duplicating_users(demo_data, tmp_path):
    run = small_run(demo_data, tmp_path, users=[97, 82, 91, 98])
    folder = run.root / "extract" / "preferences"
    command = [sys.executable, "-m", "cotrec", "extract", "users", "--run-dir", str(run.root), *REAL,
               "--set", "extract.in_flight=1"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(shard_files(folder)) < 2 and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the job and the Ray it started: everything in its session
        job.wait()
    before = read_shards(folder)
    done_before = set(before["user_idx"])
    assert 1 <= len(done_before) < 4, "the kill should land part-way"
    (folder / ".part-00000000000000000000-halfwritten.parquet.tmp").write_bytes(b"PAR1 truncated")
    rerun = run_cli("extract", "users", "--run-dir", str(run.root), *REAL, "--set", "extract.in_flight=1")
    assert rerun.returncode == 0, rerun.stderr
    assert f"rows          {4 - len(done_before)} run, {len(done_before)} already done" in rerun.stdout
    after = preferences(run.root)
    assert len(after) == 12 and not after.duplicated(["user_idx", "horizon"]).any()
    kept = after[after["user_idx"].isin(done_before)].set_index(["user_idx", "horizon"])["created_at"]
    original = before.set_index(["user_idx", "horizon"])["created_at"]
    assert (kept == original.loc[kept.index]).all()  # finished users were not redone


@pytest.mark.slow
def test_descriptions_and_perceptions_on_vllm(vllm_engine, demo_data):
    """What the embedded model writes: descriptions, role-played reviews, JSON key terms."""
    run = RunDir(demo_data)
    config = load_config("demo")
    items = pd.read_parquet(demo_data / "data" / "items.parquet")
    pool = ProgramPool("items", vllm_engine, config.extract, "movie")
    described = asyncio.run(pool.run(item_rows(items).head(6).to_dict("records")))
    assert [r["status"] for r in described] == ["ok"] * 6
    assert all(len(r["description"].split()) >= 5 for r in described)

    pairs = pd.DataFrame({"user_idx": [0, 0, 1, 1], "horizon": ["test"] * 4, "item_idx": [0, 1, 2, 3]})
    folder = demo_data / "extract" / "preferences"
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder, [{"user_idx": u, "horizon": "test", "preference": text, "short_term": [text], "status": "ok",
                          "created_at": time.time()} for u, text in
                         ((0, "Likes light-hearted animated comedies for the whole family."),
                          (1, "Likes tense thrillers and spy action."))], PROGRAMS["users"].schema)
    rows = pair_rows(pairs, run, items)
    perceived = asyncio.run(ProgramPool("perceptions", vllm_engine, config.extract, "movie").run(
        rows.to_dict("records")))
    shutil.rmtree(folder)
    for record in perceived:
        assert record["status"] == "ok", record["error"]
        assert len(record["review"].split()) >= 5
        assert 1 <= len(record["key_terms"]) <= config.extract.max_key_terms
        assert all(isinstance(t, str) and t for t in record["key_terms"])


def test_user_rows_put_the_longest_walks_first(demo_data):
    from cotrec.extract.preference import planned_steps

    interactions = pd.read_parquet(demo_data / "data" / "interactions.parquet")
    config = load_config("demo", ["extract.max_windows=null"])
    rows = user_rows(user_histories(interactions), config)
    lengths = rows["history"].map(len).to_numpy()
    assert lengths[0] == lengths.max() and lengths[-1] == lengths.min()
    capped = load_config("demo")  # the demo caps the walk: every long user plans the same steps
    capped_rows = user_rows(user_histories(interactions), capped)
    steps = planned_steps(capped_rows["history"].map(len).to_numpy(), capped.extract).tolist()
    assert steps == sorted(steps, reverse=True)
    assert rows["source_digest"].iloc[0] == history_digest(rows["history"].iloc[0])


def test_histories_and_planned_steps_are_the_same_whatever_the_table_order(demo_data):
    """The users job skips the sort of a table already in (user, position) order and plans every
    row's steps at once; a shuffled table gives the same histories, and the plan is each row's."""
    from cotrec.extract.preference import planned_steps

    interactions = pd.read_parquet(demo_data / "data" / "interactions.parquet")
    shuffled = interactions.sample(frac=1.0, random_state=0)
    ordered, from_shuffled = user_histories(interactions), user_histories(shuffled)
    assert ordered["user_idx"].tolist() == from_shuffled["user_idx"].tolist()
    assert all(np.array_equal(a, b) for a, b in zip(ordered["history"], from_shuffled["history"]))
    lengths = np.arange(3, 300)
    for config in (ExtractConfig(), ExtractConfig(max_windows=1), ExtractConfig(max_windows=3, window=7, overlap=3)):
        w, o, cap = config.window, config.overlap, config.max_windows
        walked = [len(window_bounds(capped_start(n - 2, w, o, cap), n - 2, w, o)) + 1 for n in lengths.tolist()]
        assert planned_steps(lengths, config).tolist() == walked


def test_the_cap_walks_only_the_last_windows_and_test_continues_train():
    from cotrec.config import LLMConfig
    from cotrec.llm import make_engine

    engine = make_engine(LLMConfig(backend="zero-latency"))
    try:
        config = ExtractConfig(max_windows=2)
        pool = ProgramPool("users", engine, config, "movie", labels=[f"item {i}" for i in range(100)])
        history = np.arange(60)
        records = {r["horizon"]: r for r in asyncio.run(pool.run([{"user_idx": 0, "history": history}]))}
    finally:
        engine.close()
    train, test = records["train"], records["test"]
    assert train["windows"] == 2 and train["history_start"] == capped_start(58, 10, 2, 2) > 0
    assert records["valid"]["preference"] == train["preference"] and records["valid"]["calls"] == 0
    assert test["history_start"] == train["history_start"] and test["items_consumed"] == 59
    assert test["windows"] == len(window_bounds(train["history_start"], 59, 10, 2))
    assert test["calls"] <= 2  # the partial last window again, with the valid item, and its merge
    assert history[58] not in history[train["history_start"]:58] and test["target_item_idx"] == 59


class SlowEchoFakeEngine(ZeroLatencyEngine):
    """For testing the recurrence's orchestration only (no model): each reply takes a moment and is
    a digest of its prompt, and the engine records the most sequences it held at once."""

    def __init__(self):
        super().__init__(LLMConfig(backend="zero-latency"))
        self.active = self.peak = 0

    async def _generate(self, conversations, settings, json_schema):
        self.active += len(conversations)
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.01)
        self.active -= len(conversations)
        return [Generation(f"Likes {history_digest([ord(c) for c in conversation[-1]['content']])}.",
                           finish_reason="stop", prompt_tokens=1, completion_tokens=1) for conversation in conversations]


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_interests_asked_ahead_change_the_concurrency_not_the_result(ahead):
    engine = SlowEchoFakeEngine()
    try:
        def walk_all(ahead):
            config = ExtractConfig(interests_ahead=ahead, max_windows=None)
            pool = ProgramPool("users", engine, config, "movie", labels=[f"item {i}" for i in range(100)])
            return {r["horizon"]: r for r in asyncio.run(pool.run([{"user_idx": 0, "history": np.arange(45)}]))}

        strict = walk_all(0)
        engine.peak = 0
        records = walk_all(ahead)
    finally:
        engine.close()
    # One user: strictly one call at a time without lookahead, a merge beside the next interests with it.
    assert engine.peak == 1 + ahead
    for horizon in ("train", "valid", "test"):
        for column in ("preference", "short_term", "windows", "settled_windows", "calls", "status"):
            assert records[horizon][column] == strict[horizon][column], (horizon, column)
    assert records["train"]["windows"] == 6 and records["test"]["calls"] == 2


@pytest.mark.parametrize("ahead", [0, 1])
def test_the_bench_stage_per_step_design_walks_the_same_recurrence_as_the_programs(ahead):
    """The bench's stage-per-step baseline must compute what the users job computes, call for call."""
    from cotrec.bench.extract_designs import walk_in_steps, window_step
    from cotrec.extract.prompts import domain_of

    engine = SlowEchoFakeEngine()
    config = ExtractConfig(interests_ahead=ahead, max_windows=None)
    labels = [f"item {i}" for i in range(100)]
    rows = [{"user_idx": u, "history": np.arange(u, u + length)} for u, length in enumerate([12, 45, 27, 30])]
    try:
        def step(current, interests, later, preferences):
            out, asked, counts = asyncio.run(engine.run_on_loop(
                window_step(engine, current, interests, later, preferences, config, domain_of("movie"))))
            return out, asked, counts, {}

        stages = walk_in_steps(rows, config, labels, step)
        pool = ProgramPool("users", engine, config, "movie", labels=labels)
        records = asyncio.run(pool.run(rows))
    finally:
        engine.close()
    assert stages["test_preferences"] == {r["user_idx"]: r["preference"] for r in records if r["horizon"] == "test"}
    assert stages["calls"] == sum(r["calls"] for r in records)
    longest = 7  # user 1 (45 items): 6 train windows, then the test walk's 1
    assert len(stages["steps"]) == longest
    # Without lookahead every step but the first waits for its interests, then for its merges.
    assert stages["barriers"] == (2 * longest - 1 if ahead == 0 else longest)


def test_slots_bound_the_programs_in_flight_and_survive_cancellation():
    from cotrec.extract.concurrency import Slots

    async def main():
        slots, active, peak = Slots(3), [0], [0]

        async def program(seconds):
            async with slots:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                await asyncio.sleep(seconds)
                active[0] -= 1

        tasks = [asyncio.ensure_future(program(0.01)) for _ in range(20)]
        stuck = asyncio.ensure_future(program(0.01))  # waits for a slot, then is cancelled
        await asyncio.sleep(0)
        stuck.cancel()
        await asyncio.gather(*tasks)
        assert stuck.cancelled() and peak[0] == 3 and active[0] == 0
        assert slots.free == 3 and not slots.waiters  # every slot came back

    asyncio.run(main())


def test_a_step_started_eagerly_needs_a_task_only_when_it_waits():
    """Interests asked ahead start at once: one that never waits (an instant engine) is a finished
    future and no task; one that waits is finished by a task, which passes cancellation and errors."""
    from cotrec.extract.concurrency import start_eagerly

    async def main():
        events = []

        async def instant(value):
            events.append(f"ran {value}")
            return value

        async def waiting(value, fail=False, first_wait=0.01):
            events.append(f"started {value}")
            try:
                await asyncio.sleep(first_wait)
                await asyncio.sleep(0)  # waits twice: the task drives every wait, not only the first
            except asyncio.CancelledError:
                events.append(f"cancelled {value}")
                raise
            if fail:
                raise ValueError(f"bad {value}")
            return value

        tasks_before = len(asyncio.all_tasks())
        done = start_eagerly(instant(1))
        assert done.done() and done.result() == 1 and events == ["ran 1"]
        assert len(asyncio.all_tasks()) == tasks_before  # no task for a step that never waited
        assert await done == 1

        later = start_eagerly(waiting(2))
        assert events[-1] == "started 2" and not later.done()  # it ran up to its wait before returning
        assert len(asyncio.all_tasks()) == tasks_before + 1
        assert await later == 2

        failing = start_eagerly(waiting(3, fail=True))
        with pytest.raises(ValueError, match="bad 3"):
            await failing
        for first_wait in (0.01, 0):  # on a future, or on nothing (the task throws the cancellation in)
            cancelled = start_eagerly(waiting(4, first_wait=first_wait))
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert events[-1] == "cancelled 4"  # the cancellation reached the coroutine's own wait

        async def raises_at_once():
            raise KeyError("at once")

        with pytest.raises(KeyError):
            await start_eagerly(raises_at_once())

    asyncio.run(main())


def test_lanes_keep_a_batch_in_flight_up_to_the_slots_in_row_order_with_a_sleeping_program():
    """The pool runs a batch's rows in lanes: two batches share the slots, reach them, keep each
    row's records in its place and its failure to itself; a cancelled batch leaves nothing running."""
    from cotrec.extract.programs import Program

    active, peak = [0], [0]

    async def sleeping_program(row, ctx):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            await asyncio.sleep(0.02 * (1 + row["user_idx"] % 3))
            if row["user_idx"] == 7:
                raise ValueError("bad row")
            return [{"user_idx": row["user_idx"], "status": "ok"}]
        finally:
            active[0] -= 1

    def failed(row, error):
        return [{"user_idx": row["user_idx"], "status": "error", "error": error}]

    def pool_of(in_flight):
        pool = ProgramPool("users", engine, ExtractConfig(in_flight=in_flight), "movie")
        pool.program = Program("users", "unused", ("user_idx",), sleeping_program, failed, PROGRAMS["users"].schema)
        return pool

    async def two_batches(pool, rows):
        return await asyncio.gather(*(pool.run([{"user_idx": i} for i in range(rows)]) for _ in range(2)))

    async def cancelled(pool):
        batch = asyncio.ensure_future(pool.run([{"user_idx": i} for i in range(500)]))
        await asyncio.sleep(0.03)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        await asyncio.sleep(0.01)
        return active[0], pool._slots.free

    engine = ZeroLatencyEngine(LLMConfig(backend="zero-latency"))
    try:
        for in_flight, rows in ((16, 100), (1000, 100), (1, 8)):
            peak[0] = 0
            pool = pool_of(in_flight)
            first, second = asyncio.run(two_batches(pool, rows))
            assert first == second and [r["user_idx"] for r in first] == list(range(rows))
            assert first[7]["status"] == "error" and "ValueError: bad row" in first[7]["error"]
            assert sum(r["status"] == "ok" for r in first) == rows - 1
            assert peak[0] == min(in_flight, 2 * rows) and pool._slots.free == in_flight
        assert asyncio.run(cancelled(pool_of(50))) == (0, 50)
    finally:
        engine.close()


def test_the_scale_bench_puts_synthetic_users_through_the_real_runner(tmp_path):
    """`bench extract --parts scale` on a few thousand users: every user's three rows come back, none failed."""
    import json

    out = tmp_path / "scale.json"
    result = run_cli("bench", "extract", "--parts", "scale", "--scale-users", "3000", "--out", str(out))
    assert result.returncode == 0, result.stderr
    scale = json.loads(out.read_text())["scale"]
    assert scale["rows_done"] == 3000 and scale["records"] == 9000 and scale["failed_records"] == 0
    assert scale["backend"] == "zero-latency" and scale["calls"] >= 2 * 3000  # two windows per user at least
    assert scale["ray_data_start_s"] > 0 and scale["users_per_s"] > 0 and scale["shards"] == 2


def test_the_instruction_count_bench_runs_its_users_through_an_extract_worker(tmp_path, monkeypatch):
    """What `python -m cotrec.bench.instructions` has valgrind count, run without valgrind: the first
    30 of 40 synthetic users go through one ExtractWorker, every one of their rows written ok."""
    from cotrec.bench import instructions
    from cotrec.extract.shards import read_shards

    folder = tmp_path / "shards"
    folder.mkdir()
    monkeypatch.setattr(instructions.tempfile, "mkdtemp", lambda prefix: str(folder))
    monkeypatch.setattr(instructions.shutil, "rmtree", lambda path, ignore_errors=False: None)  # kept to be read
    monkeypatch.setattr(sys, "argv", ["instructions", "--inner", "30", "40"])
    assert instructions.main() == 0
    rows = read_shards(folder)
    assert sorted(set(rows["user_idx"])) == list(range(30)) and len(rows) == 30 * 3  # a row per horizon
    assert (rows["status"] == "ok").all()


@pytest.mark.slow
def test_an_extraction_actor_killed_mid_job_loses_no_row_and_duplicates_none_once_compacted():
    """SIGKILL one of the two actors after the first shard: Ray Data restarts it and runs its batches
    again; a batch it had already written comes back twice and the folder's compaction keeps one."""
    import ray

    from cotrec.bench.faults import actor_killed
    from cotrec.config import load_config

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        result = actor_killed(load_config("demo"), users=30_000)
    finally:
        ray.shutdown()
    assert result["killed"] and "ExtractWorker" in result["killed"]["title"]
    assert result["after_compaction"] == {"rows": 90_000, "keys": 90_000, "lost": 0, "duplicated": 0, "unexpected": 0}
    assert result["before_compaction"]["lost"] == 0 and result["failed_rows"] == 0 and result["ok"]


def test_an_actor_whose_engine_died_ends_itself_instead_of_writing_failed_rows(tmp_path, monkeypatch):
    """The engine dead under a batch: the actor asks to be replaced (Ray Data then runs the batch on a
    new actor) and writes no shard of failures."""
    import pyarrow as pa

    from cotrec.extract import runner
    from cotrec.config import load_config

    config = load_config("demo", ["llm.backend=zero-latency"])
    worker = runner.ExtractWorker("users", config.llm.model_dump(mode="json"), config.extract.model_dump(mode="json"),
                                  "movie", str(tmp_path), [f"item {i}" for i in range(20)])
    asked = []

    def replace_actor(reason):
        asked.append(reason)
        raise SystemExit(70)

    monkeypatch.setattr(runner, "replace_actor", replace_actor)
    batch = pa.Table.from_pylist([{"user_idx": 0, "history": list(range(12)), "source_digest": "x"}])
    asyncio.run(worker(batch))
    assert len(shard_files(tmp_path)) == 1 and not asked  # a live engine: the batch is written
    worker.engine.close()  # what a dead engine looks like to the actor
    with pytest.raises(SystemExit):
        asyncio.run(worker(batch))
    assert len(asked) == 1 and "engine died" in asked[0] and len(shard_files(tmp_path)) == 1


def test_compaction_drops_superseded_rows_and_rewrites_only_the_shards_that_held_them(tmp_path):
    program = PROGRAMS["items"]

    def rows(items, created_at, text):
        return [{"item_idx": i, "description": f"{text} {i}", "status": "ok", "created_at": created_at,
                 "model": "m", "prompt_version": "v", "source_digest": "d", "calls": 1, "prompt_tokens": 1,
                 "completion_tokens": 1} for i in items]

    first = write_shard(tmp_path, rows([1, 2, 3], 1.0, "old"), program.schema)
    second = write_shard(tmp_path, rows([2, 4], 2.0, "new"), program.schema)
    third = write_shard(tmp_path, rows([5, 6], 1.0, "old"), program.schema)
    before = latest_rows(read_shards(tmp_path), program.key).sort_values("item_idx").reset_index(drop=True)
    assert compact(tmp_path, program) == 1
    names = [f.name for f in shard_files(tmp_path)]
    assert first.name not in names and second.name in names and third.name in names and len(names) == 3
    after = read_shards(tmp_path).sort_values("item_idx").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)          # one row per key, the newest, nothing lost
    assert after.loc[after.item_idx == 2, "description"].item() == "new 2"
    assert compact(tmp_path, program) == 0 and [f.name for f in shard_files(tmp_path)] == names
