"""Run directories on S3 (a local moto server): publication, shards, models, and the main job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, run_cli
from cotrec.extract.programs import PROGRAMS
from cotrec.extract.shards import pending_rows, prepare_folder, read_shards, shard_files, write_shard
from cotrec.rundir import COMPLETE_MARKER, RunDir
from cotrec.storage import files_under, run_path
from s3_server import s3_server


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as uri:
        yield uri


def keys(path) -> list[str]:
    prefix = path.path.rstrip("/") + "/"
    return [k[len(prefix):] for k in sorted(path.fs.find(path.path))]


def test_a_stage_on_s3_is_published_with_its_marker_last_and_a_failed_one_leaves_nothing_complete(bucket, monkeypatch):
    run = RunDir(f"{bucket}/publish")
    with run.staged("stage", "one") as folder:
        (folder / "a.txt").write_text("a")
        (folder / "sub" / "b.txt").write_text("b")
    assert run.is_complete("stage", "one")
    assert keys(run.root) == ["stage/.complete.json", "stage/a.txt", "stage/sub/b.txt"]

    with run.staged("stage", "two") as folder:  # a rerun replaces the old outputs, not adds to them
        (folder / "c.txt").write_text("c")
    assert run.is_complete("stage", "two") and keys(run.root) == ["stage/.complete.json", "stage/c.txt"]

    with pytest.raises(RuntimeError), run.staged("stage", "three") as folder:
        (folder / "d.txt").write_text("d")
        raise RuntimeError("the stage failed")
    assert run.completion("stage")["fingerprint"] == "two"  # untouched, and no partial folder left
    assert keys(run.root) == ["stage/.complete.json", "stage/c.txt"]

    fs = run.root.fs
    copied = []
    real_copy = fs.copy

    def dies_after_one_file(source, target, **kw):  # the publisher killed between two uploads
        if copied:
            raise KeyboardInterrupt
        copied.append(target)
        return real_copy(source, target, **kw)

    monkeypatch.setattr(fs, "copy", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt), run.staged("stage", "four") as folder:
        (folder / "e.txt").write_text("e")
        (folder / "f.txt").write_text("f")
    monkeypatch.undo()
    assert copied and not copied[0].endswith(COMPLETE_MARKER)
    assert run.completion("stage") is None  # half a folder never looks finished
    assert not run.is_complete("stage", "two")


def test_shards_written_by_another_process_are_seen_and_resume_skips_their_rows(bucket):
    folder = run_path(f"{bucket}/shards/items")
    program = PROGRAMS["items"]
    prepare_folder(folder, "settings-a", force=False)
    assert shard_files(folder) == []  # listed once while empty: a cached listing would hide the next shard
    writer = ("from cotrec.extract.programs import PROGRAMS; from cotrec.extract.shards import write_shard; "
              f"write_shard({str(folder)!r}, [{{'item_idx': i, 'description': 'd', 'source_digest': 's', "
              "'status': 'ok', 'created_at': 1.0} for i in (0, 1)], PROGRAMS['items'].schema, tag='other')")
    subprocess.run([sys.executable, "-c", writer], check=True, cwd=REPO)
    write_shard(folder, [{"item_idx": 2, "description": "d", "source_digest": "s", "status": "failed",
                          "created_at": 2.0}], program.schema, tag="here")
    assert [f.name.split("-")[-1] for f in shard_files(folder)] == ["other.parquet", "here.parquet"]
    assert sorted(read_shards(folder)["item_idx"]) == [0, 1, 2]
    rows = pd.DataFrame({"item_idx": [0, 1, 2, 3], "source_digest": "s"})
    assert pending_rows(rows, folder, program)["item_idx"].tolist() == [2, 3]  # failed and new rows only

    prepare_folder(folder, "settings-a", force=False)  # same settings: kept
    assert len(shard_files(folder)) == 2
    prepare_folder(folder, "settings-b", force=False)  # other settings: afresh
    assert shard_files(folder) == [] and (folder / "manifest.json").exists()


def test_a_model_folder_on_s3_is_downloaded_for_the_engines_and_a_non_model_refused(bucket, tmp_path):
    from cotrec.errors import CotrecError
    from cotrec.llm.embedded import resolve_model

    remote = run_path(f"{bucket}/models/merged")
    (remote / "config.json").write_text('{"model_type": "llama"}')
    (remote / "tokenizer" / "vocab.txt").write_text("a b")
    local = resolve_model(str(remote))
    assert os.path.isfile(os.path.join(local, "config.json"))
    assert open(os.path.join(local, "tokenizer", "vocab.txt")).read() == "a b"
    with pytest.raises(CotrecError, match="no config.json"):
        resolve_model(f"{bucket}/models/nothing-here")


# The main job on a small synthetic run: the zero-latency engine and the zero-cost encoder (this test
# is about where files go, not what the models say); the retriever on Ray Train, whose checkpoints
# go to the bucket too; the ranker's zero-shot row scored on the actor pool.
S3_RUN = ["--config", "demo", "--set", "data.source=synthetic", "--set", "data.synthetic.users=40",
          "--set", "data.synthetic.items=60", "--set", "data.synthetic.max_history=30",
          "--set", "data.sample_users=null", "--set", "data.sample_k_core=null",
          "--set", "llm.backend=zero-latency", "--set", "embed.model=zero-cost",
          "--set", "retriever.grid=[preference/description]", "--set", "retriever.grid_seeds=1",
          "--set", "retriever.max_epochs=3", "--set", "retriever.trainer=ray", "--set", "retriever.num_workers=1",
          "--set", "retriever.dim=16", "--set", "ranker.retrievers={CRM++: preference/description}",
          "--set", "ranker.grid=[none, position, llm++/zero-shot]", "--set", "extract.cpus_per_actor=1"]


@pytest.mark.slow
def test_the_main_job_on_an_s3_run_directory_completes_resumes_after_a_kill_and_reruns_as_skips(bucket):
    uri = f"{bucket}/main-job"
    root = run_path(uri)
    job = subprocess.Popen([sys.executable, "-m", "cotrec", "run", "--run-dir", uri, *S3_RUN], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # killed, with its Ray, while the retriever trains
        deadline = time.time() + 300
        while not (root / "embed" / "preference" / COMPLETE_MARKER).exists():
            assert job.poll() is None and time.time() < deadline, "the job should still be running"
            time.sleep(0.5)
        time.sleep(3)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert RunDir(uri).completion("retriever/preference-description") is None

    resumed = run_cli("run", "--run-dir", uri, *S3_RUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line.split()[0] for line in resumed.stdout.splitlines() if "up to date, skipped" in line
               and line.startswith("  ")]
    assert {"prepare", "items", "preferences", "embed"} <= set(skipped) and "retriever" not in skipped
    names = [k for k in keys(root) if not k.startswith("extract/")]
    assert "reports/table2.md" in names and "ranker/preference-description--llm++-zero-shot/eval/rankings.parquet" in names
    # the killed retriever's partial folder (and Ray Train's storage in it) went when the stage restarted
    assert not [k for k in names if ".partial-" in k or "/.ray/" in k], names
    assert len(read_shards(root / "extract" / "perceptions")) > 0

    again = run_cli("run", "--run-dir", uri, *S3_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    table = again.stdout.split("Stages, this run")[1].splitlines()[1:]
    ran = [line.split()[0] for line in table if line.startswith("  ") and "skipped" not in line
           and "not needed" not in line and not line.split()[0] in ("report", "total")]
    assert ran == [], table
    assert files_under(root / "reports")
