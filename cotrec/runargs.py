"""The options every `cotrec` command shares (config, --set, run directory, --force) and the run they
name: one place for them, read by `cotrec.cli` and by the benches' parsers (`cotrec.bench.commands`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

from cotrec.cluster import check_run_dir_shared
from cotrec.config import Config, config_name, load_config, preset_names
from cotrec.progress import send_native_errors_to_run_log, use_run_log
from cotrec.rundir import RunDir

def add_run_options(parser: argparse.ArgumentParser, *, run_dir: bool = True, force: bool = True,
                    config_help: Optional[str] = None,
                    set_help: str = "override a config key, e.g. --set data.k_core=10 (repeatable)") -> None:
    """--config, --run-dir, --set and --force: what a command that runs a stage takes. Without
    `config_help` the config's help names the presets; "" is no help."""
    if config_help is None:
        config_help = f"preset ({', '.join(preset_names())}) or YAML file; default: demo"
    parser.add_argument("--config", "-c", metavar="NAME|PATH", help=config_help or None)
    if run_dir:
        parser.add_argument("--run-dir", "-r", metavar="DIR", help="run directory; default: runs/<config name>")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=set_help or None)
    if force:
        parser.add_argument("--force", action="store_true", help="redo stages even when up to date")


def add_config_options(parser: argparse.ArgumentParser, *, run_dir: Optional[str] = None,
                       config_help: str = "preset or YAML file; default: demo", set_help: str = "") -> None:
    """The options of a command that reads a config but runs no stage: --config, --set, and --run-dir
    (with `run_dir` as its help) where it reads a run."""
    add_run_options(parser, run_dir=False, force=False, config_help=config_help, set_help=set_help)
    if run_dir is not None:
        parser.add_argument("--run-dir", "-r", metavar="DIR", help=run_dir)


def run_dir_of(args: argparse.Namespace) -> Union[str, Path]:
    """The run directory a command names: --run-dir, or runs/<config name>."""
    return args.run_dir or Path("runs") / config_name(args.config)


def open_run(args: argparse.Namespace) -> tuple[Config, RunDir]:
    """Resolve the config and the run directory, and record the resolved config there."""
    config = load_config(args.config, args.overrides)
    run = RunDir(run_dir_of(args))
    check_run_dir_shared(run.root)  # a cluster job: refused at its start if a worker node cannot see it
    run.write_config(config)
    use_run_log(run.root)  # what the run's processes print, but cotrec's progress (cotrec.progress)
    send_native_errors_to_run_log()
    return config, run
