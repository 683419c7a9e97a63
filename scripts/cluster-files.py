#!/usr/bin/env python3
"""Write the cluster files with your image: `make cluster-files COTREC_IMAGE=registry/cotrec:tag`.

cluster/ray-cluster.yaml and cluster/kuberay/*.yaml name the image as ${COTREC_IMAGE}, the one
thing a user must set, and the KubeRay job's and service's run directory as ${COTREC_RUN_DIR}
(default: the shared volume's /shared/runs/gpu-cluster; or a bucket, `s3://bucket/runs/gpu-cluster`).
The launcher mounts the NFS export ${COTREC_SHARED} (e.g. an EFS file system) at /shared on every
node; without one, its lines marked `# shared-volume` are left out and its run directories go to a
bucket. This writes them into --out (build/cluster/ by default), keeping the layout
(ray-cluster.yaml, kuberay/...). Standard library only: it runs before any venv exists.
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
SHARED_VARIABLE = "${COTREC_SHARED}"
SHARED_MARK = "# shared-volume"
# An NFS export: host:/path (an EFS file system's DNS name and its root, e.g. fs-0123.efs.us-west-2.amazonaws.com:/).
SHARED = re.compile(r"^[A-Za-z0-9.-]+:/[^\s]*$")
# Where every pod finds the run: an absolute path (a mounted RWX volume) or a store's URI.
RUN_DIR = re.compile(r"^(?:/[^\s]+|[a-z][a-z0-9+.-]*://[^\s/]+(?:/[^\s]*)?)$")
# A Docker image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
REFERENCE = re.compile(r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?"
                       r"(?:@sha256:[0-9a-f]{64})?$")


def render(text: str, image: str, run_dir: str = DEFAULT_RUN_DIR, shared: str | None = None) -> str:
    text = text.replace(VARIABLE, image).replace(RUN_DIR_VARIABLE, run_dir)
    if shared is not None:
        return text.replace(SHARED_VARIABLE, shared)
    return without_shared_volume(text)


def without_shared_volume(text: str) -> str:
    """The file without its `# shared-volume` lines, each with the lines indented under it (a folded
    command's continuation); a list left empty stays a list."""
    kept, dropping_under = [], None
    for line in text.splitlines(keepends=True):
        indent = len(line) - len(line.lstrip())
        if dropping_under is not None and line.strip() and indent > dropping_under:
            continue
        dropping_under = None
        if line.rstrip().endswith(SHARED_MARK):
            dropping_under = indent
            continue
        kept.append(line)
    return re.sub(r"^(\w+):\n(?![ \t]+\S)", r"\1: []\n", "".join(kept), flags=re.M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the image cluster/Dockerfile built, as pushed")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR,
                        help="the KubeRay job's and service's run directory: an absolute path on the shared "
                             "volume or a URI (s3://bucket/runs/name)")
    parser.add_argument("--shared", default=None,
                        help="the NFS export the launcher mounts at /shared on every node (host:/path, e.g. an EFS "
                             "file system); default: none, run directories on a bucket")
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
    if args.shared is not None and not SHARED.match(args.shared):
        print(f"cluster-files: COTREC_SHARED {args.shared!r} is not an NFS export host:/path "
              f"(e.g. fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/)", file=sys.stderr)
        return 2
    out = Path(args.out)
    for name in FILES:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render((REPO / "cluster" / name).read_text(), args.image, args.run_dir, args.shared))
        print(target)
    if args.shared is None:
        print("ray-cluster.yaml: no COTREC_SHARED, so no /shared on its nodes: submit its jobs with "
              "--run-dir s3://bucket/runs/NAME", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
