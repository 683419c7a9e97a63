"""The "Map" of Encode & Map: a scikit-learn reduction from the encoder's width to the SASRec width.

The authors truncated text-embedding-3-large vectors (a Matryoshka model) to the SASRec width and
L2-normalised them. A plain sentence encoder has no such ordering of dimensions, so we fit a
reduction (PCA by default) on the texts being embedded, then L2-normalise every row: the SASRec
embedding tables start from unit-norm rows, the same scale as their random initialisation.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA, TruncatedSVD
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer
from sklearn.random_projection import GaussianRandomProjection

from cotrec.errors import CotrecError


def make_reduction(method: str, dim: int, seed: int = 0):
    if method == "pca":
        return PCA(n_components=dim, random_state=seed)
    if method == "svd":
        return TruncatedSVD(n_components=dim, random_state=seed)
    if method == "random_projection":
        return GaussianRandomProjection(n_components=dim, random_state=seed)
    raise CotrecError(f"embed.reduction: unknown method {method!r}")


def fit_map(vectors: np.ndarray, method: str, dim: int, seed: int = 0) -> Pipeline:
    """Fit reduction + L2 normalisation on `vectors`; the pipeline maps new encoder outputs the same way."""
    rows, width = vectors.shape
    if method in ("pca", "svd") and dim > min(rows, width):
        raise CotrecError(f"embed.reduction {method}: cannot reduce {rows} texts of width {width} to "
                          f"retriever.dim={dim} (needs at least {dim} texts and encoder width >= {dim})")
    pipeline = Pipeline([("reduce", make_reduction(method, dim, seed)), ("l2", Normalizer(norm="l2"))])
    pipeline.fit(vectors.astype(np.float64))
    return pipeline


def apply_map(pipeline: Pipeline, vectors: np.ndarray) -> np.ndarray:
    return pipeline.transform(vectors.astype(np.float64)).astype(np.float32)
