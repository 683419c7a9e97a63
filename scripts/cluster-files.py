#!/usr/bin/env python3
"""Write the cluster files with your image: `make cluster-files COTREC_IMAGE=registry/cotrec:tag`.

cluster/ray-cluster.yaml and cluster/kuberay/*.yaml name the image as ${COTREC_IMAGE}, the one
thing a user must set, and the KubeRay job's and service's run directory as ${COTREC_RUN_DIR}
(default: the shared volume's /shared/runs/gpu-cluster; or a bucket, `s3://bucket/runs/gpu-cluster`).
This writes them into --out (build/cluster/ by default), keeping the layout (ray-cluster.yaml,
kuberay/...). Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILES = ["ray-cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml",
         "kuberay/shared-pvc.yaml"]
VARIABLE = "${COTREC_IMAGE}"
RUN_DIR_VARIABLE = "${COTREC_RUN_DIR}"
DEFAULT_RUN_DIR = "/shared/runs/gpu-cluster"
# Where every pod finds the run: an absolute path (a mounted RWX volume) or a store's URI.
RUN_DIR = re.compile(r"^(?:/[^\s]+|[a-z][a-z0-9+.-]*://[^\s/]+(?:/[^\s]*)?)$")
# A Docker image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
REFERENCE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?"
                       r"(?:@sha256:[0-9a-f]{64})?$")


def render(text: str, image: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    return text.replace(VARIABLE, image).replace(RUN_DIR_VARIABLE, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the image cluster/Dockerfile built, as pushed")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help="the KubeRay job's and service's run directory: an absolute path on the shared "
                             "volume or a URI (s3://bucket/runs/name)")
    parser.add_argument("--out", default=str(REPO / "build" / "cluster"))
    args = parser.parse_args(argv)
    if not REFERENCE.match(args.image):
        print(f"cluster-files: COTREC_IMAGE {args.image!r} is not an image reference "
              f"(e.g. ghcr.io/me/cotrec:0.1)", file=sys.stderr)
        return 2
    if not RUN_DIR.match(args.run_dir):
        print(f"cluster-files: COTREC_RUN_DIR {args.run_dir!r} is neither an absolute path every pod mounts "
              f"nor a URI (e.g. /shared/runs/gpu-cluster or s3://bucket/runs/gpu-cluster)", file=sys.stderr)
        return 2
    out = Path(args.out)
    for name in FILES:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render((REPO / "cluster" / name).read_text(), args.image, args.run_dir))
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
