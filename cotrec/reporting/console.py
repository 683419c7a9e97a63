"""The console summaries that `cotrec` prints after a retriever or ranker stage."""

from __future__ import annotations

from typing import Any

from cotrec.records import Table2Summary
from cotrec.reporting.tables import Table1, estimate, ranker_label, table2_console_cells


def format_train_summary(summary: dict[str, Any]) -> str:
    ks = summary.get("ks", [10])
    head = f"variant       {summary['variant']} (seed {summary['seed']})" + (
        "  [up to date, skipped]" if summary.get("skipped") else "")
    lines = [head,
             f"best epoch    {summary['best_epoch']} of {summary['epochs']}",
             f"history mask  {'on' if summary['mask_history'] else 'off'}",
             "test          " + "  ".join(f"hit@{k} {summary[f'hit@{k}']:.4f} ndcg@{k} {summary[f'ndcg@{k}']:.4f}"
                                         for k in ks if k in (5, 10, 20)),
             "valid         " + "  ".join(f"ndcg@{k} {summary['valid'][f'ndcg@{k}']:.4f}" for k in ks if k == 10),
             f"users         {summary['users']:,}",
             f"time          {summary['wall_seconds']:.1f} s",
             f"folder        {summary['folder']}"]
    return "\n".join(lines)




def format_grid_summary(summary: Table1) -> str:
    lines = [f"{'variant':<24} {'hit@10':>17} {'ndcg@10':>17}"]
    for row in summary["rows"]:
        lines.append(f"{row['variant']:<24} {row['hit@10']:.4f} ± {row['hit@10_std']:.4f} "
                     f"{row['ndcg@10']:.4f} ± {row['ndcg@10_std']:.4f}")
    lines.append(f"seeds {', '.join(map(str, summary['seeds']))}; "
                 f"history {'masked' if summary['mask_history'] else 'not masked'}"
                 + ("  [up to date, skipped]" if summary.get("skipped") else f"; {summary['seconds']:.0f} s"))
    lines.append(f"report {summary['report']}")
    return "\n".join(lines)


def format_table2_summary(summary: Table2Summary) -> str:
    lines = [f"{'retriever':<28} {'ranker':<22} {'ndcg@10':>8} {'pf-ndcg':>8} {'mapb':>6} {'ranked':>6}"]
    for row in summary["rows"]:
        name = f"{row['label'] + ' ' + row['retriever']:<28} {ranker_label(row['ranker']):<22}"
        lines.append(f"{name} {table2_console_cells(row)}")
    for pair in summary.get("comparisons", []):
        parts = [f"{name} {estimate(pair[key])}" for key, name in (("ndcg@10", "ndcg@10"), ("pf_ndcg@10", "pf-ndcg"),
                                                                   ("mapb", "mapb")) if key in pair]
        lines.append(f"{pair['label']}: {ranker_label(pair['a'])} - {ranker_label(pair['b'])}: " + ", ".join(parts))
    lines.append(f"report {summary['report']}" + ("  [up to date, skipped]" if summary.get("skipped")
                                                  else f"; {summary['seconds']:.0f} s"))
    return "\n".join(lines)
