"""Where a run's files live: a local path, or a URI that fsspec resolves (`s3://`, `gs://`, ...).

A run directory given as a URI is a `upath.UPath`, which has pathlib's methods (`/`, `exists`,
`open`, `read_text`, `glob`, `unlink`), so stages write `run / "x"` either way. What pathlib does
by renaming, an object store cannot do atomically, so the few operations that differ live here:
`replace_file` (a rename on disk; on a store a single PUT is already whole or absent, so writers
write the final name directly), `remove_tree`, `publish_folder` (on a store: the completion marker
copied last) and `local_copy` (for libraries that only read local folders: vLLM, transformers).

Credentials and endpoints come from the environment, as for any S3 client (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server); Ray Train's
`storage_path` (pyarrow's S3 client) reads the same variables.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

LOCAL_PROTOCOLS = ("", "file", "local")


def run_path(location: str | os.PathLike) -> Path:
    """A plain `Path` for a local location, a `UPath` for a URI."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        from upath import UPath

        # no cached listings: actors on other processes add shards the driver must see
        return UPath(text, use_listings_cache=False)
    return Path(text.removeprefix("file://"))


def as_path(location: Any) -> Path:
    """A path given as text or as a path object, as a path (of its kind)."""
    return location if isinstance(location, Path) or hasattr(location, "protocol") else run_path(location)


def is_remote(path: Any) -> bool:
    return getattr(path, "protocol", "") not in LOCAL_PROTOCOLS


def same_kind(path: Any, text: str | os.PathLike) -> Path:
    """`text` as a path of the same kind as `path` (for values read back from a record)."""
    return run_path(text) if is_remote(path) else Path(text)


def location(path: Path) -> str:
    """A path as text another process resolves the same way: absolute on disk, the URI on a store."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def replace_file(write: Callable[[Any], None], path: Path) -> None:
    """Have `write(target)` write a file and leave it at `path` only when whole: on disk under a
    hidden name renamed into place, on a store straight to `path` (an upload is published whole)."""
    if is_remote(path):
        write(path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Delete a folder and everything under it; nothing when it is absent."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


def files_under(folder: Path) -> list[Path]:
    """Every file under a folder (hidden ones included), as paths of the folder's kind."""
    if is_remote(folder):
        prefix = folder.path.rstrip("/") + "/"
        return [folder / name[len(prefix):] for name in sorted(folder.fs.find(folder.path)) if name.startswith(prefix)]
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def publish_folder(tmp: Path, final: Path, last: str) -> None:
    """Put a finished folder `tmp` at `final`, replacing what was there, with the file named `last`
    (the completion marker) arriving after every other. On disk: two renames. On a store, where a
    folder is a set of keys: the old marker goes first, then the old keys, the new keys are copied,
    and the marker last, so a reader never finds a marker beside a partial folder."""
    if not is_remote(final):
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        return
    (final / last).unlink(missing_ok=True)
    remove_tree(final)
    files = files_under(tmp)
    for source in sorted(files, key=lambda f: f.name == last):
        target = final / str(source.path)[len(tmp.path.rstrip("/")) + 1:]
        source.fs.copy(source.path, target.path)
    remove_tree(tmp)


def local_copy(path: Path) -> Path:
    """A local folder or file with `path`'s contents: `path` itself on disk, a download (kept per
    URI in the node's temporary folder, refreshed each call) for a store."""
    if not is_remote(path):
        return Path(path)
    digest = hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
    target = Path(tempfile.gettempdir()) / "cotrec-remote" / f"{digest}-{path.name}"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if path.is_dir():
        path.fs.get(path.path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
    else:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        path.fs.get_file(path.path, str(tmp))
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)
    return target


def upload(local: Path, path: Path) -> None:
    """Copy a local folder's files to `path` (a store) or into it (on disk)."""
    if is_remote(path):
        for source in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            path.fs.put_file(str(source), (path / str(source.relative_to(local))).path)
        return
    shutil.copytree(local, path, dirs_exist_ok=True)
