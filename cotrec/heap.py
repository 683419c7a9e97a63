"""Handing memory a process freed back to the system, between stages and after large reads.

Two allocators keep freed memory for reuse: glibc's heap (Python objects, pandas) and Arrow's
memory pool (every Parquet read; mimalloc by default). Without a release, a long-lived process
such as the job's driver keeps each stage's peak as its RSS for the rest of the job.
"""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Release what glibc's heap and Arrow's pool hold free; costs a pass over their free lists."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
