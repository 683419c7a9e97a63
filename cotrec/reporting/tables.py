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
    if prompt == "none":
        return "None"
    return prompt.upper() + ("" if fine_tuned else " (zero-shot)")


def write_table1(run: RunDir, config: Config, summary: dict[str, Any]) -> Path:
    seeds = summary["seeds"]
    lines = [
        "# Table 1: SASRec retriever, user / item initialisation",
        "",
        f"Dataset `{config.data.source}` ({summary['rows'][0]['users'] if summary['rows'] else 0} test users), "
        f"leave-one-out, full ranking over all items, history {'masked' if summary['mask_history'] else 'not masked'}; "
        f"mean ± std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}).",
        "",
        "| User | Item | Hit@10 | NDCG@10 | best epoch |",
        "|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        user, item = variant_label(row["variant"])
        lines.append(f"| {user} | {item} | {row['hit@10']:.4f} ± {row['hit@10_std']:.4f} | "
                     f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f} | {row['best_epoch']:.1f} |")
    path = Path(run / TABLE1)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_table2(run: RunDir, config: Config, summary: dict[str, Any]) -> Path:
    rows = summary["rows"]
    users = rows[0]["users"] if rows else 0
    lines = [
        "# Table 2: LLM-as-Ranker on the retrievers' top-10",
        "",
        f"Dataset `{config.data.source}`, {users} test users, model `{config.llm.model}` "
        f"(fine-tuned rows: LoRA r={config.ranker.lora_r}, {config.ranker.epochs} epoch(s) on the valid lists). "
        "NDCG@10 is over all test users: a user whose target is not among the candidates counts as 0, so "
        "Ranker=None is the retriever's own NDCG@10. MAPB: the target's mean absolute rank deviation when it "
        "is placed at each of the 10 positions (0 = no position bias).",
        "",
        "| Retriever | Ranker | NDCG@10 | Hit@1 | MAPB | re-ranked users |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        mapb = f"{row['mapb']:.3f}" if row.get("mapb") is not None else "-"
        lines.append(f"| {row['label']} ({row['retriever']}) | {ranker_label(row['ranker'])} | {row['ndcg@10']:.4f} | "
                     f"{row['hit@1']:.4f} | {mapb} | {row['ranked_users']} |")
    path = Path(run / TABLE2)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
