"""Item descriptions: an objective description of each item from its caption and attributes."""

from __future__ import annotations

import json
from typing import Any

from cotrec.extract.prompts import item_description
from cotrec.extract.steps import StepStats, describe_failure, is_context_overflow


async def item_program(row: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    stats = StepStats()
    attributes = json.loads(row["attributes"])
    while True:
        text, reply = await ctx.steps.text(item_description(ctx.domain, row["caption"], attributes),
                                           ctx.config.description_tokens, stats)
        if text or not (is_context_overflow(reply) and attributes):
            break
        # Too long for the context: drop the longest attribute and try again.
        attributes.pop(max(attributes, key=lambda k: len(attributes[k])))
    if not text:
        stats.fail(f"description: {describe_failure(reply)}")
    return [{"item_idx": int(row["item_idx"]), "description": text or "", "source_digest": row["source_digest"],
             "status": "ok" if text else "failed", "error": stats.last_error,
             "calls": stats.calls, "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}]


def failed_item_rows(row: dict[str, Any], error: str) -> list[dict[str, Any]]:
    return [{"item_idx": int(row["item_idx"]), "description": "", "source_digest": row["source_digest"],
             "status": "error", "error": error, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}]
