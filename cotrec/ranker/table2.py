"""Table 2 from per-list outputs: every figure is recomputed from the rankings each evaluation keeps.

A report folder holds `table2.json` (the rows: label, retriever, ranker, and what trained a
fine-tuned one) and `rankings/<retriever>--<ranker>.parquet` (per test user: the target's rank,
the retriever's, and for a re-ranked list the target's rank with it shown at each of the M
positions). `table2.md` is rendered from those files alone (`table2_figures`, then
`reporting.tables.table2_markdown`), so `cotrec report --check` re-renders a committed report from
its per-list outputs and compares.

Per row: NDCG@10 over the sampled test users (a user whose target the retriever missed counts 0),
its paired difference to the retriever; on the re-ranked lists, the position-free NDCG@10 (each
list's NDCG@10 averaged over the M positions of the MAPB probe: a ranker that ranks by position
alone scores `metrics.POSITION_ONLY_NDCG` on every list, so what is above it is content skill, with far
less noise than NDCG in one shown order) and MAPB, each with a 95% bootstrap interval over lists.
Paired comparisons on the same lists: LLM++ - LLM, and each fine-tuned ranker - its zero-shot
model (NDCG@10, position-free NDCG@10, MAPB). An interval is printed only over enough paired lists
(`metrics.MIN_PAIRED_LISTS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd

from cotrec.metrics import ndcg_gains, paired_difference
from cotrec.rundir import write_json
from cotrec.storage import as_path, replace_file

from cotrec.records import (Comparison, EvalResult, Manifest, ManifestRow, RowFigures, Table2Figures,
                                   Table2Header, Table2Row)

MANIFEST = "table2.json"
RANKINGS = "rankings"
RANKING_COLUMNS = ["user_idx", "target_item", "target_rank", "retriever_rank", "target_position", "ranks_by_position"]
# What the manifest keeps of a fine-tune's record (train.json): enough to read the row.
TRAIN_KEYS = ("retriever", "train_lists", "held_out_lists", "valid_lists", "prefix_lists", "masked_positives",
              "epochs", "best_epoch", "base_val_ndcg@10", "best_val_ndcg@10", "best_val_ndcg@10_se",
              "first_epoch_loss", "last_epoch_loss", "letter_loss_chance", "num_workers", "micro_batch",
              "shape_note", "precision", "train_seconds")


def rankings_name(row: Union[ManifestRow, EvalResult]) -> str:
    return f"{row['retriever'].replace('/', '-')}--{row['ranker'].replace('/', '-')}.parquet"


def export_table2(folder: Path, rows: list[EvalResult], header: Table2Header,
                  rankings_of: Callable[[EvalResult], pd.DataFrame]) -> Path:
    """Write a report folder's `table2.json` and per-row rankings (the columns the figures read).
    `rows`: finished evaluations (their metrics.json, with `label`); `rankings_of(row)`: its
    rankings table."""
    entries: list[ManifestRow] = []
    for row in rows:
        entry: ManifestRow = {"label": row["label"], "retriever": row["retriever"], "ranker": row["ranker"]}
        entry.update({k: row[k] for k in ("not_run", "model", "backend", "users", "ranked_users") if k in row})
        if row.get("train"):
            entry["train"] = {k: row["train"][k] for k in TRAIN_KEYS if k in row["train"]}
        if "not_run" not in row:
            frame = rankings_of(row)
            frame = frame[[c for c in RANKING_COLUMNS if c in frame.columns]]
            target = as_path(folder) / RANKINGS / rankings_name(row)
            replace_file(lambda out: frame.to_parquet(str(out), index=False), target)
            entry["rankings"] = f"{RANKINGS}/{rankings_name(row)}"
        entries.append(entry)
    path = as_path(folder) / MANIFEST
    write_json(path, Manifest(header=header, rows=entries))
    return path


def read_table2(folder: Path) -> tuple[Table2Header, list[ManifestRow], dict[tuple[str, str], pd.DataFrame]]:
    """A report folder's manifest (header, rows) and each row's rankings, by ranker key."""
    manifest: Manifest = json.loads((as_path(folder) / MANIFEST).read_text())
    frames = {_key(row): pd.read_parquet(str(as_path(folder) / row["rankings"])).sort_values("user_idx")
              for row in manifest["rows"] if "rankings" in row}
    return manifest["header"], manifest["rows"], frames


def _key(row: Union[ManifestRow, EvalResult]) -> tuple[str, str]:
    return row["label"], row["ranker"]


def _reranked(frame: pd.DataFrame) -> pd.DataFrame:
    if "ranks_by_position" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["ranks_by_position"].map(lambda r: r is not None and len(r) > 0)]


def position_free_ndcg(ranks_by_position: pd.Series) -> np.ndarray:
    """Per list, its NDCG@10 averaged over the positions the target was shown at."""
    return np.array([ndcg_gains(np.asarray(r), 10).mean() for r in ranks_by_position], dtype=np.float64)


def list_bias(ranks_by_position: pd.Series) -> np.ndarray:
    """Per list, the mean absolute deviation of the target's rank over the positions (MAPB's term)."""
    return np.array([np.abs(np.asarray(r) - np.mean(r)).mean() for r in ranks_by_position], dtype=np.float64)


def row_figures(frame: pd.DataFrame, seed: int) -> RowFigures:
    """One row's figures from its rankings."""
    gains = ndcg_gains(frame["target_rank"].to_numpy(), 10)
    reranked = _reranked(frame)
    figures: RowFigures = {
        "users": len(frame), "ranked": len(reranked), "ndcg@10": float(gains.mean()),
        "hit@1": float((frame["target_rank"].to_numpy() == 0).mean()),
        "ndcg@10_vs_retriever": paired_difference(gains - ndcg_gains(frame["retriever_rank"].to_numpy(), 10),
                                                  lists=len(reranked), seed=seed)}
    if len(reranked):
        figures["pf_ndcg@10"] = paired_difference(position_free_ndcg(reranked["ranks_by_position"]), seed=seed)
        figures["mapb"] = paired_difference(list_bias(reranked["ranks_by_position"]), seed=seed)
    return figures


def compare(first: pd.DataFrame, second: pd.DataFrame, seed: int) -> Comparison:
    """`first` - `second` on the same users (NDCG@10) and the same re-ranked lists (position-free
    NDCG@10, MAPB)."""
    both = first.merge(second, on="user_idx", suffixes=("_a", "_b"))
    a, b = both["target_rank_a"].to_numpy(), both["target_rank_b"].to_numpy()
    out: Comparison = {}
    if "ranks_by_position_a" in both.columns and "ranks_by_position_b" in both.columns:
        lists = both[both["ranks_by_position_a"].map(lambda r: r is not None and len(r) > 0)
                     & both["ranks_by_position_b"].map(lambda r: r is not None and len(r) > 0)]
        out["ndcg@10"] = paired_difference(ndcg_gains(a, 10) - ndcg_gains(b, 10), lists=len(lists), seed=seed)
        out["pf_ndcg@10"] = paired_difference(position_free_ndcg(lists["ranks_by_position_a"])
                                              - position_free_ndcg(lists["ranks_by_position_b"]), seed=seed)
        out["mapb"] = paired_difference(list_bias(lists["ranks_by_position_a"])
                                        - list_bias(lists["ranks_by_position_b"]), seed=seed)
    return out


def comparisons(rows: list[ManifestRow], frames: dict[tuple[str, str], pd.DataFrame],
                seed: int) -> list[Comparison]:
    """The paper's comparison (LLM++ - LLM) and each fine-tuned ranker - its zero-shot model, per
    retriever, where both rows were evaluated."""
    pairs: list[Comparison] = []
    for label in dict.fromkeys(row["label"] for row in rows):
        present = {row["ranker"] for row in rows if row["label"] == label and (label, row["ranker"]) in frames}
        wanted = [("llm++", "llm")] + [(r, f"{r}/zero-shot") for r in ("llm", "llm+", "llm++")]
        wanted += [(f"{r}/zero-shot", "llm/zero-shot") for r in ("llm++",)]
        for a, b in wanted:
            if a in present and b in present:
                pairs.append({"label": label, "a": a, "b": b,
                              **compare(frames[(label, a)], frames[(label, b)], seed)})
    return pairs


def table2_figures(header: Table2Header, rows: list[ManifestRow],
                   frames: dict[tuple[str, str], pd.DataFrame]) -> Table2Figures:
    """Every figure of Table 2, from the rows and their rankings alone."""
    seed = int(header.get("seed", 0))
    figures: list[Table2Row] = [{**row, **(row_figures(frames[_key(row)], seed) if _key(row) in frames else {})} for row in rows]
    return {"header": header, "rows": figures, "comparisons": comparisons(rows, frames, seed)}


def check_report(folder: Path, render: Callable[[Table2Figures], str]) -> Optional[str]:
    """None when `table2.md` is what its per-list outputs render to; else the first line that differs."""
    header, rows, frames = read_table2(folder)
    expected = render(table2_figures(header, rows, frames))
    committed = (as_path(folder) / "table2.md").read_text()
    if committed == expected:
        return None
    for number, (have, want) in enumerate(zip(committed.splitlines(), expected.splitlines()), 1):
        if have != want:
            return f"line {number}: {have!r} != recomputed {want!r}"
    return f"{len(committed.splitlines())} lines != recomputed {len(expected.splitlines())}"
