"""Amazon reviews (2014 and 2018 releases), e.g. Grocery_and_Gourmet_Food, as JSON lines.

Reviews: `reviewerID`, `asin`, `unixReviewTime`, `overall`. Metadata (`meta_<category>.json`):
`asin`, `title`, `description` (a string in 2014, a list in 2018), categories (`categories`, a
list of lists, in 2014; `category`, a list, in 2018), `brand`. The 2014 metadata is written as
Python literals rather than JSON; both are read. Either file may be gzipped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cotrec.data.raw import RawDataset, join_text, read_json_lines, require_file, to_unix_seconds

DESCRIPTION_CHARS = 600  # descriptions are marketing copy; the head says what the product is


def load_amazon_folder(folder: Path, category: str) -> RawDataset:
    reviews_path = require_file(folder, f"reviews_{category}*.json*", f"{category}*.json*")
    meta_path = require_file(folder, f"meta_{category}.json*")
    reviews = read_json_lines(reviews_path, ["reviewerID", "asin", "unixReviewTime", "overall"],
                              required=["reviewerID", "asin", "unixReviewTime"])
    interactions = pd.DataFrame({
        "user_id": reviews["reviewerID"].astype(str),
        "item_id": reviews["asin"].astype(str),
        "timestamp": to_unix_seconds(reviews["unixReviewTime"], str(reviews_path), "unixReviewTime", 1),
    })
    if "overall" in reviews.columns:
        interactions["rating"] = pd.to_numeric(reviews["overall"], errors="coerce")

    meta = read_json_lines(meta_path, ["asin", "title", "description", "categories", "category", "brand"],
                           required=["asin"])
    categories = meta["categories"] if "categories" in meta.columns else meta.get("category")
    items = pd.DataFrame({
        "item_id": meta["asin"].astype(str),
        "caption": join_text(meta["title"]) if "title" in meta.columns else "",
        "description": join_text(meta["description"], sep=" ").str.slice(0, DESCRIPTION_CHARS)
        if "description" in meta.columns else "",
        "categories": join_text(categories) if categories is not None else "",
        "brand": join_text(meta["brand"]) if "brand" in meta.columns else "",
    })
    return RawDataset(f"amazon-{category}", "product", interactions, items, None,
                      [str(reviews_path), str(meta_path)])
