"""Connecting to Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a local one.

`ray.init()` with no address joins any cluster already running on the machine, whoever started
it; a local run must not, so without RAY_ADDRESS we ask for `address="local"` explicitly.
"""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(**init_kwargs: Any) -> bool:
    """Initialise Ray once per process; returns True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray starts its workers at nice 15: on a busy machine a training epoch stretched from 6 s
    # to 65 s. The variable is read by the local Ray that ray.init starts below.
    os.environ.setdefault("RAY_worker_niceness", "0")
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if address == "local":
        kwargs.update(include_dashboard=False)
    kwargs.update(init_kwargs)
    ray.init(**kwargs)
    return True
