"""Perception role-play: the review a user would write of a candidate, then its key terms.

Given the user's preference (at the pair's horizon) and the item's description, the LLM writes
the review this user would write; a second call extracts the review's key terms as JSON
(schema-constrained where the backend decodes with a schema). The key terms are the user's
subjective perception of the item that the ranker's `llm++` prompt shows.
"""

from __future__ import annotations

from typing import Any

from cotrec.extract.prompts import key_terms_schema, review_key_terms, role_play_review
from cotrec.extract.steps import StepStats, describe_failure


def _clean_terms(terms: list[Any], limit: int) -> list[str]:
    seen, out = set(), []
    for term in terms:
        text = str(term).strip()
        if text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out[:limit]


async def pair_program(row: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    stats = StepStats()
    config = ctx.config
    review, terms = "", []
    if not row["preference"]:
        stats.fail("no preference for this user and horizon")
    else:
        text, reply = await ctx.steps.text(
            role_play_review(ctx.domain, row["preference"], row["label"], row["description"] or ""),
            config.review_tokens, stats)
        if not text:
            stats.fail(f"review: {describe_failure(reply)}")
        else:
            review = text
            parsed, reply = await ctx.steps.json(review_key_terms(ctx.domain, review, config.max_key_terms),
                                                 key_terms_schema(config.max_key_terms), config.key_terms_tokens, stats)
            if parsed is None:
                stats.fail(f"key terms: {describe_failure(reply)}")
            else:
                terms = _clean_terms(parsed["key_terms"], config.max_key_terms)
    ok = bool(review) and bool(terms)
    return [{"user_idx": int(row["user_idx"]), "horizon": row["horizon"], "item_idx": int(row["item_idx"]),
             "review": review, "key_terms": terms, "source_digest": row["source_digest"],
             "status": "ok" if ok else "failed", "error": stats.last_error,
             "calls": stats.calls, "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens}]


def failed_pair_rows(row: dict[str, Any], error: str) -> list[dict[str, Any]]:
    return [{"user_idx": int(row["user_idx"]), "horizon": row["horizon"], "item_idx": int(row["item_idx"]),
             "review": "", "key_terms": [], "source_digest": row["source_digest"], "status": "error", "error": error,
             "calls": 0, "prompt_tokens": 0, "completion_tokens": 0}]
