"""Retriever evaluation and candidate generation on a Ray Data actor pool.

In a Ray job each actor loads the trained SASRec from its `model.pt`, cuts each block's
leave-one-out queries from the flat histories and scores them (`evaluate.score_queries`: the full
ranking over all items, history masked, the target's rank and the top-M); the driver builds no
model and no queries: it writes the returned rows of the candidates table as they come and keeps
only the targets' ranks, for the metrics. The pool is `retriever.num_workers` actors with the
training workers' resources (`cpus_per_worker`, `gpus_per_worker`). Blocks are exactly
`retriever.eval_batch_size` users of one split, one forward pass each, so a query's scores do not
depend on the pool's size. Without Ray the same worker runs in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cotrec.cluster import from_object_store, map_on_actors
from cotrec.config import RetrieverConfig
from cotrec.progress import Progress
from cotrec.retriever.data import Sequences, eval_queries
from cotrec.retriever.evaluate import score_queries
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.safeload import load_state
from cotrec.storage import as_path


def load_model(path: str | Path, device: str = "cpu") -> SASRec:
    with as_path(path).open("rb") as saved:  # a run directory's file, on disk or on a store
        state = load_state(saved, as_path(path), map_location=device)
    model = SASRec(SASRecConfig(**state["sasrec"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval()


CANDIDATES_SCHEMA = pa.schema([("user_idx", pa.int64()), ("split", pa.string()), ("target_item", pa.int64()),
                               ("target_rank", pa.int64()), ("candidates", pa.list_(pa.int64())),
                               ("scores", pa.list_(pa.float32())), ("target_in_candidates", pa.bool_())])


class RetrieverScoringWorker:
    """The Ray Data actor: the trained model and the histories; a block of (split, user) -> the
    block's rows of the candidates table."""

    def __init__(self, model_path: str, sequences: Any, max_len: int, mask_history: bool,
                 top_m: int, threads: int, device: str):
        if device == "cpu":
            torch.set_num_threads(threads)  # the actor's CPU share
        self.model = load_model(model_path, device)
        # Ray Data puts the constructor's arguments in the object store once; each block's queries
        # are cut from these flat arrays, so no process ever holds every user's queries.
        self.seqs = Sequences.from_arrays(from_object_store(sequences))
        self.max_len, self.mask_history, self.top_m, self.device = max_len, mask_history, top_m, device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (split,) = set(batch["split"].tolist())  # a block holds one split's rows
        queries = eval_queries(self.seqs, split, self.max_len, users=batch["user_idx"])
        out = score_queries(self.model, queries, np.arange(len(queries["users"])), self.mask_history, self.top_m,
                            batch_size=len(queries["users"]), device=self.device)
        return {"split": batch["split"], "user_idx": queries["users"], "target_item": queries["targets"],
                "target_rank": out["ranks"], "candidates": out["top_items"], "scores": out["top_scores"]}


def candidates_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A scored block as rows of `candidates.parquet` (one per user and split)."""
    top = np.asarray(batch["candidates"], dtype=np.int64)
    scores = np.asarray(batch["scores"], dtype=np.float32)
    offsets = np.arange(len(top) + 1, dtype=np.int32) * top.shape[1]
    return pa.table({"user_idx": batch["user_idx"].astype(np.int64), "split": batch["split"].astype(str),
                     "target_item": batch["target_item"].astype(np.int64),
                     "target_rank": batch["target_rank"].astype(np.int64),
                     "candidates": pa.ListArray.from_arrays(offsets, top.ravel()),
                     "scores": pa.ListArray.from_arrays(offsets, scores.ravel()),
                     "target_in_candidates": (top == batch["target_item"][:, None]).any(axis=1)},
                    schema=CANDIDATES_SCHEMA)


def rank_and_write(config: RetrieverConfig, model_path: Path, num_users: int, sequences: Any, out: Path,
                   on_actors: bool) -> tuple[dict[str, np.ndarray], int]:
    """Rank every user's valid and test target with the model at `model_path`, streaming the
    candidates table into `out` block by block (split, then user order, whatever the pool's
    size); returns the targets' ranks per split, in user order, and the pool's size (0: here).
    `sequences`: the histories' arrays, or on actors their object-store reference."""
    size = config.eval_batch_size
    blocks = [{"split": np.full(min(size, num_users - start), split),
               "user_idx": np.arange(start, min(start + size, num_users))}
              for split in ("valid", "test") for start in range(0, num_users, size)]
    kwargs = {"model_path": str(model_path), "sequences": sequences, "max_len": config.max_len,
              "mask_history": config.mask_history, "top_m": config.top_m,
              "threads": max(1, int(config.cpus_per_worker)),
              "device": "cuda" if config.gpus_per_worker > 0 else "cpu"}
    actors = max(1, min(config.num_workers, len(blocks))) if on_actors else 0
    if on_actors:
        batches = map_on_actors([pa.table(b) for b in blocks], RetrieverScoringWorker, kwargs, actors=actors,
                                cpus=config.cpus_per_worker, gpus=config.gpus_per_worker,
                                resources=config.resources, in_format="numpy",
                                out_format="numpy", preserve_order=True)
    else:
        worker = RetrieverScoringWorker(**{**kwargs, "device": "cpu", "threads": torch.get_num_threads()})
        batches = (worker(block) for block in blocks)
    ranks = {split: np.full(num_users, -1, dtype=np.int64) for split in ("valid", "test")}
    progress, done, total = Progress(2 * num_users), 0, 2 * num_users
    with as_path(out).open("wb") as file, pq.ParquetWriter(file, CANDIDATES_SCHEMA) as writer:
        for batch in batches:
            (split,) = set(batch["split"].tolist())
            ranks[split][batch["user_idx"]] = batch["target_rank"]
            writer.write_table(candidates_table(batch))
            done += len(batch["user_idx"])
            progress.update(done, lambda rate: f"retriever: {done:,} of {total:,} queries ranked on "
                                               f"{actors or 'no'} actor(s) ({rate:,.0f} queries/s)")
    return ranks, actors
