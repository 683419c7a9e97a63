"""The ranking prompt, LlamaRec style: the history, then the candidates labelled A, B, C, ...

The answer is a single letter, so one forward step scores every candidate at once. The parts
shared by many prompts come first (instruction, history, preference), the candidate lines last:
the M prompts of one user's MAPB probe then share a long prefix that vLLM's prefix cache reuses.
Each candidate's letter closes its line ("- Title: key terms (C)"): at the letter the model has read
the whole line, so learning which letter to answer is one step from the content it depends on. With
the letter first ("C. Title"), the embedded model learns no content rule in hundreds of steps
(tests/test_finetune.py's task: not learnt in 300 steps letter first, learnt in about 50 letter last).

Variants (the paper's Table 2, plus the authors' later ablation):
- `llm`: history titles and candidate titles;
- `llm+`: adds the user's long-term preference;
- `llm++`: adds the preference and, after each candidate, the key terms of the review the user
  would write about it (the perception).
Change PROMPT_VERSION whenever the wording changes: fine-tuned adapters are tied to it.
"""

from __future__ import annotations

from typing import Optional, Sequence

from cotrec.extract.prompts import Domain, numbered
from cotrec.extract.steps import trim_to_sentence
from cotrec.llm import letters
from cotrec.llm.base import Conversation

PROMPT_VERSION = "2026-12-06.1"


def uses_preference(prompt: str) -> bool:
    return prompt in ("llm+", "llm++")


def uses_perceptions(prompt: str) -> bool:
    return prompt == "llm++"


def shorten(text: str, max_chars: int) -> str:
    """Cut a long text at its last full sentence within `max_chars`."""
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else trim_to_sentence(text[:max_chars])


def ranking_conversation(domain: Domain, prompt: str, history: Sequence[str], candidates: Sequence[str],
                         preference: Optional[str] = None,
                         key_terms: Optional[Sequence[Sequence[str]]] = None) -> Conversation:
    """The conversation whose next token (a letter) ranks `candidates` (labels, in shown order)."""
    labels = letters(len(candidates))
    system = (f"You are a recommender system. Given the {domain.noun}s a user {domain.verb}, choose the "
              f"candidate {domain.noun} the user is most likely to pick next. Answer with its letter only.")
    parts = [f"The user {domain.verb}, oldest first:\n{numbered(list(history))}"]
    if uses_preference(prompt):
        parts.append(f"The user's preference: {preference or 'unknown'}")
    lines = []
    for i, (letter, label) in enumerate(zip(labels, candidates)):
        terms = list(key_terms[i]) if uses_perceptions(prompt) and key_terms is not None else []
        lines.append(f"- {label}" + (f": {', '.join(terms)}" if terms else "") + f" ({letter})")
    parts.append("Candidates:\n" + "\n".join(lines))
    parts.append(f"Which candidate will the user pick next? Answer with one letter from {labels[0]} to {labels[-1]}.")
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
