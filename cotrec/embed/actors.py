"""Encoding on a Ray Data actor pool: each actor loads the sentence encoder once and encodes a
batch of texts per call, so the driver loads no encoder and encoding scales with the pool
(`embed.max_actors`, `cpus_per_actor`, `gpus_per_actor`).

The driver cuts the texts into blocks of exactly `embed.batch_size`, each one batch and one
`encode` call (`cluster.map_on_actors`): a text is encoded beside the same texts whatever the
pool's size, so its vector does not depend on how many actors there were.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.pipeline import Pipeline

from cotrec.cluster import map_on_actors
from cotrec.config import EmbedConfig
from cotrec.embed.encoder import load_encoder
from cotrec.embed.mapping import apply_map
from cotrec.progress import Progress


class EncodeWorker:
    """The Ray Data actor: one encoder (and the fitted map, when given); a batch of (row, text) ->
    (row, vector), the vector mapped to the SASRec width when the actor holds the map."""

    def __init__(self, model: str, device: str, threads: int, mapping: Optional[Pipeline] = None):
        if device == "cpu":
            import torch

            torch.set_num_threads(threads)  # the actor's CPU share
        self.encoder = load_encoder(model, device)
        self.mapping = mapping

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        texts = batch["text"].tolist()
        vectors = self.encoder.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.mapping is not None:
            vectors = apply_map(self.mapping, vectors)
        return {"row": batch["row"].to_numpy(), "vector": vectors}


def encode_on_actors(config: EmbedConfig, texts: list[str], label: str,
                     mapping: Optional[Pipeline] = None) -> np.ndarray:
    """One float32 row per text, in order, encoded by `config.model` on the actor pool (and mapped
    by `mapping` there, when given)."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    size = config.batch_size
    table = pa.table({"row": np.arange(len(texts)), "text": texts})
    blocks = [table.slice(i, size) for i in range(0, len(texts), size)]
    actors = max(1, min(config.max_actors, len(blocks)))
    matrix: np.ndarray | None = None
    done = 0
    progress = Progress(len(texts))
    for batch in map_on_actors(blocks, EncodeWorker, {"model": config.model, "device": config.device,
                                                      "threads": max(1, int(config.cpus_per_actor)),
                                                      "mapping": mapping},
                               actors=actors, cpus=config.cpus_per_actor, gpus=config.gpus_per_actor,
                               resources=config.resources,
                               in_format="pandas", out_format="numpy"):
        vectors = batch["vector"]
        if matrix is None:
            matrix = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        matrix[batch["row"]] = vectors
        done += len(vectors)
        progress.update(done, lambda rate: f"embed {label}: {done:,} of {len(texts):,} texts encoded on "
                                           f"{actors} actor(s) ({rate:,.0f} texts/s)")
    assert matrix is not None and done == len(texts), (done, len(texts))
    return matrix

