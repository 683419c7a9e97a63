"""What a trained variant leaves in its folder, read back: its model (`model.pt`) and its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cotrec.config import Config
from cotrec.errors import DataError
from cotrec.retriever.sasrec import SASRec, SASRecConfig
from cotrec.retriever.variants import parse_variant, variant_dir
from cotrec.rundir import RunDir
from cotrec.safeload import load_state
from cotrec.storage import as_path


def load_retriever(config: Config, run: RunDir, variant: str, unknown_user: bool = False) -> SASRec:
    """A trained variant's SASRec (the config seed's, in eval mode). `unknown_user`: a user-token model
    gets one more user row, the mean of the others, for users it has never seen."""
    user, item = parse_variant(variant)
    folder = run / variant_dir(config, user, item, config.seed)
    if not (folder / "model.pt").is_file():
        raise DataError(f"{folder}: no trained retriever (model.pt); run `cotrec retriever train "
                        f"--variant {user}/{item}` first")
    with (folder / "model.pt").open("rb") as saved:
        state = load_state(saved, folder / "model.pt")
    cfg, weights = SASRecConfig(**state["sasrec"]), dict(state["model"])
    if cfg.user_token and unknown_user:
        table = weights["user_emb.weight"]
        weights["user_emb.weight"] = torch.cat([table, table.mean(0, keepdim=True)])
        cfg = SASRecConfig(**{**state["sasrec"], "num_users": cfg.num_users + 1})
    model = SASRec(cfg)
    model.load_state_dict(weights)
    return model.eval()


def read_metrics(folder: Path) -> dict[str, Any]:
    return json.loads((as_path(folder) / "metrics.json").read_text())
