"""The "Map" of Encode & Map: a scikit-learn reduction from the encoder's width to the SASRec width.

The authors truncated text-embedding-3-large vectors (a Matryoshka model) to the SASRec width and
L2-normalised them. A plain sentence encoder has no such ordering of dimensions, so we fit a
reduction (PCA by default) on the texts being embedded, then L2-normalise every row: the SASRec
embedding tables start from unit-norm rows, the same scale as their random initialisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
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


class ZeroPad(BaseEstimator, TransformerMixin):
    """Widen rows to `dim` with zero columns: a reduction fitted on fewer texts than `dim` has fewer
    components than the SASRec width, and the rest of the width starts empty."""

    def __init__(self, dim: int = 0):
        self.dim = dim

    def fit(self, vectors: np.ndarray, y: Any = None) -> "ZeroPad":
        return self

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return np.pad(vectors, ((0, 0), (0, max(0, self.dim - vectors.shape[1]))))


def fit_map(vectors: np.ndarray, method: str, dim: int, seed: int = 0) -> Pipeline:
    """Fit reduction + L2 normalisation on `vectors`; the pipeline maps new encoder outputs the same way.
    PCA and SVD find at most as many components as there are texts (and encoder dimensions): with
    fewer than `dim`, the rows are zero-padded to `dim`."""
    rows, width = vectors.shape
    components = dim if method == "random_projection" else min(dim, rows - (method == "svd"), width)
    if components < 1:
        raise CotrecError(f"embed.reduction {method}: cannot fit on {rows} text(s) of width {width}")
    steps = [("reduce", make_reduction(method, components, seed))]
    if components < dim:
        steps.append(("pad", ZeroPad(dim)))
    pipeline = Pipeline([*steps, ("l2", Normalizer(norm="l2"))])
    pipeline.fit(vectors.astype(np.float64))
    return pipeline


def apply_map(pipeline: Pipeline, vectors: np.ndarray) -> np.ndarray:
    return pipeline.transform(vectors.astype(np.float64)).astype(np.float32)
