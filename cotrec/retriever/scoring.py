"""Retriever evaluation and candidate generation on a Ray Data actor pool.

In a Ray job each actor loads the trained SASRec from its `model.pt` and scores blocks of
leave-one-out queries (`evaluate.score_queries`: the full ranking over all items, history masked,
the target's rank and the top-M); the driver builds no model and only gathers ranks and
candidates. The pool is `retriever.num_workers` actors with the training workers' resources
(`cpus_per_worker`, `gpus_per_worker`). Blocks are exactly `retriever.eval_batch_size` queries of
one split, one forward pass each, so a query's scores do not depend on the pool's size. Without
Ray the same scoring runs in this process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from cotrec.cluster import map_on_actors
from cotrec.config import RetrieverConfig
from cotrec.progress import Progress
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.storage import as_path


def load_model(path: str | Path, device: str = "cpu") -> SASRec:
    with as_path(path).open("rb") as saved:  # a run directory's file, on disk or on a store
        state = torch.load(saved, map_location=device, weights_only=False)
    model = SASRec(SASRecConfig(**state["sasrec"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


class RetrieverScoringWorker:
    """The Ray Data actor: the trained model and the queries; a block of (split, row) -> ranks, top-M."""

    def __init__(self, model_path: str, queries: dict[str, dict[str, np.ndarray]], mask_history: bool, top_m: int,
                 threads: int, device: str):
        if device == "cpu":
            torch.set_num_threads(threads)  # the actor's CPU share
        self.model = load_model(model_path, device)
        self.queries = queries  # Ray Data puts the constructor's arguments in the object store once
        self.mask_history, self.top_m, self.device = mask_history, top_m, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (split,) = set(batch["split"].tolist())  # a block holds one split's rows
        rows = batch["row"]
        out = score_queries(self.model, self.queries[split], rows, self.mask_history, self.top_m,
                            batch_size=len(rows), device=self.device)
        return {"split": batch["split"], "row": rows, "rank": out["ranks"], "top_items": out["top_items"],
                "top_scores": out["top_scores"]}


def score_splits(config: RetrieverConfig, model_path: Path, queries: dict[str, dict[str, np.ndarray]],
                 on_actors: bool) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Per split, `score_queries`'s ranks and top-M for every query, on the actor pool or here; and
    the pool's size (0 here)."""
    if not on_actors:
        model = load_model(model_path)
        return {split: score_queries(model, q, np.arange(len(q["users"])), config.mask_history, config.top_m,
                                     config.eval_batch_size) for split, q in queries.items()}, 0
    size = config.eval_batch_size
    blocks = [pa.table({"split": [split] * len(rows), "row": rows})
              for split, q in queries.items()
              for rows in (np.arange(start, min(start + size, len(q["users"])))
                           for start in range(0, len(q["users"]), size))]
    total = sum(len(b) for b in blocks)
    out = {split: {"ranks": np.empty(len(q["users"]), dtype=np.int64),
                   "top_items": np.empty((len(q["users"]), 0), dtype=np.int64),
                   "top_scores": np.empty((len(q["users"]), 0), dtype=np.float32)} for split, q in queries.items()}
    actors = max(1, min(config.num_workers, len(blocks)))
    progress, done = Progress(total), 0
    kwargs = {"model_path": str(model_path), "queries": queries, "mask_history": config.mask_history,
              "top_m": config.top_m, "threads": max(1, int(config.cpus_per_worker)),
              "device": "cuda" if config.gpus_per_worker > 0 else "cpu"}
    for batch in map_on_actors(blocks, RetrieverScoringWorker, kwargs, actors=actors, cpus=config.cpus_per_worker,
                               gpus=config.gpus_per_worker, in_format="numpy", out_format="numpy"):
        for split in set(batch["split"].tolist()):
            target, mine = out[split], batch["split"] == split
            if target["top_items"].shape[1] == 0:
                width = batch["top_items"].shape[1]
                target["top_items"] = np.empty((len(target["ranks"]), width), dtype=np.int64)
                target["top_scores"] = np.empty((len(target["ranks"]), width), dtype=np.float32)
            rows = batch["row"][mine]
            target["ranks"][rows] = batch["rank"][mine]
            target["top_items"][rows] = batch["top_items"][mine]
            target["top_scores"][rows] = batch["top_scores"][mine]
        done += len(batch["row"])
        progress.update(done, lambda rate: f"retriever: {done:,} of {total:,} queries ranked on {actors} "
                                           f"actor(s) ({rate:,.0f} queries/s)")
    return out, actors

