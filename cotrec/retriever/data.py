"""From the prepared interactions to SASRec tensors: training windows and leave-one-out queries.

Training rows (`training_rows`) slide over each user's train items with a stride: every target is
trained once per epoch with (nearly) the context evaluation gives it, while a row still trains
many targets, so an epoch stays a few thousand rows instead of one row per prefix.

Evaluation is leave-one-out: `valid` predicts the second-to-last item from the train items,
`test` the last item from train + valid items. The whole history (not only the last max_len
items the model reads) is what gets masked when history masking is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from cotrec.data.preprocess import SPLITS
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
        return cls.from_arrays(sequence_arrays(inter, num_items))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat (CSR) arrays: a fraction of the training rows' size, so a job ships these and each
        Train worker cuts its own rows."""
        lengths = np.fromiter((len(t) for t in self.train), dtype=np.int64, count=self.num_users)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(self.train) if self.num_users else np.zeros(0, dtype=np.int64)
        return {"num_users": np.int64(self.num_users), "num_items": np.int64(self.num_items), "train_items": flat,
                "train_indptr": indptr, "valid": self.valid, "test": self.test}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Sequences":
        flat, indptr = arrays["train_items"], arrays["train_indptr"]
        num_users = int(arrays["num_users"])
        return cls(num_users, int(arrays["num_items"]), [flat[indptr[u]:indptr[u + 1]] for u in range(num_users)],
                   arrays["valid"], arrays["test"])

    def history(self, split: str, user: int) -> np.ndarray:
        """The items a user has seen before the split's target."""
        return self.train[user] if split == "valid" else np.append(self.train[user], self.valid[user])

    def target(self, split: str) -> np.ndarray:
        return self.valid if split == "valid" else self.test


def training_rows(seqs: Sequences, max_len: int, user_token: bool, stride: int) -> dict[str, np.ndarray]:
    """Every user's training rows (`rows_of_histories` over all of `seqs`)."""
    return rows_of_histories(seqs.train, np.arange(seqs.num_users), max_len, user_token, stride)


def training_rows_of_users(arrays: dict[str, np.ndarray], users: np.ndarray, max_len: int, user_token: bool,
                           stride: int) -> dict[str, np.ndarray]:
    """The training rows of `users`, cut from the flat histories (`Sequences.to_arrays()`): what one
    block of the Ray Data training set holds."""
    flat, indptr = arrays["train_items"], arrays["train_indptr"]
    return rows_of_histories((flat[indptr[u]:indptr[u + 1]] for u in users), users, max_len, user_token, stride)


def rows_of_histories(histories: Iterable[np.ndarray], users: np.ndarray, max_len: int, user_token: bool,
                      stride: int) -> dict[str, np.ndarray]:
    """Training rows of the given users' train items: `items` (n, max_len) inputs, `targets`
    (n, max_len + user_token), `users` (n,).

    A user's rows end every `stride` items, from the end of their train items backwards; a row
    holds the up to max_len items before its end as input and trains only the targets no later row
    trains (its last `stride`), except the row that reaches the start of the history, which trains
    all of its targets. Every target is thus trained once per epoch, with at least
    max_len - stride + 1 items before it (or all it has): evaluation always reads max_len items,
    and targets trained on almost no context (disjoint windows) pull the model away from that.
    Ids are shifted by one (0 = padding / no target). With a user token, position 0 (the user
    alone) predicts the history's first item.
    """
    rows_items, rows_targets, rows_users = [], [], []
    offset = int(user_token)
    for user, seq in zip(users, histories):
        end = len(seq)
        while end > 0:
            begin = max(0, end - max_len - 1)  # the row's inputs are seq[begin:end-1]
            inputs = seq[begin:end - 1] + 1
            first = 0 if begin == 0 else end - stride  # the first target this row trains (index into seq)
            if begin == 0 and not user_token:
                first = 1
            row_i = np.zeros(max_len, dtype=np.int64)
            row_i[:inputs.size] = inputs
            row_t = np.zeros(max_len + offset, dtype=np.int64)
            positions = np.arange(first, end) - begin - 1 + offset  # where target j is predicted
            row_t[positions] = seq[first:end] + 1
            if first < end:
                rows_items.append(row_i)
                rows_targets.append(row_t)
                rows_users.append(user)
            if begin == 0:
                break
            end -= stride
    if not rows_users:
        return {"items": np.zeros((0, max_len), dtype=np.int64),
                "targets": np.zeros((0, max_len + offset), dtype=np.int64), "users": np.zeros(0, dtype=np.int64)}
    return {"items": np.stack(rows_items), "targets": np.stack(rows_targets),
            "users": np.asarray(rows_users, dtype=np.int64)}


def history_queries(histories: list[np.ndarray], users: np.ndarray, targets: np.ndarray,
                    max_len: int, masks: Optional[list[np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Queries for any histories: the last max_len items as model input, and the items to mask (CSR):
    the whole history, or per query the items `masks` gives."""
    n = len(histories)
    masks = histories if masks is None else masks
    items = np.zeros((n, max_len), dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int64)[-max_len:]
        items[row, :recent.size] = recent + 1
        lengths[row] = recent.size
        indptr[row + 1] = indptr[row] + len(masks[row])
    seen = np.concatenate([np.asarray(m, dtype=np.int64) for m in masks]) if n else np.zeros(0, dtype=np.int64)
    return {"users": np.asarray(users, dtype=np.int64), "items": items, "lengths": lengths,
            "targets": np.asarray(targets, dtype=np.int64), "seen_indptr": indptr, "seen_indices": seen}


def eval_queries(seqs: Sequences, split: str, max_len: int, users: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Leave-one-out queries of a split (for `users`, or every user): model inputs, targets and the
    histories to mask (CSR)."""
    users = np.arange(seqs.num_users, dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
    return history_queries([seqs.history(split, u) for u in users], users, seqs.target(split)[users], max_len)


def sequence_arrays(inter: pd.DataFrame, num_items: int) -> dict[str, np.ndarray]:
    """The histories as `Sequences.to_arrays()` gives them, straight from the interactions table
    (chronological per user), without a per-user list: what a driver holds for a million users."""
    users = inter["user_idx"].to_numpy()
    position = inter["position"].to_numpy()
    step = np.diff(users)
    if not ((step >= 0).all() and (np.diff(position)[step == 0] > 0).all()):  # prepare writes it in order
        order = np.lexsort((position, users))
        users, inter = users[order], inter.iloc[order]
    codes = pd.Categorical(inter["split"], categories=SPLITS).codes
    items = inter["item_idx"].to_numpy().astype(np.int64)
    num_users = int(users.max()) + 1 if len(users) else 0
    targets = {}
    for code, split in enumerate(SPLITS[1:], start=1):
        target = np.full(num_users, -1, dtype=np.int64)
        target[users[codes == code]] = items[codes == code]
        targets[split] = target
    if (targets["valid"] < 0).any() or (targets["test"] < 0).any():
        raise DataError("interactions: every user needs one valid and one test target")
    is_train = codes == 0
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users[is_train], minlength=num_users))]).astype(np.int64)
    return {"num_users": np.int64(num_users), "num_items": np.int64(num_items), "train_items": items[is_train],
            "train_indptr": indptr, "valid": targets["valid"], "test": targets["test"]}
