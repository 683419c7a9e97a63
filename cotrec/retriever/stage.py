"""The retriever stages: train one variant (`retriever train`) and Table 1 (`retriever grid`).

Each (variant, seed) is a staged folder `<run>/retriever/<user>-<item>[-seed<k>]/` with
  model.pt            the best checkpoint (state dict + SASRec config + epoch)
  metrics.json        test metrics at the top level (hit@K, ndcg@K, users, seed, wall time, ...)
                      and the valid metrics under "valid"
  candidates.parquet  per user and split (valid, test): the top-M items and scores, the target,
                      its full-ranking rank and whether it is among the candidates
  history.json        per-epoch loss, valid metrics and timings
Its fingerprint covers the data and retriever config, the variant, the seed and the embeddings
it starts from, so a rerun with the same inputs is skipped.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from cotrec.cluster import ensure_ray, in_ray_job
from cotrec.config import Config, RetrieverConfig
from cotrec.errors import DataError
from cotrec.fingerprint import fingerprint
from cotrec.heap import return_freed_memory
from cotrec.metrics import ndcg_gains, paired_bootstrap, ranking_metrics
from cotrec.progress import log
from cotrec.reporting.tables import TABLE1, write_table1
from cotrec.retriever.data import sequence_arrays
from cotrec.retriever.ingest import training_dataset
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.retriever.scoring import rank_and_write
from cotrec.retriever.train import fit, peak_memory_mb
from cotrec.retriever.variants import (embedding_fingerprints, initial_tables, parse_variant,
                                       variant_dir, variant_name)
from cotrec.rundir import RunDir, read_table, write_json
from cotrec.safeload import load_state
from cotrec.storage import as_path, remove_tree


def variant_fingerprint(config: Config, run: RunDir, user: str, item: str, seed: int) -> str:
    # What one variant's training depends on: data + retriever settings, minus the grid's own keys
    # (asking for more seeds, or training more at once, must not retrain the seeds already done)
    # and the advice threshold.
    retriever = config.retriever.model_dump(mode="json", exclude={"grid", "grid_seeds", "concurrent_trainings",
                                                                  "sampled_above_items"})
    if not retriever["sparse_user_updates"]:  # the default: trainings from before the key stay up to date
        del retriever["sparse_user_updates"]
    return fingerprint({"data": config.fingerprint("data"), "retriever": retriever, "variant": variant_name(user, item),
                        "seed": seed, "embeddings": embedding_fingerprints(config, run, user, item)})


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


def _build_job(config: Config, run: RunDir, user: str, item: str, seed: int,
               sequences: dict[str, np.ndarray]) -> tuple[dict, dict]:
    rc = config.retriever
    num_users, num_items = int(sequences["num_users"]), int(sequences["num_items"])
    item_init, user_init, notes = initial_tables(config, run, user, item, num_users, seed)
    model = {"num_items": num_items, "num_users": num_users if user != "none" else 0,
             "dim": rc.dim, "max_len": rc.max_len, "layers": rc.layers, "heads": rc.heads, "ffn_mult": rc.ffn_mult,
             "dropout": rc.dropout, "sparse_users": rc.sparse_user_updates}
    counts = np.bincount(sequences["train_items"], minlength=num_items)
    job = {"name": variant_name(user, item), "seed": seed, "model": model, "item_init": item_init,
           "user_init": user_init, "sequences": sequences, "train_stride": rc.train_stride,
           "item_counts": counts, "lr": rc.lr, "weight_decay": rc.weight_decay, "batch_size": rc.batch_size,
           "max_epochs": rc.max_epochs, "patience": rc.patience, "loss": rc.loss, "negatives": rc.negatives,
           "sampler": rc.sampler, "mask_history": rc.mask_history, "eval_batch_size": rc.eval_batch_size,
           "cpus_per_worker": rc.cpus_per_worker, "checkpoint_every": rc.checkpoint_every, "log": True}
    return job, notes


def full_softmax_too_wide(rc: RetrieverConfig, num_items: int) -> bool:
    return rc.loss == "ce" and rc.sampled_above_items is not None and num_items > rc.sampled_above_items


# Past this many users a dense update of the user table costs a step more than the model does.
SPARSE_USERS_ADVISED_ABOVE = 100_000


def dense_user_table_too_large(rc: RetrieverConfig, user: str, num_users: int) -> bool:
    return user != "none" and not rc.sparse_user_updates and num_users > SPARSE_USERS_ADVISED_ABOVE


def train_variant(config: Config, run: RunDir, variant: str = "none/random", seed: Optional[int] = None,
                  force: bool = False, histories: Optional[Histories] = None) -> dict[str, Any]:
    """Train, evaluate and save one variant for one seed; skipped when up to date. `histories`:
    the run's, when several trainings share them."""
    user, item = parse_variant(variant)
    seed = config.seed if seed is None else seed
    stage = variant_dir(config, user, item, seed)
    fp = variant_fingerprint(config, run, user, item, seed)
    if not force and run.is_complete(stage, fp):
        log(f"retriever: {run / stage} is up to date; skipped")
        return {"skipped": True, "folder": str(run / stage), **read_metrics(run / stage)}
    rc = config.retriever
    started, started_at = time.perf_counter(), time.time()
    histories = histories or Histories(run)
    job, notes = _build_job(config, run, user, item, seed, histories.arrays())
    num_users, num_items = int(job["sequences"]["num_users"]), int(job["sequences"]["num_items"])
    if full_softmax_too_wide(rc, num_items):
        log(f"retriever: {num_items:,} items is past retriever.sampled_above_items ({rc.sampled_above_items:,}): "
            f"the full softmax scores every item for every target; set retriever.loss=sampled to train on "
            f"{rc.negatives:,} sampled negatives instead")
    if dense_user_table_too_large(rc, user, num_users):
        log(f"retriever: {num_users:,} users is past {SPARSE_USERS_ADVISED_ABOVE:,}: Adam updates every row of the "
            f"user table at every step; set retriever.sparse_user_updates=true to update only the batch's users")
    log(f"retriever: training {variant_name(user, item)} seed {seed} ({rc.trainer}, {rc.num_workers} "
        f"worker(s)) on the histories of {num_users:,} users, {num_items:,} items")
    with run.staged(stage, fp) as folder:
        rows = None
        if rc.trainer == "ray":
            ensure_ray()
            job["sequences"] = histories.for_ray_workers()
            rows = histories.training_rows(rc.max_len, job["model"]["num_users"] > 0, rc.train_stride)
        result = fit(job, rc, folder / ".ray", folder / "model.pt", rows)  # model.pt: what the evaluation loads
        trained = time.perf_counter()
        on_actors = in_ray_job()
        ranks, actors = rank_and_write(rc, folder / "model.pt", num_users,
                                       histories.for_ray_workers() if on_actors else histories.arrays(),
                                       folder / "candidates.parquet", on_actors=on_actors)
        users_per_second = 2 * num_users / max(time.perf_counter() - trained, 1e-9)
        evaluated = {split: {**ranking_metrics(split_ranks, rc.ks), "users": len(split_ranks),
                             "eval_users_per_second": users_per_second} for split, split_ranks in ranks.items()}
        metrics = {
            "variant": variant_name(user, item), "user_init": user, "item_init": item,
            "split": "test", **{k: v for k, v in evaluated["test"].items()},
            "valid": {"split": "valid", **evaluated["valid"]},
            "seed": seed, "mask_history": rc.mask_history, "ks": list(rc.ks), "top_m": rc.top_m,
            "best_epoch": result["best_epoch"], "epochs": len(result["history"]),
            # patience never ran out: the cap ended the training, and a longer one might do better
            "stopped_by_max_epochs": len(result["history"]) == rc.max_epochs
                                     and result["history"][-1]["epoch"] - result["best_epoch"] < rc.patience,
            "trainer": rc.trainer, "num_workers": rc.num_workers, "loss": rc.loss, "scoring_actors": actors,
            "started_at": round(started_at, 3),  # Unix time: which of the grid's trainings overlapped
            "train_seconds": round(trained - started, 3),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_memory_mb": max([peak_memory_mb()] + [h["peak_memory_mb"] for h in result["history"]]),
            **notes,
        }
        write_json(folder / "metrics.json", metrics)
        write_json(folder / "history.json", result["history"])
        remove_tree(folder / ".ray")
    log(f"retriever: {variant_name(user, item)} seed {seed}: test ndcg@10 {metrics['ndcg@10']:.4f} "
        f"hit@10 {metrics['hit@10']:.4f} (best epoch {metrics['best_epoch']}, {metrics['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / stage), **metrics}


def load_retriever(config: Config, run: RunDir, variant: str, unknown_user: bool = False) -> SASRec:
    """A trained variant's SASRec (the config seed's, in eval mode). `unknown_user`: a user-token model
    gets one more user row, the mean of the others, for users it has never seen."""
    user, item = parse_variant(variant)
    folder = run / variant_dir(config, user, item, config.seed)
    if not (folder / "model.pt").is_file():
        raise DataError(f"{folder}: no trained retriever (model.pt); run `cotrec retriever train "
                        f"--variant {user}/{item}` first")
    with (folder / "model.pt").open("rb") as saved:
        state = load_state(saved, folder / "model.pt")
    cfg, weights = SASRecConfig(**state["sasrec"]), dict(state["model"])
    if cfg.user_token and unknown_user:
        table = weights["user_emb.weight"]
        weights["user_emb.weight"] = torch.cat([table, table.mean(0, keepdim=True)])
        cfg = SASRecConfig(**{**state["sasrec"], "num_users": cfg.num_users + 1})
    model = SASRec(cfg)
    model.load_state_dict(weights)
    return model.eval()


def read_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((as_path(folder) / "metrics.json").read_text())


def format_train_summary(summary: dict[str, Any]) -> str:
    ks = summary.get("ks", [10])
    head = f"variant       {summary['variant']} (seed {summary['seed']})" + (
        "  [up to date, skipped]" if summary.get("skipped") else "")
    lines = [head,
             f"best epoch    {summary['best_epoch']} of {summary['epochs']}",
             f"history mask  {'on' if summary['mask_history'] else 'off'}",
             "test          " + "  ".join(f"hit@{k} {summary[f'hit@{k}']:.4f} ndcg@{k} {summary[f'ndcg@{k}']:.4f}"
                                         for k in ks if k in (5, 10, 20)),
             "valid         " + "  ".join(f"ndcg@{k} {summary['valid'][f'ndcg@{k}']:.4f}" for k in ks if k == 10),
             f"users         {summary['users']:,}",
             f"time          {summary['wall_seconds']:.1f} s",
             f"folder        {summary['folder']}"]
    return "\n".join(lines)


# --- Table 1 ---------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def retriever_grid(config: Config, run: RunDir, force: bool = False) -> dict[str, Any]:
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
    rows, skipped = [], True
    for name in rc.grid:
        results = [trained[name, seed] for seed in seeds]
        skipped &= all(r["skipped"] for r in results)
        rows.append(grid_row(name, results))
    summary = {"skipped": skipped, "rows": with_intervals(config, run, rows), "seeds": seeds,
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


def grid_row(variant: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One Table 1 row: a variant's test metrics, mean and std over its seeds, and whether any seed
    was stopped by `max_epochs` rather than by patience."""
    row: dict[str, Any] = {"variant": variant, "seeds": [r["seed"] for r in results]}
    for metric in ("hit@10", "ndcg@10"):
        row[metric], row[f"{metric}_std"] = _mean_std([r[metric] for r in results])
    row["best_epoch"] = float(np.mean([r["best_epoch"] for r in results]))
    row["stopped_by_max_epochs"] = [r["seed"] for r in results if r.get("stopped_by_max_epochs")]
    row["users"] = results[0]["users"]
    return row


BASELINE = "none/random"  # Table 1's first row: what every other row is compared with


def test_gains(config: Config, run: RunDir, variant: str, seed: int) -> np.ndarray:
    """A trained variant's test NDCG@10 per user (in user order), from its candidates table."""
    user, item = parse_variant(variant)
    table = pd.read_parquet(str(run / variant_dir(config, user, item, seed) / "candidates.parquet"),
                            columns=["user_idx", "split", "target_rank"])
    test = table[table["split"] == "test"].sort_values("user_idx")
    return ndcg_gains(test["target_rank"].to_numpy(), 10)


def with_intervals(config: Config, run: RunDir, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def finished_grid(config: Config, run: RunDir) -> dict[str, Any]:
    """Table 1 from the variants already trained (any seeds finished), without training anything."""
    seeds = [config.seed + i for i in range(config.retriever.grid_seeds)]
    rows = []
    for name in config.retriever.grid:
        user, item = parse_variant(name)
        stages = [variant_dir(config, user, item, seed) for seed in seeds]
        results = [read_metrics(run / stage) for stage in stages if run.completion(stage) is not None]
        if results:
            rows.append(grid_row(name, results))
    rows = with_intervals(config, run, rows)
    return {"rows": rows, "seeds": seeds, "mask_history": config.retriever.mask_history, "report": str(run / TABLE1)}


def format_grid_summary(summary: dict[str, Any]) -> str:
    lines = [f"{'variant':<24} {'hit@10':>17} {'ndcg@10':>17}"]
    for row in summary["rows"]:
        lines.append(f"{row['variant']:<24} {row['hit@10']:.4f} ± {row['hit@10_std']:.4f} "
                     f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f}")
    lines.append(f"seeds {', '.join(map(str, summary['seeds']))}; "
                 f"history {'masked' if summary['mask_history'] else 'not masked'}"
                 + ("  [up to date, skipped]" if summary.get("skipped") else f"; {summary['seconds']:.0f} s"))
    lines.append(f"report {summary['report']}")
    return "\n".join(lines)
