"""The users job against its ceiling and against a naive loop (`cotrec bench extract --parts users,ceiling,naive`).

- `users`: the real users job (`extract_users` through the Ray Data runner, vLLM backend) on a
  temporary copy of the run's prepared data.
- `ceiling`: one vLLM engine with the same LLM settings gets the job's number of requests, of the
  job's mean prompt and reply lengths, all at once (no dependencies between them). The job's
  generated tokens/s over the ceiling's is the share of the engine's batch throughput that the
  dependent per-user programs keep.
- `naive`: one user at a time, one call at a time, on the transformers backend (an in-process
  `ProgramPool` with `in_flight=1`), over the job's first users.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
import time
from typing import Any

import pandas as pd

from cotrec.bench.common import load_average, rate
from cotrec.bench.prompts import MOVIES
from cotrec.config import Config
from cotrec.data.prepare import prepare
from cotrec.extract.prompts import domain_of, item_labels, short_term_interest
from cotrec.extract.runner import ProgramPool
from cotrec.extract.stage import HISTORY_COLUMNS, extract_users, user_histories, user_rows
from cotrec.llm import make_engine
from cotrec.progress import log
from cotrec.rundir import DATA_DIR, RunDir, read_stats, read_table

SCALING_CONCURRENCY = (1, 4, 16)  # batch sizes the ceiling's engine is also timed at


def temp_run(config: Config, run: RunDir) -> RunDir:
    """A temporary run directory holding the run's prepared data (prepared afresh if the run has none)."""
    tmp = RunDir(tempfile.mkdtemp(prefix="cotrec-bench-extract-"))
    if run.is_complete(DATA_DIR, config.fingerprint("data")):
        shutil.copytree(run / DATA_DIR, tmp / DATA_DIR)
    else:
        log(f"bench extract: {run / DATA_DIR} is not prepared for this config; preparing into {tmp.root}")
        prepare(config, tmp)
    tmp.write_config(config)
    return tmp


def first_users(run: RunDir, config: Config, count: int) -> pd.DataFrame:
    """The first `count` users by user_idx, as the users job's rows (what `extract_users --limit` runs)."""
    rows = user_rows(user_histories(read_table(run, "interactions", HISTORY_COLUMNS)), config)
    return rows.sort_values("user_idx").head(count).reset_index(drop=True)


def run_labels(run: RunDir) -> list[str]:
    return item_labels(read_table(run, "items"))


def run_domain(run: RunDir) -> str:
    return read_stats(run)["domain"]


def record_totals(records: list[dict[str, Any]]) -> dict[str, int]:
    return {"calls": sum(r["calls"] for r in records), "prompt_tokens": sum(r["prompt_tokens"] for r in records),
            "completion_tokens": sum(r["completion_tokens"] for r in records),
            "failed_rows": sum(r["status"] != "ok" for r in records)}


# -- 1. the users job ---------------------------------------------------------------------------
def measure_users_job(config: Config, tmp: RunDir, users: int) -> dict[str, Any]:
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
    return list(await asyncio.gather(*(engine.request(ids, params) for ids in prompts)))


def measure_ceiling(engine: Any, config: Config, requests: int, prompt_length: int,
                    output_length: int) -> dict[str, Any]:
    """The same number of requests, mean prompt and mean reply as the job, in one batch."""
    from vllm import SamplingParams  # the ceiling is a vLLM measurement: imported only when it runs

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
