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
from typing import Any, Iterable, Optional, TypedDict

import joblib
import numpy as np
from sklearn.pipeline import Pipeline

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
from cotrec.rundir import RunDir, read_stats, read_table, write_json

STAGE_DIR = "embed"
EMBED_KINDS = ("caption", "description", "preference")


def fingerprint(config: Config, run: RunDir, kind: str) -> str:
    dumped = config.model_dump(mode="json")
    settings = {k: v for k, v in dumped["embed"].items() if k not in ("fit_sample", "resources")}
    parts = {"config": fingerprint_of({"data": dumped["data"], "embed": settings}), "dim": config.retriever.dim,
             "kind": kind}
    # The sample size changes the output only where it binds: more items or users than it.
    sample = config.embed.fit_sample
    if sample is not None and read_stats(run)["users" if kind == "preference" else "items"] > sample:
        parts["fit_sample"] = sample
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


def _encode(config: Config, texts: list[str], label: str, mapping: Optional[Pipeline] = None) -> np.ndarray:
    """One row per (distinct) text, mapped to the SASRec width when `mapping` is given.

    In a Ray job (`cotrec run`, `ray job submit`, any process with Ray up) the encoders run on the
    Ray Data actor pool and the driver loads none; a bare call without Ray encodes in this process,
    as a small local run needs no cluster start-up for it."""
    if in_ray_job():
        log(f"embed: {label}: encoding {len(texts):,} distinct texts with {config.embed.model} on up to "
            f"{config.embed.max_actors} actor(s)")
        return encode_on_actors(config.embed, texts, label, mapping)
    log(f"embed: {label}: encoding {len(texts):,} distinct texts with {config.embed.model} in this process")
    vectors = encode(_local_encoder(config.embed.model, config.embed.device), texts, config.embed.batch_size, label)
    return vectors if mapping is None else apply_map(mapping, vectors)


def encode_distinct(config: Config, texts: list[str], label: str) -> np.ndarray:
    """The encoder's vector of every text, each distinct text encoded once (the valid horizon repeats train)."""
    distinct, rows = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    return _encode(config, distinct.tolist(), label)[rows.reshape(-1)]


def encode_and_map(config: Config, texts: list[str], fit_rows: np.ndarray, label: str) -> tuple[np.ndarray, Pipeline, int]:
    """Every text's vector at the SASRec width (each distinct text encoded once), the fitted map and
    the number of texts it was fitted on.

    The map is fitted on the texts at `fit_rows`. With more of them than `embed.fit_sample`, it is
    fitted on a seeded sample: the sample's texts are encoded first, then the others are encoded
    and mapped where they are encoded, so only the sample's encoder-width vectors reach this
    process."""
    distinct, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    inverse = inverse.reshape(-1)
    reduction, dim, sample_size = config.embed.reduction, config.retriever.dim, config.embed.fit_sample
    if sample_size is None or len(fit_rows) <= sample_size:
        vectors = _encode(config, distinct.tolist(), label)
        mapping = fit_map(vectors[inverse[fit_rows]], reduction, dim)
        return apply_map(mapping, vectors)[inverse], mapping, len(fit_rows)
    sample = np.sort(np.random.default_rng(config.seed).choice(fit_rows, sample_size, replace=False))
    first = np.unique(inverse[sample])
    sampled = _encode(config, distinct[first].tolist(), f"{label} fit sample")
    mapping = fit_map(sampled[np.searchsorted(first, inverse[sample])], reduction, dim)
    mapped = np.empty((len(distinct), dim), dtype=np.float32)
    mapped[first] = apply_map(mapping, sampled)
    del sampled
    rest = np.setdiff1d(np.arange(len(distinct)), first)
    if len(rest):
        mapped[rest] = _encode(config, distinct[rest].tolist(), label, mapping)
    return mapped[inverse], mapping, sample_size


class EmbeddingMeta(TypedDict, total=False):
    """One kind's `meta.json` (and, with `skipped`, what `embed` reports of it)."""

    kind: str
    rows: int
    dim: int
    covered: int
    encoder: str
    encoder_dim: int
    fit_rows: int
    fit_on: str
    fit_sampled_from: int
    reduction: str
    seconds: float
    horizons: list[str]
    users_per_horizon: dict[str, int]
    skipped: bool


class EmbedSummary(TypedDict):
    """`embed`'s result: each embedded kind's meta, and the kinds it left out."""

    skipped: bool
    kinds: dict[str, EmbeddingMeta]
    not_available: list[str]
    not_needed: list[str]
    folder: str


def _embed_kind(config: Config, run: RunDir, kind: str, force: bool) -> EmbeddingMeta:
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
    # Fit the reduction on real texts only (empty placeholders of missing preferences are left out),
    # and for preferences on the train horizon only: the test horizon has seen the valid target.
    fit_rows = np.arange(len(texts)) if found is None else np.flatnonzero(found[0])
    matrix, pipeline, fitted = encode_and_map(config, texts, fit_rows, kind)
    meta: EmbeddingMeta = {"kind": kind, "rows": int(matrix.shape[0]), "dim": int(matrix.shape[1]),
                           "covered": covered, "encoder": config.embed.model, "encoder_dim": _encoder_width(pipeline),
                           "fit_rows": fitted, "fit_on": "texts" if found is None else "train horizon",
                           **({"fit_sampled_from": int(len(fit_rows))} if fitted < len(fit_rows) else {}),
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


def _encoder_width(pipeline: Pipeline) -> int:
    return int(pipeline.steps[0][1].n_features_in_)


def embed(config: Config, run: RunDir, force: bool = False,
          kinds: Iterable[str] | None = None) -> EmbedSummary:
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


def format_summary(summary: EmbedSummary) -> str:
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
