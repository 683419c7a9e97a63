"""The report's plots: Table 1 as bars, the ranker's rank against position, time per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from cotrec.records import EvalResult, FinetuneSummary
from cotrec.reporting.figures import pyplot, save_figure
from cotrec.reporting.tables import Table1Row, ranker_label
from cotrec.rundir import RunDir
from cotrec.storage import as_path


TABLE1_PLOT = "reports/table1.png"
RANK_PLOT = "reports/rank_vs_position.png"
STAGES_PLOT = "reports/stages.png"


def plot_table1(run: RunDir, rows: list[Table1Row]) -> Optional[Path]:
    """Hit@10 and NDCG@10 per retriever variant, with the seeds' std as error bars."""
    if not rows:
        return None
    fig, ax = pyplot().subplots(figsize=(7.2, 4.2))
    x = np.arange(len(rows))
    for offset, metric in ((-0.2, "hit@10"), (0.2, "ndcg@10")):
        ax.bar(x + offset, [r[metric] for r in rows], 0.4, yerr=[r[f"{metric}_std"] for r in rows], capsize=3,
               label=metric.replace("hit", "Hit").replace("ndcg", "NDCG"))
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("user init / item init")
    ax.set_title("Table 1: SASRec retriever by initialisation (test, full ranking)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, run / TABLE1_PLOT)


def plot_rank_vs_position(run: RunDir, rows: list[EvalResult]) -> Optional[Path]:
    """Mean predicted rank of the target against the position it was shown at, per ranker."""
    curves = [r for r in rows if r.get("mean_rank_by_position")]
    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2))
    for row in curves:
        ys = np.asarray(row["mean_rank_by_position"]) + 1
        ax.plot(np.arange(1, len(ys) + 1), ys, marker="o", label=f"{row['label']} + {ranker_label(row['ranker'])} "
                                                                   f"(MAPB {row['mapb']:.2f})")
    m = len(curves[0]["mean_rank_by_position"])
    ax.axhline((m + 1) / 2, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("position the target is shown at (A = 1)")
    ax.set_ylabel("mean predicted rank of the target")
    ax.set_xticks(range(1, m + 1))
    ax.legend(fontsize=8)
    ax.set_title("Position bias: predicted rank vs shown position")
    fig.tight_layout()
    return save_figure(fig, run / RANK_PLOT)


def plot_stages(run: RunDir, seconds: dict[str, float], generated_tokens: dict[str, int]) -> Optional[Path]:
    """Wall time per stage (in the order given), each LLM stage annotated with its generated tokens."""
    if not seconds:
        return None
    names = list(seconds)[::-1]
    fig, ax = pyplot().subplots(figsize=(7.2, 3.6))
    ax.barh(names, [seconds[s] for s in names])
    for i, stage in enumerate(names):
        if stage in generated_tokens:
            ax.annotate(f"{generated_tokens[stage]:,} gen tok", (seconds[stage], i),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("wall time (s)")
    ax.set_title("Time per stage")
    fig.tight_layout()
    return save_figure(fig, run / STAGES_PLOT)


def plot_training_curve(path: Path, train: FinetuneSummary) -> Path:
    """A fine-tune's curve: the letter loss per epoch against chance (ln M), and the held-out lists'
    NDCG@10 (± one standard error) from the base model (epoch 0) on, the kept epoch marked."""
    curve = train["curve"]
    epochs = [c["epoch"] for c in curve]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9.6, 3.6))
    left.plot(epochs[1:], [c["loss"] for c in curve[1:]], marker="o")
    left.axhline(train["letter_loss_chance"], color="grey", lw=0.8, ls=":", label="chance (ln M)")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss (answer among the letters)")
    left.legend(fontsize=8)
    right.errorbar(epochs, [c["val_ndcg@10"] for c in curve], yerr=[c["val_ndcg@10_se"] for c in curve],
                   marker="o", capsize=3)
    right.set_xlabel("epoch (0: the base model)")
    right.set_ylabel("held-out NDCG@10 (± 1 s.e.)")
    right.axvline(train["best_epoch"], color="grey", lw=0.8, ls=":")
    fig.suptitle(f"{train['prompt']} on {train['retriever']}: {train['train_lists']} training lists, "
                 f"{train['held_out_lists']} held out")
    fig.tight_layout()
    return save_figure(fig, as_path(path))
