"""The extraction prompts, worded per domain (movie, news article, product, business).

Small instruct models (the embedded SmolLM2-135M) follow short, concrete prompts best: one task
per prompt, the items as a numbered list, the answer's length stated. Every output row records
PROMPT_VERSION; change it whenever a prompt's wording changes, so old rows are recognisably
made by other prompts (and a rerun redoes them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pandas as pd

from cotrec.llm.base import Conversation

PROMPT_VERSION = "2026-11-22.2"


@dataclass(frozen=True)
class Domain:
    noun: str  # what an item is
    verb: str  # what a user did with it (past tense)
    audience: str  # who writes reviews of it


DOMAINS = {
    "movie": Domain("movie", "watched", "a movie fan"),
    "news": Domain("news article", "read", "a news reader"),
    "product": Domain("product", "bought", "a shopper"),
    "business": Domain("business", "visited", "a customer"),
}

# Item columns that are identifiers or bookkeeping, never shown to the LLM.
_HIDDEN_COLUMNS = {"item_idx", "item_id", "caption", "url", "title_entities", "abstract_entities"}
_MAX_ATTRIBUTE_CHARS = 300


def domain_of(name: str) -> Domain:
    return DOMAINS.get(name, DOMAINS["product"])


def item_attributes(items: pd.DataFrame) -> list[dict[str, str]]:
    """Per item (in item_idx order), its non-empty descriptive attributes, e.g. year, genres."""
    columns = [c for c in items.columns if c not in _HIDDEN_COLUMNS]
    ordered = items.sort_values("item_idx")
    out = []
    for values in ordered[columns].astype("string").fillna("").itertuples(index=False):
        out.append({c: str(v).strip()[:_MAX_ATTRIBUTE_CHARS] for c, v in zip(columns, values) if str(v).strip()})
    return out


def item_labels(items: pd.DataFrame) -> list[str]:
    """A one-line label per item (in item_idx order): `Toy Story (1995; Animation, Comedy)`."""
    ordered = items.sort_values("item_idx")
    labels = []
    for caption, attributes in zip(ordered["caption"].astype("string").fillna(""), item_attributes(items)):
        short = [v for k, v in attributes.items() if k in ("year", "genres", "category", "subcategory", "categories",
                                                            "brand", "city")]
        labels.append(f"{caption} ({'; '.join(short)})" if short else str(caption))
    return labels


@functools.cache
def _numbered_template(count: int) -> str:
    """`"1. %s\n2. %s\n..."` for `count` items, made once per count: filling it with `%` is one C
    call, and every window prompt of the users job builds such a list."""
    return "\n".join(f"{i}. %s" for i in range(1, count + 1))


def numbered(labels: list[str]) -> str:
    """The labels as a numbered list, one per line: `1. Toy Story (1995; ...)`."""
    return _numbered_template(len(labels)) % tuple(labels)


def short_term_interest(domain: Domain, labels: list[str]) -> Conversation:
    """Window step 1: what this run of items says about the user's interest right now."""
    return [
        {"role": "system", "content": f"You describe a person's taste in {domain.noun}s briefly and concretely."},
        {"role": "user", "content": (
            f"A user {domain.verb} these {domain.noun}s, in this order:\n{numbered(labels)}\n\n"
            f"In one sentence starting with \"Likes\", say which kinds of {domain.noun}s this user enjoys "
            "right now (genres, themes, mood). Do not repeat the titles.")},
    ]


def merge_preference(domain: Domain, long_term: str, short_term: str) -> Conversation:
    """Window step 2: fold the new short-term interest into the long-term preference."""
    return [
        {"role": "system", "content": f"You keep a short profile of a person's taste in {domain.noun}s."},
        {"role": "user", "content": (
            f"The user's long-term preference so far:\n{long_term}\n\n"
            f"Their most recent interest:\n{short_term}\n\n"
            "Write the updated long-term preference in at most two sentences starting with \"Likes\": "
            "keep what still holds, add what is new.")},
    ]


def item_description(domain: Domain, caption: str, attributes: dict[str, Any]) -> Conversation:
    """An objective description of one item from its caption and attributes."""
    facts = "\n".join(f"{key}: {value}" for key, value in attributes.items())
    return [
        {"role": "system", "content": f"You write short, objective descriptions of {domain.noun}s."},
        {"role": "user", "content": (
            f"{domain.noun.capitalize()}: {caption}\n{facts}\n\n"
            f"Describe this {domain.noun} objectively in two sentences: what it is, its genre or kind, "
            "its themes and who it is for. No opinions.").replace("\n\n\n", "\n\n")},
    ]


def role_play_review(domain: Domain, preference: str, label: str, description: str) -> Conversation:
    """Perception step 1: the review this user would write of the candidate item."""
    about = f"{label}. {description}".strip() if description else label
    return [
        {"role": "system", "content": f"You are {domain.audience} with this taste: {preference}"},
        {"role": "user", "content": (
            f"The {domain.noun}: {about}\n\n"
            f"Write the short review (two or three sentences) you would write of this {domain.noun}, "
            "saying what you like or dislike about it given your taste.")},
    ]


def key_terms_schema(max_terms: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"key_terms": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 40},
                                     "minItems": 1, "maxItems": max_terms}},
        "required": ["key_terms"],
        "additionalProperties": False,
    }


def review_key_terms(domain: Domain, review: str, max_terms: int) -> Conversation:
    """Perception step 2: the key terms of the review (JSON-schema constrained)."""
    return [
        {"role": "system", "content": "You extract key terms from reviews and answer in JSON."},
        {"role": "user", "content": (
            f"Review of a {domain.noun}:\n{review}\n\n"
            f"List up to {max_terms} key terms (a few words each) that capture how the reviewer perceives "
            f'this {domain.noun}. Answer with JSON only: {{"key_terms": ["...", "..."]}}')},
    ]
