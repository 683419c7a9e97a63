"""Fingerprints: what a stage's output was made from, as a short hash that a rerun compares.

Every stage records the fingerprint of its inputs (config sections, upstream fingerprints, shard
names) in its completion marker; a stage whose recorded fingerprint matches is skipped.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(parts: Any) -> str:
    """The first 16 hex digits of the sha256 of `parts` as sorted JSON (non-JSON values as str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
