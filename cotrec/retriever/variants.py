"""Table 1's variants: how the user token and the item table are initialised.

A variant is `user/item`: user in none | random | preference (none = no user token), item in
random | caption | description. Caption and random need nothing but the prepared data;
description and preference need the extraction outputs (through the `embed` stage).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from cotrec.config import RETRIEVER_ITEM_INITS, RETRIEVER_USER_INITS, TABLE1_VARIANTS, Config
from cotrec.embed.stage import fingerprint as embed_fingerprint
from cotrec.embed.stage import load_embedding
from cotrec.errors import CotrecError
from cotrec.rundir import RunDir

# The user token starts from the `train` horizon preference: it is trained on the train items,
# and that horizon has seen neither the valid nor the test target.
USER_INIT_HORIZON = "train"


def parse_variant(text: str) -> tuple[str, str]:
    """'preference/description' (or 'preference-description') -> ('preference', 'description')."""
    sep = "/" if "/" in text else "-"
    user, _, item = text.strip().lower().partition(sep)
    if user not in RETRIEVER_USER_INITS or item not in RETRIEVER_ITEM_INITS:
        raise CotrecError(f"variant {text!r}: expected USER/ITEM with USER in {', '.join(RETRIEVER_USER_INITS)} "
                          f"and ITEM in {', '.join(RETRIEVER_ITEM_INITS)} (Table 1: {', '.join(TABLE1_VARIANTS)})")
    return user, item


def variant_name(user: str, item: str) -> str:
    return f"{user}/{item}"


def variant_dir(config: Config, user: str, item: str, seed: int) -> str:
    """`retriever/<user>-<item>` for the config's seed (what later stages read), `...-seed<k>` otherwise."""
    base = f"retriever/{user}-{item}"
    return base if seed == config.seed else f"{base}-seed{seed}"


def embedding_kinds(user: str, item: str) -> list[str]:
    kinds = [item] if item in ("caption", "description") else []
    if user == "preference":
        kinds.append("preference")
    return kinds


def embedding_fingerprints(config: Config, run: RunDir, user: str, item: str) -> dict[str, str]:
    return {kind: embed_fingerprint(config, run, kind) for kind in embedding_kinds(user, item)}


def initial_tables(config: Config, run: RunDir, user: str, item: str, num_users: int,
                   seed: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray], dict]:
    """(item_init, user_init, notes); None means random rows (the model's own initialisation)."""
    notes: dict = {}
    item_init = None
    if item in ("caption", "description"):
        item_init = load_embedding(config, run, item)["matrix"]
    user_init = None
    if user == "preference":
        emb = load_embedding(config, run, "preference")
        h = ("train", "valid", "test").index(USER_INIT_HORIZON)
        found = emb["found"][h]
        rng = np.random.default_rng(seed)
        dim = emb["matrix"].shape[-1]
        user_init = rng.normal(0.0, 1.0 / math.sqrt(dim), size=(num_users, dim)).astype(np.float32)
        user_init[found] = emb["matrix"][h][found]
        notes = {"user_init_horizon": USER_INIT_HORIZON, "users_with_preference": int(found.sum()),
                 "users_random": int((~found).sum())}
    return item_init, user_init, notes
