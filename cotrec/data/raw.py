"""A dataset as its source gives it, before any filtering, and the helpers loaders share.

Every loader returns a `RawDataset`: interactions with raw string ids and integer unix-second
timestamps in source order (that order breaks timestamp ties later), items with a caption (the
name or title shown to the LLM) and the source's attributes, and the dataset's domain.
Loaders raise `DataError` with the file and, where known, the line or column.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np
import pandas as pd

from cotrec.errors import DataError


@dataclass
class RawDataset:
    name: str
    domain: str  # movie | news | product | business
    interactions: pd.DataFrame  # user_id, item_id (str), timestamp (int64 s), [rating]
    items: pd.DataFrame  # item_id (str), caption (str), attributes...
    users: pd.DataFrame | None = None  # user_id (str), attributes...
    files: list[str] = field(default_factory=list)  # where it was read from


def require_file(folder: Path, *candidates: str) -> Path:
    """The first of `candidates` (glob patterns) that exists in `folder`, or a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder")
    for pattern in candidates:
        matches = sorted(folder.glob(pattern))
        if matches:
            return matches[0]
    raise DataError(f"{folder}: none of {', '.join(candidates)} found")


def read_delimited(
    source: Path | IO[bytes], *, where: str, sep: str, names: list[str] | None = None,
    header: int | None = None, encoding: str = "utf-8", usecols: list[int] | None = None,
) -> pd.DataFrame:
    """Read a delimited text file as strings (C parser, no quoting); errors name the file and line."""
    try:
        frame = pd.read_csv(
            source, sep=sep, header=header, names=names, usecols=usecols, dtype=str,
            quoting=csv.QUOTE_NONE, keep_default_na=False, na_filter=False, encoding=encoding,
            engine="c",
        )
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except PermissionError:
        raise DataError(f"{where}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not {encoding} text ({exc.reason} at byte {exc.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: the file is empty") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{where}: malformed: {exc}") from None
    if frame.empty:
        raise DataError(f"{where}: the file is empty")
    return frame


def read_double_colon(path: Path, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """MovieLens 1M's `a::b::c` files: swap the two-byte separator for a tab, then the C parser."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    if b"\t" in blob:
        line = blob[: blob.index(b"\t")].count(b"\n") + 1
        raise DataError(f"{path} line {line}: unexpected tab; expected fields separated by '::'")
    return read_delimited(io.BytesIO(blob.replace(b"::", b"\t")), where=str(path), sep="\t",
                          names=names, encoding=encoding)


def check_fields(df: pd.DataFrame, where: str, required: Iterable[str], first_line: int) -> None:
    """Every required field present and non-empty; a bad row is reported by its line number."""
    for column in required:
        if column not in df.columns:
            raise DataError(f"{where}: missing column {column!r}")
        values = df[column]
        empty = values.isna() | (values.astype(str).str.strip() == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataError(f"{where} line {row + first_line}: empty {column!r}")


def to_unix_seconds(values: pd.Series, where: str, column: str, first_line: int,
                    fmt: str | None = None) -> np.ndarray:
    """Numbers (unix seconds) or date strings (with `fmt`) to int64 seconds; bad values named by line."""
    if fmt is None:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = parsed.isna().to_numpy()
        result = parsed
    else:
        stamps = pd.to_datetime(values, format=fmt, errors="coerce")
        bad = stamps.isna().to_numpy()
        result = stamps
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where} line {row + first_line}: {column} {values.iloc[row]!r} is not a valid time")
    if fmt is None:
        return result.to_numpy(dtype=np.float64).astype(np.int64)
    return (result.to_numpy(dtype="datetime64[s]").astype(np.int64))


def to_number(values: pd.Series, where: str, column: str, first_line: int) -> np.ndarray:
    parsed = pd.to_numeric(values, errors="coerce")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where} line {row + first_line}: {column} {values.iloc[row]!r} is not a number")
    return parsed.to_numpy(dtype=np.float64)


def _parse_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        # Amazon's 2014 metadata is written as Python literals (single quotes), not JSON.
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            raise DataError(f"{path} line {number}: not a JSON object") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
    return record


def read_json_lines(path: Path, fields: list[str], required: list[str]) -> pd.DataFrame:
    """Read a JSON-lines file (optionally .gz), keeping `fields`; `required` must be present.

    The fast path is pandas' reader in chunks; a file it rejects (Python-literal lines as in
    Amazon 2014 metadata, or a broken line) is read line by line so the error names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    frames = []
    try:
        with pd.read_json(path, lines=True, chunksize=200_000, dtype=False,
                          compression="infer") as reader:
            for chunk in reader:
                frames.append(chunk.reindex(columns=[f for f in fields if f in chunk.columns]))
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    except (ValueError, TypeError, UnicodeDecodeError):
        frame = _read_json_lines_slowly(path, fields)
    if frame.empty:
        raise DataError(f"{path}: no records")
    for name in required:
        if name not in frame.columns:
            raise DataError(f"{path}: missing field {name!r}")
        missing = frame[name].isna().to_numpy()
        if missing.any():
            raise DataError(f"{path} line {int(np.flatnonzero(missing)[0]) + 1}: missing field {name!r}")
    return frame.reindex(columns=[f for f in fields if f in frame.columns])


def _read_json_lines_slowly(path: Path, fields: list[str]) -> pd.DataFrame:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                record = _parse_line(line, path, number)
                rows.append({f: record.get(f) for f in fields})
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    frame = pd.DataFrame(rows, columns=fields)
    return frame.dropna(axis=1, how="all")


def join_text(values: pd.Series, sep: str = ", ") -> pd.Series:
    """Lists (possibly nested, as Amazon categories are) or strings to one string per row."""

    def flatten(value: Any) -> list[str]:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return []
        if isinstance(value, (list, tuple)):
            return [part for item in value for part in flatten(item)]
        text = str(value).strip()
        return [text] if text else []

    return values.map(lambda v: sep.join(dict.fromkeys(flatten(v))))
