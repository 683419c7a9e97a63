"""Personalised information extraction (CoT-Rec's first half), on Ray Data.

- `prompts.py`     the prompts, worded per domain; PROMPT_VERSION
- `windows.py`     the window grid over a history; history digests
- `steps.py`       one LLM step with bookkeeping and the failure policy
- `preference.py`  the user preference recurrence and its horizons
- `description.py` objective item descriptions
- `perception.py`  role-played review + key terms per (user, candidate)
- `runner.py`      Ray Data actor pool of engines, async programs, parquet shards, resume
- `stage.py`       `extract items|users|perceptions`: input rows, skip what is done, summary
"""

from cotrec.extract.stage import extract_items, extract_perceptions, extract_users, format_summary

__all__ = ["extract_items", "extract_perceptions", "extract_users", "format_summary"]
