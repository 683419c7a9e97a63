"""Validating a custom resource against its CustomResourceDefinition's OpenAPI v3 schema.

What the Kubernetes API server does with a RayCluster, RayJob or RayService that `kubectl apply`
sends: check types, enums, required fields and patterns (jsonschema does these on the schema as
published), and drop every field the schema does not declare. That pruning is silent, so a
misspelt key (`rayStartParam`) would be a setting that never arrives; here it is an error. The
schemas are KubeRay's, from a named release (tests/data/kuberay-<release>/, descriptions removed).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema

RELEASE = "v1.7.0"  # ray-project/kuberay tag; its commit is in tests/data/kuberay-v1.7.0/SOURCE
SCHEMAS = Path(__file__).parent / "data" / f"kuberay-{RELEASE}"
FILES = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def crd_schema(kind: str) -> dict[str, Any]:
    return json.loads(gzip.decompress((SCHEMAS / f"{FILES[kind]}.json.gz").read_bytes()))["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the structural schema does not declare (the API server would prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and schema.get("type") == "object":
        declared = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if declared is not None and key in declared:
                found += unknown_fields(item, declared[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, where)
            elif declared is not None:  # an object without properties (metadata) stays open
                found.append(f"{where}: not in the {RELEASE} schema (Kubernetes would drop it)")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def crd_errors(document: dict[str, Any]) -> list[str]:
    """Every reason the API server would refuse the document or silently change it."""
    schema = crd_schema(document["kind"])
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(document)]
    return errors + unknown_fields(document, schema)
