"""The job drivers under `ray job submit`, on a private Ray head node (see tests/ray_head.py)."""

from __future__ import annotations

import os
import re
import sys

import pandas as pd
import pytest

from ray_head import REPO, ray_head


def job_env() -> dict[str, str]:
    """What the job needs to find the shared data cache (`cotrec.cache`: COTREC_CACHE, XDG, ~)."""
    return {name: os.environ[name] for name in ("COTREC_CACHE", "XDG_CACHE_HOME", "HOME") if name in os.environ}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_prepare_and_users_jobs_run_on_a_ray_head(tmp_path):
    run = tmp_path / "run"
    # The users job on the real embedded model (transformers backend: quick to load), 2 users.
    users_job = (f"{sys.executable} jobs/extract.py users --config demo --run-dir {run} --limit 2 "
                 "--set llm.backend=transformers --set extract.max_windows=1 --set extract.interest_tokens=16 "
                 "--set extract.preference_tokens=16")
    with ray_head(tmp_path) as head:
        job_id = head.submit(f"{sys.executable} jobs/prepare.py --config demo --run-dir {run}",
                             working_dir=REPO, env=job_env())
        status, logs = head.wait(job_id, timeout=300)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-4000:]}"
        assert (run / "data" / "interactions.parquet").is_file()
        assert (run / "data" / ".complete.json").is_file()
        assert f"wrote {run / 'data'}" in logs

        job_id = head.submit(users_job, working_dir=REPO, env=job_env())
        status, logs = head.wait(job_id, timeout=400)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-4000:]}"
        # The main job's driver on the same run, its grids cut to the rows no LLM stage feeds (the
        # LLM stages have their own tests; `make demo` runs them all): prepare is up to date.
        job_id = head.submit(f"{sys.executable} jobs/run.py --config demo --run-dir {run} "
                             "--set retriever.grid=[none/random] --set retriever.grid_seeds=1 "
                             "--set 'ranker.retrievers={CRM: none/random}' --set ranker.grid=[none]",
                             working_dir=REPO, env=job_env())
        status, pipeline_logs = head.wait(job_id, timeout=400)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{pipeline_logs[-4000:]}"
    assert "== summary ==" in pipeline_logs and "not needed" in pipeline_logs
    assert re.search(r"prepare +\d+\.\d s  up to date, skipped", pipeline_logs), pipeline_logs[-3000:]
    for report in ("table1.md", "table2.md", "summary.md", "stages.json"):
        assert (run / "reports" / report).is_file(), report
    assert "| CRM (none/random) | None |" in (run / "reports" / "table2.md").read_text()
    assert "rows          2 run, 0 already done" in logs
    shards = list((run / "extract" / "preferences").glob("part-*.parquet"))
    table = pd.concat([pd.read_parquet(f) for f in shards])
    assert len(table) == 6 and (table["status"] == "ok").all()

