"""The ranker's records as a run directory and a report keep them: a fine-tune's curve and merge
check and its `train.json` (`FinetuneSummary`), an evaluation's `metrics.json` (`EvalResult`), and
Table 2's manifest, rows and figures. A module of its own that imports nothing of the ranker, so
that the report writers (`cotrec.reporting`), which the ranker's stages call, can name them too."""

from __future__ import annotations

from typing import Optional, TypedDict

from cotrec.metrics import PairedDifference


# One point of the held-out curve: entry 0 is the base model (no training keys, `loss` None), then
# one per epoch with its training figures.
EpochRecord = TypedDict("EpochRecord", {
    "epoch": int, "val_ndcg@10": float, "val_ndcg@10_se": float, "val_hit@1": float, "val_lists": int,
    "val_seconds": float, "val_mean_abs_dp": float, "loss": Optional[float], "examples": int,
    "learning_rate": float, "optimiser_steps": int, "train_seconds": float, "examples_per_s": float},
    total=False)


class Agreement(TypedDict):
    """How far one model's letter probabilities are from the adapter's on the held-out prompts."""

    max_abs_dp: float
    same_first: float


class MergeCheck(TypedDict):
    """`merge_adapter`: the adapter's change to the letter probabilities, and what the saved
    checkpoint (and a bfloat16 rounding of it) keeps of it."""

    prompts: int
    adapter_vs_base: Agreement
    merged_saved: Agreement
    merged_in_bfloat16: Agreement


# Those keys of a fine-tune's record (with `zero_stage`, which an evaluation's metrics.json also keeps).
TrainRecord = TypedDict("TrainRecord", {
    "retriever": str, "train_lists": int, "held_out_lists": int, "valid_lists": int, "prefix_lists": int,
    "masked_positives": int, "epochs": int, "best_epoch": int, "base_val_ndcg@10": float, "best_val_ndcg@10": float,
    "best_val_ndcg@10_se": float, "first_epoch_loss": float, "last_epoch_loss": float, "letter_loss_chance": float,
    "num_workers": int, "micro_batch": int, "shape_note": str, "zero_stage": int, "precision": str,
    "train_seconds": float}, total=False)


class Table2Header(TypedDict):
    """What every row of a report shares: the dataset, the ranker model and its fine-tune settings."""

    dataset: str
    model: str
    lora_r: int
    epochs: int
    seed: int
    sampled_users: Optional[int]


class ManifestRow(TypedDict, total=False):
    """One row of `table2.json`: which evaluation, and where its rankings are (none: `not_run`)."""

    label: str
    retriever: str
    ranker: str
    not_run: str
    model: Optional[str]
    backend: Optional[str]
    users: int
    ranked_users: int
    train: TrainRecord
    rankings: str


class Manifest(TypedDict):
    """`table2.json`."""

    header: Table2Header
    rows: list[ManifestRow]


# A row's figures, recomputed from its rankings (`row_figures`).
RowFigures = TypedDict("RowFigures", {
    "users": int, "ranked": int, "ndcg@10": float, "hit@1": float, "ndcg@10_vs_retriever": PairedDifference,
    "pf_ndcg@10": PairedDifference, "mapb": PairedDifference}, total=False)

# A Table 2 row: its manifest entry and, where it was run, its figures.
Table2Row = TypedDict("Table2Row", {
    "label": str, "retriever": str, "ranker": str, "not_run": str, "model": Optional[str],
    "backend": Optional[str], "users": int, "ranked_users": int, "train": TrainRecord, "rankings": str,
    "ranked": int, "ndcg@10": float, "hit@1": float, "ndcg@10_vs_retriever": PairedDifference,
    "pf_ndcg@10": PairedDifference, "mapb": PairedDifference}, total=False)

# A paired comparison of two rankers on one retriever's lists: `a` minus `b` (`compare`).
Comparison = TypedDict("Comparison", {
    "label": str, "a": str, "b": str, "ndcg@10": PairedDifference, "pf_ndcg@10": PairedDifference,
    "mapb": PairedDifference}, total=False)


class Table2Figures(TypedDict):
    """Every figure of Table 2 (`table2_figures`), what `reporting.tables.table2_markdown` renders."""

    header: Table2Header
    rows: list[Table2Row]
    comparisons: list[Comparison]


# An evaluation's `metrics.json` (`RankerMetrics`, what produced them, the lists' counts, and for a
# fine-tuned ranker what trained it), as `ranker eval` returns it (`skipped`, `folder`) and as the grid
# passes it on (`label`: the retriever's row label).
EvalResult = TypedDict("EvalResult", {
    "label": str, "skipped": bool, "folder": str, "retriever": str, "ranker": str, "prompt": str,
    "fine_tuned": bool, "split": str, "not_run": str, "seed": int,
    "hit@1": float, "ndcg@1": float, "hit@5": float, "ndcg@5": float, "hit@10": float, "ndcg@10": float,
    "users": int, "ranked_users": int, "seconds": float, "lists_per_second": Optional[float], "mapb": float,
    "mean_rank_by_position": list[float], "scoring_actors": int, "retriever_ndcg@10": float,
    "model": Optional[str], "backend": Optional[str], "prompt_version": str, "shuffle_seed": int,
    "sampled_users": Optional[int], "wall_seconds": float, "lists": int, "hits": int,
    "lists_without_preference": int, "candidates_without_key_terms": int, "train": TrainRecord}, total=False)


# A fine-tune's `train.json` (and what `ranker train` returns: with `skipped` and `folder`): the lists
# it trained and validated on (`TrainingLists.notes` and what their prompts lack), then either why it
# was not trained or how it trained and what it kept.
FinetuneSummary = TypedDict("FinetuneSummary", {
    "skipped": bool, "folder": str, "retriever": str, "prompt": str,
    "users": int, "valid_lists": int, "valid_misses": int, "prefix_lists": int, "prefix_positions_drawn": int,
    "prefix_misses": int, "targets_inserted": int, "masked_positives": int, "train_lists": int,
    "held_out_lists": int, "held_out_users": int, "lists_without_preference": int,
    "candidates_without_key_terms": int, "held_out_lists_without_preference": int,
    "held_out_candidates_without_key_terms": int, "not_trained": str,
    "prompt_version": str, "base_model": str, "examples_per_epoch": int, "epochs": int, "shape_note": str,
    "optimiser_steps": int, "warmup_steps": int, "micro_batch": int, "accumulation": int, "trainer": str,
    "num_workers": int, "zero_stage": int, "precision": str, "curve": list[EpochRecord], "best_epoch": int,
    "letter_loss_chance": float, "base_val_ndcg@10": float, "base_val_ndcg@10_se": float,
    "best_val_ndcg@10": float, "best_val_ndcg@10_se": float, "first_epoch_loss": float, "last_epoch_loss": float,
    "examples_per_s": float, "merged_dtype": str, "update_kept": MergeCheck,
    "resumed_after_epoch": Optional[int], "train_seconds": float, "wall_seconds": float}, total=False)


class Table2Summary(TypedDict):
    """What `ranker grid` returns: Table 2's rows and comparisons, and where the report and plot are."""

    skipped: bool
    rows: list[Table2Row]
    comparisons: list[Comparison]
    report: str
    plot: str
    seconds: float
