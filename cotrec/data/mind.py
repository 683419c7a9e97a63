"""MIND (Microsoft News): `behaviors.tsv` + `news.tsv`, the official layout.

behaviors.tsv: impression id, user id, time (`11/15/2019 8:55:22 AM`), the user's click history
before the log (space-separated news ids), the impressions (`N123-1` clicked, `N456-0` not).
news.tsv: news id, category, subcategory, title, abstract, url, title entities, abstract entities.

A user's sequence is their recorded history (in the order listed, placed just before their first
logged impression) followed by the news they clicked in impressions, at the impression's time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cotrec.data.raw import RawDataset, check_fields, read_delimited, require_file, to_unix_seconds

BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
NEWS_COLUMNS = ["item_id", "category", "subcategory", "caption", "abstract", "url",
                "title_entities", "abstract_entities"]
MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"


def load_mind_folder(folder: Path) -> RawDataset:
    behaviors_path = require_file(folder, "behaviors.tsv")
    news_path = require_file(folder, "news.tsv")
    behaviors = read_delimited(behaviors_path, where=str(behaviors_path), sep="\t", names=BEHAVIOR_COLUMNS)
    check_fields(behaviors, str(behaviors_path), ["user_id", "time"], 1)
    behaviors["timestamp"] = to_unix_seconds(behaviors["time"], str(behaviors_path), "time", 1,
                                             fmt=MIND_TIME_FORMAT)

    # The history is the same list on each of a user's rows: take it from their earliest one.
    first = behaviors.sort_values("timestamp", kind="stable")
    first = first.drop_duplicates("user_id", keep="first")
    history = first[["user_id", "timestamp", "history"]].assign(history=first["history"].str.split())
    history = history.explode("history").dropna(subset=["history"])
    history = pd.DataFrame({"user_id": history["user_id"], "item_id": history["history"],
                            "timestamp": history["timestamp"].to_numpy() - 1})

    shown = behaviors[["user_id", "timestamp", "impressions"]].assign(
        impressions=behaviors["impressions"].str.split()).explode("impressions")
    shown = shown.dropna(subset=["impressions"])
    clicked = shown[shown["impressions"].str.endswith("-1")]
    clicks = pd.DataFrame({"user_id": clicked["user_id"],
                           "item_id": clicked["impressions"].str[:-2],
                           "timestamp": clicked["timestamp"]})

    interactions = pd.concat([history, clicks], ignore_index=True)
    interactions["timestamp"] = interactions["timestamp"].astype(np.int64)

    news = read_delimited(news_path, where=str(news_path), sep="\t", names=NEWS_COLUMNS)
    check_fields(news, str(news_path), ["item_id", "caption"], 1)
    items = news[["item_id", "caption", "category", "subcategory", "abstract"]]
    return RawDataset("mind", "news", interactions, items, None, [str(behaviors_path), str(news_path)])
