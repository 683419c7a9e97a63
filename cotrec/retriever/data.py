"""From the prepared interactions to SASRec tensors: training windows and leave-one-out queries.

Training uses every position of every sequence in each step: a user's train items are cut into
windows of max_len + 1 items (from the most recent backwards, consecutive windows sharing one
item), the model reads the first max_len and predicts the next item at every position. One
epoch thus covers every train interaction once (about 3k rows for ml-100k) instead of one row per
prefix (~97k rows for RecBole's SASRec), which is what makes an epoch take seconds.

Evaluation is leave-one-out: `valid` predicts the second-to-last item from the train items,
`test` the last item from train + valid items. The whole history (not only the last max_len
items the model reads) is what gets masked when history masking is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cotrec.errors import DataError


@dataclass
class Sequences:
    """Per-user item sequences in chronological order, split into train items and the two targets."""

    num_users: int
    num_items: int
    train: list[np.ndarray]     # train items per user (item_idx, unshifted)
    valid: np.ndarray           # valid target per user
    test: np.ndarray            # test target per user

    @classmethod
    def from_interactions(cls, inter: pd.DataFrame, num_items: int) -> "Sequences":
        inter = inter.sort_values(["user_idx", "position"], kind="stable")
        num_users = int(inter["user_idx"].max()) + 1
        split = inter["split"].astype(str).to_numpy()
        users = inter["user_idx"].to_numpy()
        items = inter["item_idx"].to_numpy().astype(np.int64)
        valid = np.full(num_users, -1, dtype=np.int64)
        test = np.full(num_users, -1, dtype=np.int64)
        valid[users[split == "valid"]] = items[split == "valid"]
        test[users[split == "test"]] = items[split == "test"]
        if (valid < 0).any() or (test < 0).any():
            raise DataError("interactions: every user needs one valid and one test target")
        is_train = split == "train"
        bounds = np.searchsorted(users[is_train], np.arange(num_users + 1))
        train_items = items[is_train]
        train = [train_items[bounds[u]:bounds[u + 1]] for u in range(num_users)]
        return cls(num_users, num_items, train, valid, test)

    def history(self, split: str, user: int) -> np.ndarray:
        """The items a user has seen before the split's target."""
        return self.train[user] if split == "valid" else np.append(self.train[user], self.valid[user])

    def target(self, split: str) -> np.ndarray:
        return self.valid if split == "valid" else self.test


def training_windows(seqs: Sequences, max_len: int, user_token: bool) -> dict[str, np.ndarray]:
    """All training rows: `items` (n, max_len) inputs, `targets` (n, max_len + user_token), `users` (n,).

    Ids are shifted by one (0 = padding / no target). With a user token, position 0 (the user
    alone) is trained to predict the window's first item.
    """
    rows_items, rows_targets, rows_users = [], [], []
    width = max_len + 1
    for user, seq in enumerate(seqs.train):
        end = len(seq)
        while end > 0:
            chunk = seq[max(0, end - width):end] + 1
            inputs, targets = chunk[:-1], chunk[1:]
            if user_token:
                targets = chunk
            if targets.size:
                row_i = np.zeros(max_len, dtype=np.int64)
                row_i[:inputs.size] = inputs
                row_t = np.zeros(max_len + int(user_token), dtype=np.int64)
                row_t[:targets.size] = targets
                rows_items.append(row_i)
                rows_targets.append(row_t)
                rows_users.append(user)
            if end - width <= 0:
                break
            end -= max_len
    return {"items": np.stack(rows_items), "targets": np.stack(rows_targets),
            "users": np.asarray(rows_users, dtype=np.int64)}


def history_queries(histories: list[np.ndarray], users: np.ndarray, targets: np.ndarray,
                    max_len: int) -> dict[str, np.ndarray]:
    """Queries for any histories: the last max_len items as model input, the whole history to mask (CSR)."""
    n = len(histories)
    items = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int64)[-max_len:]
        items[row, :recent.size] = recent + 1
        lengths[row] = recent.size
        indptr[row + 1] = indptr[row] + len(history)
    seen = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if n else np.zeros(0, dtype=np.int64)
    return {"users": np.asarray(users, dtype=np.int64), "items": items, "lengths": lengths,
            "targets": np.asarray(targets, dtype=np.int64), "seen_indptr": indptr, "seen_indices": seen}


def eval_queries(seqs: Sequences, split: str, max_len: int) -> dict[str, np.ndarray]:
    """Leave-one-out queries of a split: model inputs, targets and the histories to mask (CSR)."""
    users = np.arange(seqs.num_users, dtype=np.int64)
    return history_queries([seqs.history(split, u) for u in users], users, seqs.target(split).copy(), max_len)
