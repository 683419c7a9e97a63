"""Reading a torch state file from a run directory without running anything in it.

A run directory is data: whoever can write there (a shared volume, a bucket) must not be able to
run code in every driver, actor and Serve replica that loads a model. `torch.load` with
`weights_only=True` unpickles only tensors, numbers, strings and containers; a file that holds
anything else (a class to build, a function to call) is refused before any of it runs, as a one-line
`DataError` naming the file.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO, Union

from cotrec.errors import DataError


def load_state(source: Union[str, Any, BinaryIO], where: Any = None, map_location: Any = "cpu") -> Any:
    """`torch.load(source, weights_only=True)`; `where` names the file in errors (default: `source`)."""
    import torch

    where = source if where is None else where
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{where}: refused: it holds objects other than tensors and plain values, which a "
                        f"state file cotrec writes never does (loading it could run code); write it again "
                        f"with cotrec") from None
    except (EOFError, RuntimeError) as exc:  # truncated, or not a torch file at all
        raise DataError(f"{where}: not a readable torch state file ({type(exc).__name__})") from None
