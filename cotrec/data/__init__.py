"""Datasets, from a source's own files to the leave-one-out tables every later stage reads.

- `raw.py` the raw dataset and the helpers loaders share; `movielens.py`, `mind.py`, `amazon.py`,
  `yelp.py` and `synthetic.py` the loaders, `sources.py` which one reads which `data.source`.
- `preprocess.py` filter, k-core, sample, ids, chronological split; `prepare.py` the `prepare` stage.

Nothing is imported here: a loader pulls in only what its own format needs.
"""
