"""The `embed` stage: `<run>/embed/<kind>/{matrix.npy, reduction.joblib, meta.json}` per text kind.

Kinds: `caption` (items), `description` (items: caption + the LLM's description) and `preference`
(users, one row per horizon train/valid/test). Each kind is its own staged folder with its own
fingerprint (data + embed config + SASRec width + the extraction shards it read), so adding the
descriptions later re-embeds only what changed, and the retriever asks for exactly the kind a
variant needs.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Iterable

import joblib
import numpy as np

from cotrec.cluster import in_ray_job
from cotrec.config import Config
from cotrec.embed.actors import encode_on_actors
from cotrec.embed.encoder import encode, load_encoder
from cotrec.embed.mapping import apply_map, fit_map
from cotrec.embed.texts import HORIZONS, SOURCES, caption_texts, description_texts, preference_texts, source_digest
from cotrec.errors import CotrecError
from cotrec.extract.programs import PROGRAMS, output_folder
from cotrec.extract.shards import shard_files
from cotrec.fingerprint import fingerprint as fingerprint_of
from cotrec.progress import log
from cotrec.rundir import RunDir, read_table, write_json

STAGE_DIR = "embed"
EMBED_KINDS = ("caption", "description", "preference")


def fingerprint(config: Config, run: RunDir, kind: str) -> str:
    parts = {"config": config.fingerprint("data", "embed"), "dim": config.retriever.dim, "kind": kind}
    if kind in SOURCES:
        parts["extract"] = source_digest(run, kind, f"{kind} embeddings")
    return fingerprint_of(parts)


def available_kinds(run: RunDir) -> list[str]:
    """caption always; description / preference when their extraction output exists."""
    return ["caption"] + [kind for kind, source in SOURCES.items() if shard_files(output_folder(run, source))]


@functools.lru_cache(maxsize=1)
def _local_encoder(model: str, device: str) -> Any:
    """The in-process encoder, loaded once for all the kinds a run embeds."""
    return load_encoder(model, device)


def encode_distinct(config: Config, texts: list[str], label: str) -> np.ndarray:
    """One row per text, each distinct text encoded once (the valid horizon repeats train).

    In a Ray job (`cotrec run`, `ray job submit`, any process with Ray up) the encoders run on the
    Ray Data actor pool and the driver loads none; a bare call without Ray encodes in this process,
    as a small local run needs no cluster start-up for it."""
    distinct, rows = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    if in_ray_job():
        log(f"embed: {label}: encoding {len(distinct):,} distinct texts with {config.embed.model} on up to "
            f"{config.embed.max_actors} actor(s)")
        vectors = encode_on_actors(config.embed, distinct.tolist(), label)
    else:
        log(f"embed: {label}: encoding {len(distinct):,} distinct texts with {config.embed.model} in this process")
        vectors = encode(_local_encoder(config.embed.model, config.embed.device), distinct.tolist(),
                         config.embed.batch_size, label)
    return vectors[rows.reshape(-1)]


def _embed_kind(config: Config, run: RunDir, kind: str, force: bool) -> dict[str, Any]:
    stage = f"{STAGE_DIR}/{kind}"
    fp = fingerprint(config, run, kind)
    if not force and run.is_complete(stage, fp):
        meta = json.loads((run / stage / "meta.json").read_text())
        return {"skipped": True, **meta}
    started = time.perf_counter()
    items = read_table(run, "items")
    found = None
    if kind == "caption":
        texts = caption_texts(items)
        covered = len(texts)
    elif kind == "description":
        texts, covered = description_texts(run, items)
    else:
        users = read_table(run, "users")
        texts, found = preference_texts(run, len(users))
        covered = int(found.sum())
    log(f"embed: {kind}: {len(texts):,} texts ({covered:,} from their source)")
    vectors = encode_distinct(config, texts, kind)
    # Fit the reduction on real texts only (empty placeholders of missing preferences are left out),
    # and for preferences on the train horizon only: the test horizon has seen the valid target.
    fit_rows = vectors if found is None else vectors[:found.shape[1]][found[0]]
    pipeline = fit_map(fit_rows, config.embed.reduction, config.retriever.dim)
    matrix = apply_map(pipeline, vectors)
    meta = {"kind": kind, "rows": int(matrix.shape[0]), "dim": int(matrix.shape[1]),
            "covered": covered, "encoder": config.embed.model, "encoder_dim": int(vectors.shape[1]),
            "fit_rows": int(len(fit_rows)), "fit_on": "texts" if found is None else "train horizon",
            "reduction": config.embed.reduction, "seconds": round(time.perf_counter() - started, 3)}
    if found is not None:
        meta["horizons"] = list(HORIZONS)
        matrix = matrix.reshape(len(HORIZONS), -1, matrix.shape[1])
        meta["users_per_horizon"] = {h: int(n) for h, n in zip(HORIZONS, found.sum(axis=1))}
    with run.staged(stage, fp) as folder:
        with (folder / "matrix.npy").open("wb") as out:
            np.save(out, matrix)
        if found is not None:
            with (folder / "found.npy").open("wb") as out:
                np.save(out, found)
        with (folder / "reduction.joblib").open("wb") as out:
            joblib.dump(pipeline, out)
        write_json(folder / "meta.json", meta)
    return {"skipped": False, **meta}


def embed(config: Config, run: RunDir, force: bool = False,
          kinds: Iterable[str] | None = None) -> dict[str, Any]:
    """Embed the given kinds (default: every kind whose source exists); skipped when up to date."""
    wanted = list(kinds) if kinds is not None else available_kinds(run)
    for kind in wanted:
        if kind not in EMBED_KINDS:
            raise CotrecError(f"embed: unknown kind {kind!r} (kinds: {', '.join(EMBED_KINDS)})")
    done = {kind: _embed_kind(config, run, kind, force) for kind in wanted}
    available = available_kinds(run)
    missing = [k for k in EMBED_KINDS if k not in wanted and k not in available]
    return {"skipped": all(v["skipped"] for v in done.values()), "kinds": done, "not_available": missing,
            "not_needed": [k for k in EMBED_KINDS if k not in wanted and k in available],
            "folder": str(run / STAGE_DIR)}


def load_embedding(config: Config, run: RunDir, kind: str) -> dict[str, np.ndarray]:
    """The `matrix` (and `found` for preference) of one kind, embedding it first when needed."""
    embed(config, run, kinds=[kind])
    folder = run / STAGE_DIR / kind
    out = {}
    for name in ("matrix", "found"):
        if name == "matrix" or (folder / f"{name}.npy").exists():
            with (folder / f"{name}.npy").open("rb") as saved:
                out[name] = np.load(saved)
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for kind, meta in summary["kinds"].items():
        state = "  [up to date, skipped]" if meta.get("skipped") else f"  {meta['seconds']:.1f} s"
        lines.append(f"{kind:<12} {meta['rows']:>7,} x {meta['dim']}  ({meta['covered']:,} from source; "
                     f"{meta['encoder']} -> {meta['reduction']}){state}")
    for kind in summary["not_available"]:
        lines.append(f"{kind:<12} not available (no {PROGRAMS[SOURCES[kind]].folder} output yet)")
    for kind in summary.get("not_needed", []):
        lines.append(f"{kind:<12} not needed by this run's grids")
    return "\n".join(lines)
