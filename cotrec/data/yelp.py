"""Yelp Open Dataset: `yelp_academic_dataset_review.json` + `..._business.json` (JSON lines).

Reviews: `user_id`, `business_id`, `date` (`2018-07-07 22:09:11`), `stars`. Businesses:
`business_id`, `name`, `categories` (a comma-separated string), `city`, `state`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cotrec.data.raw import RawDataset, join_text, read_json_lines, require_file, to_unix_seconds

YELP_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def load_yelp_folder(folder: Path) -> RawDataset:
    review_path = require_file(folder, "yelp_academic_dataset_review.json*", "review.json*")
    business_path = require_file(folder, "yelp_academic_dataset_business.json*", "business.json*")
    reviews = read_json_lines(review_path, ["user_id", "business_id", "date", "stars"],
                              required=["user_id", "business_id", "date"])
    interactions = pd.DataFrame({
        "user_id": reviews["user_id"].astype(str),
        "item_id": reviews["business_id"].astype(str),
        "timestamp": to_unix_seconds(reviews["date"].astype(str), str(review_path), "date", 1,
                                     fmt=YELP_TIME_FORMAT),
    })
    if "stars" in reviews.columns:
        interactions["rating"] = pd.to_numeric(reviews["stars"], errors="coerce")
    business = read_json_lines(business_path, ["business_id", "name", "categories", "city", "state"],
                               required=["business_id", "name"])
    items = pd.DataFrame({
        "item_id": business["business_id"].astype(str),
        "caption": join_text(business["name"]),
        "categories": join_text(business.get("categories", pd.Series([""] * len(business)))),
        "city": join_text(business.get("city", pd.Series([""] * len(business)))),
        "state": join_text(business.get("state", pd.Series([""] * len(business)))),
    })
    return RawDataset("yelp", "business", interactions, items, None, [str(review_path), str(business_path)])
