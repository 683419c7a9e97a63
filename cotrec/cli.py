"""`cotrec <stage> [--config NAME|PATH] [--run-dir DIR] [--set key=value ...]`

Every stage command loads and validates the config, records it in the run directory and calls
the same stage function the job drivers and the tests call. Errors the user can cause end in
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from cotrec import __version__
from cotrec.config import Config, config_name, load_config, preset_names
from cotrec.data.prepare import format_summary, prepare
from cotrec.errors import CotrecError
from cotrec.rundir import RunDir

# The main job, in order: (name, stage function, summary formatter).
PIPELINE: list[tuple[str, Callable[..., dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
    ("prepare", prepare, format_summary),
]


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="NAME|PATH",
                        help=f"preset ({', '.join(preset_names())}) or YAML file; default: demo")
    parser.add_argument("--run-dir", "-r", metavar="DIR",
                        help="run directory; default: runs/<config name>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.k_core=10 (repeatable)")
    parser.add_argument("--force", action="store_true", help="redo stages even when up to date")


def open_run(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Resolve the config and the run directory, and record the resolved config there."""
    config = load_config(args.config, args.overrides)
    run = RunDir(args.run_dir or Path("runs") / config_name(args.config))
    run.write_config(config)
    return config, run


def cmd_prepare(args: argparse.Namespace) -> int:
    config, run = open_run(args)
    summary = prepare(config, run, force=args.force)
    print(format_summary(summary))
    print(f"wrote {run / 'data'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config, run = open_run(args)
    timings = []
    for name, stage, formatter in PIPELINE:
        started = time.perf_counter()
        summary = stage(config, run, force=args.force)
        timings.append((name, time.perf_counter() - started, summary.get("skipped", False)))
        print(f"== {name} ==")
        print(formatter(summary))
    print("== stages ==")
    for name, seconds, skipped in timings:
        print(f"{name:<12} {seconds:8.1f} s" + ("  (up to date)" if skipped else ""))
    print(f"run directory: {run.root}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cotrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cotrec {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the main job: every stage in order, skipping finished ones")
    _add_run_options(run)
    run.set_defaults(handler=cmd_run)

    prep = commands.add_parser("prepare", help="load, k-core filter and split the dataset")
    _add_run_options(prep)
    prep.set_defaults(handler=cmd_prepare)

    show = commands.add_parser("config", help="print the resolved configuration")
    show.add_argument("--config", "-c", metavar="NAME|PATH")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(handler=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CotrecError as exc:
        print(f"cotrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cotrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
