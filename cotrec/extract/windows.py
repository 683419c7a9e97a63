"""Windows over a chronological history, on one fixed grid.

Window k covers items [k*S, k*S + W) with stride S = W - O (W items, O of them shared with the
previous window); the last window may be partial. Because the grid depends only on W and O, a
history that grows keeps its earlier windows: a walk over the first L items and a walk over
L' > L items agree on every window that was complete (held W items) at L. That is what lets
the recurrence continue from a stored state instead of starting again.
"""

from __future__ import annotations

import array
import hashlib
import math
from collections.abc import Sequence

import numpy as np


def stride(window: int, overlap: int) -> int:
    return window - overlap


def count_windows(length: int, window: int, overlap: int) -> int:
    """Windows of the grid that start inside a history of `length` items."""
    if length <= 0:
        return 0
    return 1 + math.ceil(max(0, length - window) / stride(window, overlap))


def capped_start(length: int, window: int, overlap: int, max_windows: int | None) -> int:
    """First item walked when only the last `max_windows` windows are (a grid-aligned start)."""
    total = count_windows(length, window, overlap)
    if max_windows is None or total <= max_windows:
        return 0
    return (total - max_windows) * stride(window, overlap)


def window_bounds(start: int, length: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[begin, end) of each grid window from item `start` (grid-aligned) to the end of the history."""
    bounds = []
    begin = start
    while begin < length:
        end = min(begin + window, length)
        bounds.append((begin, end))
        if end == length:
            break
        begin += stride(window, overlap)
    return bounds


# Each digest copies this empty hasher: a copy costs less than a new blake2b, whose keyword
# arguments are parsed on every call.
_DIGEST = hashlib.blake2b(digest_size=8)


def history_digest(items: Sequence[int] | np.ndarray) -> str:
    """A short digest of an item sequence: tells whether a stored state was made from this prefix.
    It digests the items as native 64-bit integers, the same bytes from a list as from an array
    (a list's go through `array`, which is cheaper for a short list than numpy)."""
    hasher = _DIGEST.copy()
    hasher.update(array.array("q", items) if isinstance(items, list) else np.ascontiguousarray(items, dtype=np.int64))
    return hasher.hexdigest()
