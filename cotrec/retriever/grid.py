"""Table 1 (`retriever grid`): every `retriever.grid` variant over `retriever.grid_seeds` seeds, some
trainings at once, each row's mean and std over its seeds and its paired bootstrap interval against
None/Random; `finished_grid` reads the same table from what is already trained."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import pandas as pd

from cotrec.cluster import ensure_ray
from cotrec.config import Config
from cotrec.metrics import ndcg_gains, paired_bootstrap
from cotrec.reporting.tables import TABLE1, Table1, Table1Row, write_table1
from cotrec.retriever.histories import Histories
from cotrec.retriever.stage import train_variant
from cotrec.retriever.trained import read_metrics
from cotrec.retriever.variants import embedding_fingerprints, parse_variant, variant_dir
from cotrec.rundir import RunDir


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def retriever_grid(config: Config, run: RunDir, force: bool = False) -> Table1:
    """Train every `retriever.grid` variant for `retriever.grid_seeds` seeds; write reports/table1.md."""
    rc = config.retriever
    seeds = [config.seed + i for i in range(rc.grid_seeds)]
    # Check up front that every variant's inputs exist, so a missing extraction fails in one line
    # before any training.
    for name in rc.grid:
        user, item = parse_variant(name)
        embedding_fingerprints(config, run, user, item)
    started = time.perf_counter()
    trained = train_each(config, run, [(name, seed) for name in rc.grid for seed in seeds], force)
    rows: list[Table1Row] = []
    skipped = True
    for name in rc.grid:
        results = [trained[name, seed] for seed in seeds]
        skipped &= all(r["skipped"] for r in results)
        rows.append(grid_row(name, results))
    summary: Table1 = {"skipped": skipped, "rows": with_intervals(config, run, rows), "seeds": seeds,
                       "mask_history": rc.mask_history, "report": str(run / TABLE1),
                       "seconds": round(time.perf_counter() - started, 3)}
    write_table1(run, config, summary)
    return summary


def train_each(config: Config, run: RunDir, trainings: list[tuple[str, int]],
               force: bool = False) -> dict[tuple[str, int], dict[str, Any]]:
    """Train each (variant, seed), up to `retriever.concurrent_trainings` at once with the Ray
    trainer (each fit waits on its own worker group, so a driver thread per training is enough);
    the first failure cancels those not started and is raised once the running ones end."""
    rc = config.retriever
    at_once = min(rc.concurrent_trainings if rc.trainer == "ray" else 1, len(trainings))
    histories = Histories(run)  # read (and stored) once for every training, one at a time or at once
    if at_once <= 1:
        return {(name, seed): train_variant(config, run, name, seed, force, histories) for name, seed in trainings}
    ensure_ray()  # once, before the threads: each fit would otherwise race to start it
    pool = ThreadPoolExecutor(at_once, thread_name_prefix="retriever")
    futures = {(name, seed): pool.submit(train_variant, config, run, name, seed, force, histories)
               for name, seed in trainings}
    try:
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = next((future for future in done if future.exception() is not None), None)
        if failed is not None:
            failed.result()  # raises it; `finally` cancels the trainings not started
        return {key: future.result() for key, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def grid_row(variant: str, results: list[dict[str, Any]]) -> Table1Row:
    """One Table 1 row: a variant's test metrics, mean and std over its seeds, and whether any seed
    was stopped by `max_epochs` rather than by patience."""
    hit, hit_std = _mean_std([r["hit@10"] for r in results])
    ndcg, ndcg_std = _mean_std([r["ndcg@10"] for r in results])
    return {"variant": variant, "seeds": [r["seed"] for r in results], "hit@10": hit, "hit@10_std": hit_std,
            "ndcg@10": ndcg, "ndcg@10_std": ndcg_std, "best_epoch": float(np.mean([r["best_epoch"] for r in results])),
            "stopped_by_max_epochs": [r["seed"] for r in results if r.get("stopped_by_max_epochs")],
            "users": results[0]["users"]}


BASELINE = "none/random"  # Table 1's first row: what every other row is compared with


def test_gains(config: Config, run: RunDir, variant: str, seed: int) -> np.ndarray:
    """A trained variant's test NDCG@10 per user (in user order), from its candidates table."""
    user, item = parse_variant(variant)
    table = pd.read_parquet(str(run / variant_dir(config, user, item, seed) / "candidates.parquet"),
                            columns=["user_idx", "split", "target_rank"])
    test = table[table["split"] == "test"].sort_values("user_idx")
    return ndcg_gains(test["target_rank"].to_numpy(), 10)


def with_intervals(config: Config, run: RunDir, rows: list[Table1Row]) -> list[Table1Row]:
    """Each row's paired NDCG@10 difference to None/Random, per user and seed (the seeds both have),
    with its 95% bootstrap interval over users and seeds."""
    baseline = next((r for r in rows if r["variant"] == BASELINE), None)
    if baseline is None:
        return rows
    for row in rows:
        seeds = [s for s in row["seeds"] if s in baseline["seeds"]]
        if row is baseline or not seeds:
            continue
        differences = np.stack([test_gains(config, run, row["variant"], s) - test_gains(config, run, BASELINE, s)
                                for s in seeds])
        row["ndcg@10_vs_baseline"] = paired_bootstrap(differences, seed=config.seed)
    return rows


def finished_grid(config: Config, run: RunDir) -> Table1:
    """Table 1 from the variants already trained (any seeds finished), without training anything."""
    seeds = [config.seed + i for i in range(config.retriever.grid_seeds)]
    rows: list[Table1Row] = []
    for name in config.retriever.grid:
        user, item = parse_variant(name)
        stages = [variant_dir(config, user, item, seed) for seed in seeds]
        results = [read_metrics(run / stage) for stage in stages if run.completion(stage) is not None]
        if results:
            rows.append(grid_row(name, results))
    rows = with_intervals(config, run, rows)
    return {"rows": rows, "seeds": seeds, "mask_history": config.retriever.mask_history, "report": str(run / TABLE1)}
