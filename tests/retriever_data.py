"""Small synthetic run directories for the embed and retriever tests (no download, no LLM).

`synthetic_run` writes `<run>/data/` as the prepare stage would: users walk through a catalogue
in a learnable order (mostly item k -> k+1, with some noise), items have captions built from a
few genres, and the last two items of each user are the valid and test targets.
`fake_extraction` writes SYNTHETIC stand-ins for the extraction outputs (the real ones come from
the LLM stage): item descriptions and per-horizon user preferences built from the genres.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cotrec.config import load_config
from cotrec.rundir import RunDir, write_json

# A SASRec that trains on the synthetic run in seconds, in-process.
FAST_RETRIEVER = ("retriever.dim=16", "retriever.max_len=8", "retriever.batch_size=32", "retriever.max_epochs=40",
                  "retriever.trainer=local")

GENRES = ["space adventure", "romantic comedy", "horror", "animated family film", "crime thriller",
          "war drama", "musical", "western"]


def synthetic_run(root, users: int = 60, items: int = 80, length: int = 24, seed: int = 0,
                  config_overrides: tuple[str, ...] = ()):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        start = int(rng.integers(items))
        seq = []
        current = start
        while len(seq) < length:
            if current not in seq:
                seq.append(current)
            current = (current + 1) % items if rng.random() < 0.85 else int(rng.integers(items))
        n = len(seq)
        for p, i in enumerate(seq):
            split = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            rows.append((u, i, 1_000_000 + u * 1000 + p, p, split))
    inter = pd.DataFrame(rows, columns=["user_idx", "item_idx", "timestamp", "position", "split"])
    genre = [GENRES[(i * len(GENRES)) // items] for i in range(items)]
    item_table = pd.DataFrame({"item_idx": np.arange(items), "item_id": [f"i{i}" for i in range(items)],
                               "caption": [f"{genre[i].title()} number {i}" for i in range(items)],
                               "genres": genre})
    user_table = pd.DataFrame({"user_idx": np.arange(users), "user_id": [f"u{u}" for u in range(users)],
                               "num_interactions": inter.groupby("user_idx").size().to_numpy()})
    run = RunDir(root)
    config = load_config("demo", list(config_overrides))
    with run.staged("data", config.fingerprint("data")) as folder:
        inter.to_parquet(folder / "interactions.parquet", index=False)
        item_table.to_parquet(folder / "items.parquet", index=False)
        user_table.to_parquet(folder / "users.parquet", index=False)
        write_json(folder / "stats.json", {"dataset": "synthetic", "users": users, "items": items,
                                           "interactions": len(inter)})
    run.write_config(config)
    return config, run


def fake_extraction(run, status_failed_items=(), missing_users=()):
    """SYNTHETIC extraction outputs in the run directory layout of docs/design.md (not LLM text)."""
    inter = pd.read_parquet(run / "data" / "interactions.parquet")
    items = pd.read_parquet(run / "data" / "items.parquet")
    desc = pd.DataFrame({
        "item_idx": items.item_idx,
        "description": [f"A {g} for fans of the genre." for g in items.genres],
        "model": "synthetic", "prompt_version": "test",
        "status": ["failed" if i in status_failed_items else "ok" for i in items.item_idx]})
    folder = run / "extract" / "item_descriptions"
    folder.mkdir(parents=True, exist_ok=True)
    desc.to_parquet(folder / "part-0.parquet", index=False)
    genre_of = dict(zip(items.item_idx, items.genres))
    rows = []
    # As the recurrence's horizons: train and valid see the items before the valid target, test the
    # items before the test target (the valid target included); no horizon sees its own target.
    # The train walk's states after every 8 training items (and at its end): what a list whose
    # target comes later may show.
    def preference_of(seen: list[int]) -> str:
        return ", ".join(pd.Series([genre_of[i] for i in seen]).value_counts().index[:2].tolist())

    for horizon, drop in (("train", 2), ("valid", 2), ("test", 1)):
        for user, group in inter.sort_values("position").groupby("user_idx"):
            if user in missing_users:
                continue
            seen = group.item_idx.tolist()[:-drop]
            ends = list(range(8, len(seen), 8)) + [len(seen)]
            rows.append({"user_idx": user, "horizon": horizon, "preference": preference_of(seen),
                         "short_term": [preference_of(seen).split(", ")[0]], "windows": 1, "items_consumed": len(seen),
                         "trajectory_ends": ends if horizon == "train" else None,
                         "trajectory": [preference_of(seen[:e]) for e in ends] if horizon == "train" else None,
                         "model": "synthetic", "prompt_version": "test", "status": "ok"})
    folder = run / "extract" / "preferences"
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(folder / "part-0.parquet", index=False)
