"""Ranker scoring on a Ray Data actor pool: letter probabilities of many ranking prompts.

The driver renders the prompts (it has the run's items) and each actor of the pool holds one
engine and scores a block of `ranker.lists_per_call` of them per call (`score_choices`: one
forward step per prompt; `cluster.map_on_actors`). The
pool is placed like the extraction actors (`extract.min_actors`, `max_actors`, `cpus_per_actor`,
`gpus_per_actor`), so the driver holds no engine and scoring scales with the GPUs a cluster has;
a CUDA engine is never placed without a GPU (the config refuses it). Several evaluations of one
model (a grid's zero-shot rows) are scored in one pass, so each engine starts once.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow as pa

from cotrec.cluster import map_on_actors
from cotrec.config import Config
from cotrec.llm import letters, load_actor_engine
from cotrec.llm.base import Conversation
from cotrec.progress import Progress


class ChoiceScoringWorker:
    """The Ray Data actor: one engine; a batch of (conversation, number of choices) -> probabilities."""

    def __init__(self, llm: dict[str, Any]):
        self.engine, self.load_seconds = load_actor_engine(llm)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:  # in order, as an extraction actor does
            engine.close()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        probs: list[Optional[list[float]]] = [None] * len(batch)
        for size, positions in batch.groupby("choices").indices.items():  # one call per list size
            conversations = [json.loads(batch["conversation"].iat[p]) for p in positions]
            scores = self.engine.score_choices_sync(conversations, letters(int(size)))
            for p, s in zip(positions, scores):
                probs[p] = [float(x) for x in s.probs]
        return pd.DataFrame({"prompt": batch["prompt"].to_numpy(), "probs": probs})


def score_prompts(config: Config, model: str, dtype: Optional[str], prompts: list[tuple[Conversation, int]],
                  name: str) -> tuple[list[np.ndarray], int]:
    """The choice probabilities of every (conversation, number of choices), in order, scored by
    `model` (in `dtype` rather than llm.dtype when given) on the actor pool; and the pool's size."""
    if not prompts:
        return [], 0
    ec = config.extract
    llm = config.llm.model_copy(update={"model": model, **({"dtype": dtype} if dtype else {})})
    per_batch = max(1, config.ranker.lists_per_call)
    table = pa.table({"prompt": np.arange(len(prompts)),
                      "conversation": [json.dumps(c) for c, _ in prompts],
                      "choices": [n for _, n in prompts]})
    blocks = [table.slice(i, per_batch) for i in range(0, len(table), per_batch)]
    # No more actors than batches: an actor that would score nothing still loads a model.
    actors = max(1, min(ec.max_actors, len(blocks)))
    scored: dict[int, np.ndarray] = {}
    progress = Progress(len(prompts))
    for batch in map_on_actors(blocks, ChoiceScoringWorker, {"llm": llm.model_dump(mode="json")}, actors=actors,
                               min_actors=ec.min_actors, cpus=ec.cpus_per_actor, gpus=ec.gpus_per_actor,
                               resources=config.ranker.resources, in_format="pandas", out_format="pandas"):
        for prompt, probs in zip(batch["prompt"], batch["probs"]):
            scored[int(prompt)] = np.asarray(probs, dtype=np.float64)
        progress.update(len(scored), lambda rate: f"{name}: {len(scored):,} of {len(prompts):,} prompts scored "
                                                  f"on {actors} actor(s) ({rate:.1f} prompts/s)")
    return [scored[i] for i in range(len(prompts))], actors
