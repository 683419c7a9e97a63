"""Table 1 (the retriever grid) and Table 2 (the ranker grid) as markdown under `<run>/reports/`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotrec.config import Config, parse_ranker
from cotrec.rundir import RunDir, atomic_write_text

TABLE1 = "reports/table1.md"
TABLE2 = "reports/table2.md"


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


def interval(row: dict[str, Any], key: str) -> str:
    """`+0.0031 [-0.0012, +0.0075]`: a paired difference and its 95% bootstrap interval, or "-"."""
    found = row.get(key)
    if not found:
        return "-"
    return f"{found['mean']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]"


def write_table1(run: RunDir, config: Config, summary: dict[str, Any]) -> Path:
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
                     f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f} | {interval(row, 'ndcg@10_vs_baseline')} | "
                     f"{row['best_epoch']:.1f}{mark} |")
    if capped:
        lines += ["", f"† stopped by retriever.max_epochs ({config.retriever.max_epochs}) before patience ran out, "
                      f"for some seed: {', '.join(capped)}. A higher cap may change these rows."]
    path = run / TABLE1
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_table2(run: RunDir, config: Config, summary: dict[str, Any]) -> Path:
    rows = summary["rows"]
    users = rows[0]["users"] if rows else 0
    lines = [
        "# Table 2: LLM-as-Ranker on the retrievers' top-10",
        "",
        f"Dataset `{config.data.source}`, {users} test users, model `{config.llm.model}` (fine-tuned rows: LoRA "
        f"r={config.ranker.lora_r}, up to {config.ranker.epochs} epoch(s) on the valid lists and "
        f"{config.ranker.prefix_lists} prefix list(s) per user, the epoch best on {config.ranker.val_lists} "
        "held-out lists kept; their curves are in the report). "
        "NDCG@10 is over all test users: a user whose target is not among the candidates counts as 0, so "
        "Ranker=None is the retriever's own NDCG@10. ΔNDCG@10: each ranker minus its retriever on the same "
        "users, with a 95% bootstrap interval over users (an interval that holds 0 is no evidence of a "
        "difference). MAPB: the target's mean absolute rank deviation when it is placed at each of the 10 "
        "positions: 0 for a ranker that ignores position, 2.5 for one that ranks by position alone, about 2.33 "
        "for a random order (the Random order and Position only rows measure these on the same lists).",
        "",
        "| Retriever | Ranker | NDCG@10 | ΔNDCG@10 vs retriever [95% CI] | Hit@1 | MAPB | re-ranked users |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        mapb = f"{row['mapb']:.3f}" if row.get("mapb") is not None else "-"
        lines.append(f"| {row['label']} ({row['retriever']}) | {ranker_label(row['ranker'])} | {row['ndcg@10']:.4f} | "
                     f"{interval(row, 'ndcg@10_vs_retriever')} | {row['hit@1']:.4f} | {mapb} | "
                     f"{row['ranked_users']} |")
    path = run / TABLE2
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
