"""Run directories on S3 (a local moto server): publication, shards, models, and the main job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    # killed after the marker was copied, before the partial folder was deleted: the stage is then
    # skipped, and the skip clears what is left
    with run.staged("stage", "five") as folder:
        (folder / "g.txt").write_text("g")
    (run.root / ".stage.partial-99999" / "g.txt").write_text("g")
    assert run.is_complete("stage", "five") and keys(run.root) == ["stage/.complete.json", "stage/g.txt"]


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


def test_a_fine_tuned_ranker_is_served_from_an_s3_run_directory(bucket, tmp_path):
    """A run on the bucket whose fine-tune merged its adapter there (`merge_and_measure` uploads it):
    the served ranker finds the checkpoint through the store, downloads it, and scores a list as the
    same checkpoint scores it from a local folder; a prompt never fine-tuned is one line naming the URI."""
    import asyncio

    import numpy as np

    from cotrec.config import load_config
    from cotrec.data.prepare import prepare
    from cotrec.errors import DataError
    from cotrec.llm import letters, make_engine
    from cotrec.ranker.finetune import merge_adapter, merge_and_measure
    from cotrec.ranker.stage import merged_model
    from cotrec.recommend import RankerService
    from cotrec.storage import is_remote
    from tiny_model import make_tiny_base, tiny_adapter

    base = make_tiny_base(tmp_path / "base")
    adapter = tiny_adapter(base, tmp_path / "adapter")
    uri = f"{bucket}/served"
    config = load_config("demo", [*S3_RUN[3:15:2], "llm.backend=transformers", f"llm.model={base}",
                                  "llm.dtype=float32", "ranker.merged_dtype=float32",
                                  "ranker.retrievers={CRM: none/random}"])
    run = RunDir(uri)
    run.write_config(config)
    prepare(config, run)
    variant = "none/random"
    merged = merged_model(config, run, variant, "llm")
    assert is_remote(merged)
    conversation = [[{"role": "user", "content": "Rank: A or B?"}]]
    merge_and_measure(base, Path(adapter), merged, conversation, letters(10), config.ranker)  # no Ray: here
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()

    served = RankerService(uri, variant, "llm")
    assert served.model == str(merged)
    lst = served.candidate_list(0, "next", np.arange(3), list(range(3, 13)))
    got = asyncio.run(served.rerank([lst]))[0]
    served.close()
    merge_adapter(base, Path(adapter), tmp_path / "merged", "float32", conversation, letters(10))
    for model, same in ((str(tmp_path / "merged"), True), (base, False)):  # the fine-tuned model's, not the base's
        engine = make_engine(config.llm.model_copy(update={"model": model}))
        want = asyncio.run(RankerService(uri, variant, "llm", engine=engine).rerank([lst]))[0]
        engine.close()
        assert np.allclose(got["probs"], want["probs"], atol=1e-6) == same, (model, got, want)

    with pytest.raises(DataError, match=r"^s3://cotrec-runs/served/ranker/none-random--llm\+\+/model/merged: no "
                                        r"fine-tuned ranker"):
        RankerService(uri, variant, "llm++")


def test_a_cluster_job_refuses_at_its_start_a_run_directory_a_worker_node_does_not_see(bucket, monkeypatch):
    """Two Ray nodes: a head that offers no CPU (as on the launcher and KubeRay) and a worker whose S3
    endpoint is another server, so its writes go where the driver never looks (as a node-local /shared
    would). A job there stops at its start, in one line naming the run directory, before writing to it;
    with a worker that shares the store the check passes and leaves nothing behind."""
    import boto3
    from ray.cluster_utils import Cluster

    from cotrec.cluster import SHARED_CHECK, check_run_dir_shared
    from cotrec.errors import CotrecError
    from s3_server import moto_server

    uri = f"{bucket}/cluster-job"
    for shared in (False, True):
        with moto_server() as elsewhere:
            boto3.client("s3", endpoint_url=elsewhere).create_bucket(Bucket="cotrec-runs")
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            cluster.add_node(num_cpus=1, env_vars={} if shared else {"AWS_ENDPOINT_URL": elsewhere})
            monkeypatch.setenv("RAY_ADDRESS", cluster.address)
            try:
                if shared:
                    check_run_dir_shared(run_path(uri))
                    assert not run_path(uri).exists()  # the markers are gone
                    continue
                with pytest.raises(CotrecError, match=rf"^{uri}: not shared between the nodes"):
                    check_run_dir_shared(run_path(uri))
                job = run_cli("prepare", "--run-dir", uri, *S3_RUN[:16])
                # on a cluster Ray keeps its own log lines (its "Connecting to existing Ray cluster"); cotrec's is one
                ours = [line for line in job.stderr.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d \S+\s+INFO ", line)]
                assert job.returncode == 2 and len(ours) == 1, job.stderr[-2000:]
                assert ours[0].startswith(f"cotrec: error: {uri}: not shared") and "--run-dir s3://" in ours[0]
                assert not (run_path(uri) / "config.yaml").exists() and not (run_path(uri) / "data").exists()
                # what the worker wrote went to the other server
                seen = boto3.client("s3", endpoint_url=elsewhere).list_objects_v2(Bucket="cotrec-runs")
                assert any(SHARED_CHECK in o["Key"] for o in seen.get("Contents", []))
            finally:
                monkeypatch.delenv("RAY_ADDRESS")
                import ray

                ray.shutdown()
                cluster.shutdown()


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


# Three worker nodes, each offering one stage family's custom resource (config `*.resources`), so
# extraction, the retriever and the ranker's scoring each have a node of their own; the head offers
# no CPU (as on the launcher and KubeRay) and holds the drivers.
STAGE_NODES = {"extract": "extract_node", "retriever": "train_node", "ranker": "rank_node"}
CLUSTER_RUN = [*S3_RUN, *(a for section, resource in STAGE_NODES.items()
                          for a in ("--set", f"{section}.resources={{{resource}: 1}}")),
               # a checkpoint every epoch, and epochs enough, that the training is caught between two
               "--set", "retriever.max_epochs=6", "--set", "retriever.checkpoint_every=1",
               "--set", "retriever.patience=6"]


def actors_seen() -> list[dict[str, str]]:
    """Every actor the cluster has held, dead ones included, with the node it ran on, from the GCS
    actor table (Ray's State API needs a dashboard, which these heads do not run); `what` is the
    class, or for a Ray Data pool's worker the function it maps (`MapWorker(MapBatches(ExtractWorker))`)."""
    from ray._private.state import state
    from ray.core.generated.gcs_pb2 import ActorTableData

    table = state._connect_and_get_accessor().get_actor_table(None, None)
    seen = []
    for raw in table:
        actor = ActorTableData.FromString(raw)
        seen.append({"what": actor.repr_name or actor.class_name, "node": actor.address.node_id.hex(),
                     "state": ActorTableData.ActorState.Name(actor.state), "job": actor.job_id.hex()})
    return seen


def nodes_of(seen: list[dict[str, str]], what: str) -> set[str]:
    return {actor["node"] for actor in seen if what in actor["what"]}


@pytest.mark.slow
def test_the_main_job_on_a_multi_node_cluster_places_its_stages_survives_a_lost_node_resumes_after_a_kill_and_reruns_as_skips(
        bucket, monkeypatch, tmp_path):
    """The main job on a 4-node Ray cluster with its run directory on S3: each stage family on the
    node its custom resource names; the retriever's node removed while it trains (after a
    checkpoint) and a replacement added, and the training resumes there from the checkpoint; the
    driver killed once the retriever is done; a rerun resumes (the finished stages skipped) and
    completes; a third run skips everything."""
    import ray
    from ray.cluster_utils import Cluster

    uri = f"{bucket}/multi-node"
    root = run_path(uri)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {resource: cluster.add_node(num_cpus=1, resources={resource: 4}) for resource in STAGE_NODES.values()}
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    ray.init(address=cluster.address)  # the test's own driver: it reads the actor table
    log = tmp_path / "first-run.log"
    try:
        with open(log, "w") as err:
            job = subprocess.Popen([sys.executable, "-m", "cotrec", "run", "--run-dir", uri, *CLUSTER_RUN], cwd=REPO,
                                   stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 400
            # a checkpoint counts once Ray Train's controller registered it (its snapshot names it), not
            # when its folder is uploaded: a worker lost in between restarts from epoch 0
            while not [k for k in keys(root) if re.search(r"^retriever/\.[^/]*partial[^/]*/\.ray/train/"
                                                          r"checkpoint_manager_snapshot\.json$", k)]:
                assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            training = [a for a in actors_seen() if a["what"] == "RayTrainWorker" and a["state"] == "ALIVE"]
            assert [a["node"] for a in training] == [nodes["train_node"].node_id], training
            cluster.remove_node(nodes["train_node"])  # its Train worker dies with it
            replacement = cluster.add_node(num_cpus=1, resources={"train_node": 4})
            while RunDir(uri).completion("retriever/preference-description") is None:
                assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:  # killed, with what it started, once the retriever is done
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        assert RunDir(uri).completion("ranker/preference-description--llm++-zero-shot/eval") is None
        history = json.loads((root / "retriever" / "preference-description" / "history.json").read_text())
        # the restarted worker carried on from the checkpoint, not from epoch 0
        assert [e["epoch"] for e in history] == list(range(6)) and any(e.get("resumed") for e in history[1:]), history

        resumed = run_cli("run", "--run-dir", uri, *CLUSTER_RUN)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        skipped = [line.split()[0] for line in resumed.stdout.splitlines() if "up to date, skipped" in line
                   and line.startswith("  ")]
        assert {"prepare", "items", "preferences", "embed", "retriever"} <= set(skipped), resumed.stdout
        names = [k for k in keys(root) if not k.startswith("extract/")]
        assert "reports/table2.md" in names and "ranker/preference-description--llm++-zero-shot/eval/rankings.parquet" in names
        # the killed stages' partial folders (and Ray Train's storage in them) went when they restarted
        assert not [k for k in names if ".partial-" in k or "/.ray/" in k], names
        assert len(read_shards(root / "extract" / "perceptions")) > 0

        again = run_cli("run", "--run-dir", uri, *CLUSTER_RUN)
        assert again.returncode == 0, again.stderr[-3000:]
        table = again.stdout.split("Stages, this run")[1].splitlines()[1:]
        ran = [line.split()[0] for line in table if line.startswith("  ") and "skipped" not in line
               and "not needed" not in line and not line.split()[0] in ("report", "total")]
        assert ran == [], table
        assert files_under(root / "reports")

        # where each stage ran, over the three runs
        seen = actors_seen()
        assert nodes_of(seen, "ExtractWorker") == {nodes["extract_node"].node_id}, seen
        assert nodes_of(seen, "RayTrainWorker") == {nodes["train_node"].node_id, replacement.node_id}, seen
        assert nodes_of(seen, "RetrieverScoringWorker") <= {nodes["train_node"].node_id, replacement.node_id}, seen
        assert nodes_of(seen, "ChoiceScoringWorker") == {nodes["rank_node"].node_id}, seen
        assert nodes_of(seen, "RetrieverScoringWorker"), seen
    finally:
        ray.shutdown()
        cluster.shutdown()
