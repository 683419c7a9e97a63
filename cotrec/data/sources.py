"""Which loader reads which `data.source`."""

from __future__ import annotations

from pathlib import Path

from cotrec.config import DataConfig
from cotrec.data.amazon import load_amazon_folder
from cotrec.data.mind import load_mind_folder
from cotrec.data.movielens import RECBOLE_ML1M, RECBOLE_ML100K, load_movielens_folder, load_recbole
from cotrec.data.raw import RawDataset
from cotrec.data.synthetic import load_synthetic
from cotrec.data.yelp import load_yelp_folder


def load_source(data: DataConfig) -> RawDataset:
    if data.source == "ml-100k":
        raw = load_recbole(RECBOLE_ML100K)
    elif data.source == "ml-1m":
        raw = load_recbole(RECBOLE_ML1M)
    elif data.source == "synthetic":
        raw = load_synthetic(data.synthetic)
    else:
        folder = Path(data.path).expanduser()
        if data.source == "movielens":
            raw = load_movielens_folder(folder)
        elif data.source == "mind":
            raw = load_mind_folder(folder)
        elif data.source == "amazon":
            raw = load_amazon_folder(folder, data.amazon_category)
        elif data.source == "yelp":
            raw = load_yelp_folder(folder)
        else:  # the config's Literal makes this unreachable
            raise AssertionError(data.source)
    if data.domain:
        raw.domain = data.domain
    return raw
