"""Table 1 (the retriever grid) and Table 2 (the ranker grid) as markdown under `<run>/reports/`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, TypedDict

from cotrec.config import Config, parse_ranker
from cotrec.metrics import MIN_PAIRED_LISTS, POSITION_ONLY_NDCG, PairedDifference
from cotrec.records import Table2Figures, Table2Row
from cotrec.rundir import RunDir, atomic_write_text


TABLE1 = "reports/table1.md"
TABLE2 = "reports/table2.md"

# One Table 1 row: a retriever variant's test metrics, mean and std over its seeds, and its paired
# NDCG@10 difference to None/Random with the 95% interval (`metrics.paired_bootstrap`), where it has one.
Table1Row = TypedDict("Table1Row", {"variant": str, "seeds": list[int], "hit@10": float, "hit@10_std": float,
                                    "ndcg@10": float, "ndcg@10_std": float, "best_epoch": float,
                                    "stopped_by_max_epochs": list[int], "users": int,
                                    "ndcg@10_vs_baseline": dict[str, float]}, total=False)


class Table1(TypedDict, total=False):
    """Table 1 as `retriever grid` returns it (`skipped`, `seconds`) or `finished_grid` reads it."""

    rows: list[Table1Row]
    seeds: list[int]
    mask_history: bool
    report: str
    skipped: bool
    seconds: float


def variant_label(variant: str) -> tuple[str, str]:
    """`preference/description` -> ("Preference", "Description"): the paper's row labels."""
    user, _, item = variant.partition("/")
    return user.capitalize(), item.capitalize()


def ranker_label(ranker: str) -> str:
    """`llm++` -> "LLM++", `llm/zero-shot` -> "LLM (zero-shot)", `none` -> "None"."""
    prompt, fine_tuned = parse_ranker(ranker)
    fixed = {"none": "None", "random": "Random order", "position": "Position only"}
    if prompt in fixed:
        return fixed[prompt]
    return prompt.upper() + ("" if fine_tuned else " (zero-shot)")


def interval(found: Optional[dict[str, float]]) -> str:
    """`+0.0031 [-0.0012, +0.0075]`: a paired difference and its 95% bootstrap interval, or "-"."""
    if not found:
        return "-"
    return f"{found['mean']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]"


def write_table1(run: RunDir, config: Config, summary: Table1) -> Path:
    seeds = summary["seeds"]
    lines = [
        "# Table 1: SASRec retriever, user / item initialisation",
        "",
        f"Dataset `{config.data.source}` ({summary['rows'][0]['users'] if summary['rows'] else 0} test users), "
        f"leave-one-out, full ranking over all items, history {'masked' if summary['mask_history'] else 'not masked'}; "
        f"mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}). ΔNDCG@10: each row minus "
        "None/Random on the same users and seeds, with its 95% bootstrap interval over users and seeds; an "
        "interval that holds 0 is no evidence of a difference.",
        "",
        "| User | Item | Hit@10 | NDCG@10 | ΔNDCG@10 vs None/Random [95% CI] | best epoch |",
        "|---|---|---|---|---|---|",
    ]
    capped = []
    for row in summary["rows"]:
        user, item = variant_label(row["variant"])
        mark = " †" if row.get("stopped_by_max_epochs") else ""
        capped += [row["variant"]] if mark else []
        lines.append(f"| {user} | {item} | {row['hit@10']:.4f} ± {row['hit@10_std']:.4f} | "
                     f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f} | {interval(row.get('ndcg@10_vs_baseline'))} | "
                     f"{row['best_epoch']:.1f}{mark} |")
    if capped:
        lines += ["", f"† stopped by retriever.max_epochs ({config.retriever.max_epochs}) before patience ran out, "
                      f"for some seed: {', '.join(capped)}. A higher cap may change these rows."]
    path = run / TABLE1
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def table2_console_cells(row: Table2Row) -> str:
    """A Table 2 row's figures on one console line (NDCG@10, position-free NDCG@10, MAPB, re-ranked
    lists), or why the row was not run."""
    if "not_run" in row:
        return row["not_run"]
    pf = f"{row['pf_ndcg@10']['mean']:.4f}" if row.get("pf_ndcg@10") else "-"
    mapb = f"{row['mapb']['mean']:.3f}" if row.get("mapb") else "-"
    return f"{row['ndcg@10']:>8.4f} {pf:>8} {mapb:>6} {row['ranked']:>6}"


def estimate(found: Optional[PairedDifference], signed: bool = True) -> str:
    """A mean with its 95% bootstrap interval (`metrics.paired_difference`), or the mean and why it
    has none."""
    if not found:
        return "-"
    sign = "+" if signed else ""
    if found.get("interval"):
        return f"{found['mean']:{sign}.4f} [{found['low']:{sign}.4f}, {found['high']:{sign}.4f}]"
    return f"{found['mean']:{sign}.4f} (no interval: {found['lists']} lists)"


def table2_markdown(figures: Table2Figures) -> str:
    """Table 2 as markdown, from `ranker.table2.table2_figures` (the report folder's per-list outputs)."""
    header, rows = figures["header"], figures["rows"]
    users = next((row["users"] for row in rows if "users" in row), 0)
    lines = [
        "# Table 2: LLM-as-Ranker on the retrievers' top-10",
        "",
        f"Dataset `{header['dataset']}`, {users:,} test users"
        + (f" (a seeded sample, the same users in every row)" if header.get("sampled_users") else "")
        + f", ranker model `{header['model']}`; fine-tuned rows: LoRA r={header['lora_r']}, up to "
        f"{header['epochs']} epoch(s), the epoch best on the held-out lists kept (the fine-tunes below). "
        "NDCG@10 is over all these test users (a user whose target is not among the candidates counts 0, so "
        "Ranker=None is the retriever's own NDCG@10); ΔNDCG@10: the ranker minus its retriever on the same "
        "users. On the re-ranked lists (target among the candidates): position-free NDCG@10, each list's "
        f"NDCG@10 averaged over the 10 positions the target is shown at ({POSITION_ONLY_NDCG:.4f} for any ranker "
        "that ranks by position alone), and MAPB, the target's mean absolute rank deviation over those "
        "positions (0: position ignored; 2.5: position only; about 2.33: a random order). Brackets: 95% "
        f"bootstrap intervals over lists, printed only over at least {MIN_PAIRED_LISTS} lists (below that a "
        "percentile interval holds a known zero too rarely); an interval that holds 0 is no evidence of a "
        "difference.",
        "",
        "| Retriever | Ranker | NDCG@10 | ΔNDCG@10 vs retriever | Position-free NDCG@10 | MAPB | Hit@1 | "
        "re-ranked lists |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"| {row['label']} ({row['retriever']}) | {ranker_label(row['ranker'])} |"
        if "not_run" in row:
            lines.append(f"{name} {row['not_run']} | - | - | - | - | 0 |")
            continue
        lines.append(f"{name} {row['ndcg@10']:.4f} | "
                     f"{'-' if row['ranker'] == 'none' else estimate(row['ndcg@10_vs_retriever'])} | "
                     f"{estimate(row.get('pf_ndcg@10'), signed=False)} | {estimate(row.get('mapb'), signed=False)} | "
                     f"{row['hit@1']:.4f} | {row['ranked']} |")
    if figures["comparisons"]:
        lines += ["", "Paired comparisons on the same users and lists (first minus second):", "",
                  "| Retriever | Comparison | ΔNDCG@10 | ΔPosition-free NDCG@10 | ΔMAPB | paired lists |",
                  "|---|---|---|---|---|---|"]
        for pair in figures["comparisons"]:
            lists = pair.get("mapb", {}).get("lists", 0)
            lines.append(f"| {pair['label']} | {ranker_label(pair['a'])} - {ranker_label(pair['b'])} | "
                         f"{estimate(pair.get('ndcg@10'))} | {estimate(pair.get('pf_ndcg@10'))} | "
                         f"{estimate(pair.get('mapb'))} | {lists} |")
    tuned = [row for row in rows if row.get("train")]
    if tuned:
        lines += ["", "Fine-tunes (lists: the retriever's top-10 with every item the user is known to have "
                      "interacted with but the target masked; only lists whose target the retriever found):", "",
                  "| Retriever | Ranker | trained on | training lists | held out | known positives masked | "
                  "letter loss, first -> last epoch (chance) | held-out NDCG@10, base -> kept (± s.e.) | kept epoch | "
                  "workers x micro-batch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        notes = []
        for row in tuned:
            t = row["train"]
            lines.append(f"| {row['label']} | {ranker_label(row['ranker'])} | {t['retriever']} | {t['train_lists']:,} | "
                         f"{t['held_out_lists']:,} | {t['masked_positives']:,} | {t['first_epoch_loss']:.3f} -> "
                         f"{t['last_epoch_loss']:.3f} ({t['letter_loss_chance']:.3f}) | {t['base_val_ndcg@10']:.4f} -> "
                         f"{t['best_val_ndcg@10']:.4f} ± {t['best_val_ndcg@10_se']:.4f} | {t['best_epoch']} of "
                         f"{t['epochs']} | {t['num_workers']} x {t['micro_batch']} |")
            if t.get("shape_note"):
                notes.append(f"{row['label']} {ranker_label(row['ranker'])}: {t['shape_note']}.")
        lines += ["", *notes] if notes else []
    return "\n".join(lines) + "\n"
