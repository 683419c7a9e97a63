"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Anything that is the user's doing (a bad path, a malformed file, a misspelled config key, a
model that cannot be found) is raised as `CotrecError` with a message that names the file,
line, column or key. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class CotrecError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        # Keep the message to one line whatever the cause carried.
        super().__init__(" ".join(str(message).split()))


class ConfigError(CotrecError):
    """Unknown key, wrong type or bad value in a run configuration."""


class DataError(CotrecError):
    """A data file that is missing, unreadable, malformed, or leaves nothing after filtering."""


def user_error_in(exc: BaseException) -> CotrecError | None:
    """The user's error that a Ray actor or task raised, rebuilt from the error Ray hands the driver
    (an actor that failed to start reaches it as ActorDiedError, with the remote traceback as text)."""
    found = re.findall(r"cotrec\.errors\.(\w+): ([^\n]+)", str(exc))
    if not found:
        return None
    name, message = found[-1]
    kind = {c.__name__: c for c in (CotrecError, ConfigError, DataError)}.get(name, CotrecError)
    return kind(message)
