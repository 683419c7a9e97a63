"""The retriever's training rows as a Ray Dataset, read by Ray Train workers (`get_dataset_shard`).

The driver cuts the users into blocks in one fixed shuffled order, so that every block is a
sample of all users and a worker's shuffled chunk mixes many users rather than one user's
neighbouring rows; Ray tasks cut each block's rows from the histories in the object store
(`training_rows_of_users`), and the set is materialised before training starts, because the Train
workers then hold the CPUs a task would need and every epoch reads the same rows. The driver
holds only the blocks' references.

Ray Train splits the set equally across the workers (DDP needs the same number of steps on each);
each epoch a worker reads its shard in chunks of a few batches, each permuted by a generator seeded
by the training's seed, the epoch and its rank (`epoch_batches`), so a seeded run on one worker
repeats exactly.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np

from cotrec.cluster import from_object_store
from cotrec.retriever.data import training_rows_of_users

USERS_PER_BLOCK = 4096
# The users' order across blocks is part of the data, not of a training: every seed and variant
# with the same row layout reads the same blocks (and the grid builds them once).
USER_ORDER_SEED = 0
# A worker permutes its shard in chunks of this many of its batches.
SHUFFLE_CHUNK_BATCHES = 16


def _rows_of_block(batch: dict[str, np.ndarray], sequences: Any, max_len: int, user_token: bool,
                   stride: int) -> dict[str, np.ndarray]:
    rows = training_rows_of_users(from_object_store(sequences), batch["user_idx"], max_len, user_token, stride)
    return {name: column.astype(np.int32) for name, column in rows.items()}  # ids fit; half the store


def training_dataset(sequences: Any, num_users: int, max_len: int, user_token: bool, stride: int) -> Any:
    """The materialised Ray Dataset of every user's training rows (`items`, `targets`, `users`,
    int32), from the flat histories or their object-store reference."""
    import pyarrow as pa
    import ray

    order = np.random.default_rng(USER_ORDER_SEED).permutation(num_users)
    chunks = np.array_split(order, max(1, math.ceil(num_users / USERS_PER_BLOCK)))
    # from_blocks keeps the blocks as cut and runs no metadata task (which waits for a free CPU)
    dataset = ray.data.from_blocks([pa.table({"user_idx": chunk}) for chunk in chunks]).map_batches(
        _rows_of_block, batch_size=None, batch_format="numpy",
        fn_kwargs={"sequences": sequences, "max_len": max_len, "user_token": user_token, "stride": stride})
    dataset.context.execution_options.preserve_order = True  # the same rows in the same order every run
    dataset.context.enable_progress_bars = False
    return dataset.materialize()


def shuffled_batches(columns: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator,
                     device: Any) -> Iterator[tuple[Any, Any, Any]]:
    """`columns`' rows in one permutation drawn from `rng`, as (items, targets, users) int64 tensors on
    `device`, `batch_size` rows at a time: an in-process epoch, or one chunk of a worker's shard."""
    import torch

    order = rng.permutation(len(columns["users"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield tuple(torch.as_tensor(columns[name][idx], device=device).long() for name in ("items", "targets", "users"))


def epoch_batches(shard: Any, batch_size: int, seed: int, epoch: int, rank: int,
                  device: Any) -> Iterator[tuple[Any, Any, Any]]:
    """One epoch of a worker's shard: chunks of SHUFFLE_CHUNK_BATCHES batches, each shuffled by a
    generator seeded by the training's seed, the epoch and the rank (every chunk but the last is
    whole batches, so equal shards give every worker the same number of steps)."""
    rng = np.random.default_rng((seed * 100_003 + epoch) * 1_009 + rank)
    for chunk in shard.iter_batches(batch_size=SHUFFLE_CHUNK_BATCHES * batch_size, batch_format="numpy"):
        yield from shuffled_batches(chunk, batch_size, rng, device)
