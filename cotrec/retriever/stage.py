"""The retriever's stage: train one variant (`retriever train`); Table 1 is `grid.py`.

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

import time
from typing import Any, Optional

import numpy as np

from cotrec.cluster import in_ray_job
from cotrec.config import Config, RetrieverConfig
from cotrec.fingerprint import fingerprint
from cotrec.metrics import ranking_metrics
from cotrec.progress import log
from cotrec.retriever.histories import Histories
from cotrec.retriever.scoring import rank_and_write
from cotrec.retriever.train import TrainingJob, fit, peak_memory_mb
from cotrec.retriever.trained import read_metrics
from cotrec.retriever.variants import embedding_fingerprints, initial_tables, parse_variant, variant_dir, variant_name
from cotrec.rundir import RunDir, write_json
from cotrec.storage import remove_tree


def variant_fingerprint(config: Config, run: RunDir, user: str, item: str, seed: int) -> str:
    # What one variant's training depends on: data + retriever settings, minus the grid's own keys
    # (asking for more seeds, or training more at once, must not retrain the seeds already done),
    # the advice threshold and the nodes it runs on.
    retriever = config.retriever.model_dump(mode="json", exclude={"grid", "grid_seeds", "concurrent_trainings",
                                                                  "sampled_above_items", "resources"})
    if not retriever["sparse_user_updates"]:  # the default: trainings from before the key stay up to date
        del retriever["sparse_user_updates"]
    return fingerprint({"data": config.fingerprint("data"), "retriever": retriever, "variant": variant_name(user, item),
                        "seed": seed, "embeddings": embedding_fingerprints(config, run, user, item)})


def _build_job(config: Config, run: RunDir, user: str, item: str, seed: int,
               sequences: dict[str, np.ndarray]) -> tuple[TrainingJob, dict[str, Any]]:
    num_users = int(sequences["num_users"])
    item_init, user_init, notes = initial_tables(config, run, user, item, num_users, seed)
    job = TrainingJob.from_config(config.retriever, name=variant_name(user, item), seed=seed,
                                  num_users=num_users if user != "none" else 0, sequences=sequences,
                                  item_init=item_init, user_init=user_init)
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
    num_users, num_items = int(job.sequences["num_users"]), job.model.num_items
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
        result = fit(job, histories, folder / ".ray", folder / "model.pt")  # model.pt: what the evaluation loads
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
            "best_epoch": result.best_epoch, "epochs": len(result.history),
            # patience never ran out: the cap ended the training, and a longer one might do better
            "stopped_by_max_epochs": len(result.history) == rc.max_epochs
                                     and result.history[-1]["epoch"] - result.best_epoch < rc.patience,
            "trainer": rc.trainer, "num_workers": rc.num_workers, "loss": rc.loss, "scoring_actors": actors,
            "started_at": round(started_at, 3),  # Unix time: which of the grid's trainings overlapped
            "train_seconds": round(trained - started, 3),
            "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_memory_mb": max([peak_memory_mb()] + [h["peak_memory_mb"] for h in result.history]),
            **notes,
        }
        write_json(folder / "metrics.json", metrics)
        write_json(folder / "history.json", result.history)
        remove_tree(folder / ".ray")
    log(f"retriever: {variant_name(user, item)} seed {seed}: test ndcg@10 {metrics['ndcg@10']:.4f} "
        f"hit@10 {metrics['hit@10']:.4f} (best epoch {metrics['best_epoch']}, {metrics['wall_seconds']:.0f} s)")
    return {"skipped": False, "folder": str(run / stage), **metrics}
