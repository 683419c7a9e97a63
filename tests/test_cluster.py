"""cluster/: the launcher YAML, the job runtime env and the KubeRay manifests.

No Ray is started: each file is checked against what Ray itself validates (the launcher's JSON
schema and config preparation, RuntimeEnv, Serve's deploy schema, the job upload's exclude rules)
and against this repository (entry points the CLI accepts, presets and config keys that exist,
files that are there, the dependency list of pyproject.toml).
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cotrec.cli import build_parser
from cotrec.config import ConfigError, load_config, preset_names

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_APP = REPO / "cotrec" / "serve_app.py"
DOCKERFILE = CLUSTER / "Dockerfile"
UPLOAD_LIMIT = 100 * 1024**2  # Ray's job upload limit
PY_TAG = "py311"  # the Python of the official Ray images used everywhere in cluster/


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


TEST_IMAGE = "registry.example.com/team/cotrec:0.1"  # what a user passes as COTREC_IMAGE


def cluster_files():
    """scripts/cluster-files.py, which writes the cluster files with the user's image."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_files", REPO / "scripts" / "cluster-files.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(path: Path) -> str:
    return cluster_files().render(path.read_text(), TEST_IMAGE)


def launcher() -> dict:
    return yaml.safe_load(rendered(CLUSTER / "ray-cluster.yaml"))


def manifest(name: str) -> dict:
    return yaml.safe_load(rendered(KUBERAY / name))


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    (dep,) = [d for d in pyproject()["project"]["dependencies"] if d.startswith("ray[")]
    return dep.split("==")[1]


def readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Running on a Ray cluster\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Running on a Ray cluster' section"
    return match.group(1)


def code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M)


def shell_lines(block: str) -> list[str]:
    """The commands of a shell block, continuation lines joined, comments dropped."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def python_commands(line: str) -> list[list[str]]:
    """Every `python jobs/X.py ...` / `python -m cotrec ...` in a shell line, as argv after `python`."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, start = [], None
    for i, word in enumerate(words + [";"]):
        if word in ("python", "python3") and start is None:
            start = i + 1
        elif start is not None and (word in (";", "&&", "||", "|", "&") or i == len(words)):
            argv = words[start:i]
            if argv and (argv[0].startswith("jobs/") or argv[:2] == ["-m", "cotrec"]):
                commands.append(argv)
            start = None
    return commands


def cli_args(argv: list[str]) -> list[str]:
    """The `cotrec` arguments a `python jobs/X.py ...` or `python -m cotrec ...` command amounts to."""
    if argv[0] == "-m":
        return argv[2:]
    script = REPO / argv[0]
    assert script.is_file(), f"{argv[0]}: no such job driver"
    match = re.search(r"main\(\[((?:\"[^\"]*\",\s*)*)\*sys\.argv\[1:\]\]\)", script.read_text())
    assert match, f"{argv[0]}: does not call cotrec.cli.main([...,*sys.argv[1:]])"
    return re.findall(r"\"([^\"]*)\"", match.group(1)) + argv[1:]


def check_command(argv: list[str]):
    """The CLI accepts the command; its config is a preset (or a file) and its --set keys validate."""
    args = cli_args(argv)
    try:
        ns = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"the CLI rejects: python {' '.join(argv)}")
    config = getattr(ns, "config", None)
    if config is not None:
        assert config in preset_names() or (REPO / config).is_file(), f"--config {config}: not a preset or file"
        try:
            load_config(config, getattr(ns, "overrides", []))
        except ConfigError as exc:
            pytest.fail(f"python {' '.join(argv)}: {exc}")
    return ns


def all_cluster_yaml() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


# ---------------------------------------------------------------------------------------------
# every file


def test_the_cluster_files_exist_and_every_yaml_parses():
    names = {p.relative_to(CLUSTER).as_posix() for p in all_cluster_yaml()}
    assert {"ray-cluster.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
            "kuberay/rayservice.yaml"} <= names
    for path in all_cluster_yaml():
        documents = list(yaml.safe_load_all(path.read_text()))
        assert documents and all(isinstance(d, dict) for d in documents), path
    # and the YAML carried inside the manifests as strings
    yaml.safe_load(manifest("rayjob.yaml")["spec"]["runtimeEnvYAML"])
    yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])


# ---------------------------------------------------------------------------------------------
# the cluster launcher


def test_launcher_config_passes_rays_own_schema_and_preparation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # unknown keys, non-integer resources, wrong types
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before launching


def test_launcher_has_a_head_and_autoscaled_cpu_and_gpu_workers():
    config = launcher()
    types = config["available_node_types"]
    assert config["cluster_name"] == "cotrec"
    assert set(types) == {"head", "cpu-worker", "gpu-worker"} and config["head_node_type"] == "head"
    assert types["head"]["resources"].get("GPU", 0) == 0
    for name in ("cpu-worker", "gpu-worker"):
        node = types[name]
        assert 0 <= node["min_workers"] <= node["max_workers"], name
        assert node["resources"]["CPU"] > 0, name
    assert types["cpu-worker"]["resources"].get("GPU", 0) == 0
    assert types["gpu-worker"]["resources"]["GPU"] >= 1
    assert types["cpu-worker"]["max_workers"] + types["gpu-worker"]["max_workers"] <= config["max_workers"]
    assert config["upscaling_speed"] > 0 and config["idle_timeout_minutes"] > 0


def _launcher_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for key in keys for c in config.get(key, [])]
    for node in config["available_node_types"].values():
        commands += node.get("worker_setup_commands", []) + node.get("initialization_commands", [])
    return commands


def test_launcher_nodes_run_the_cotrec_image_and_install_nothing():
    config = launcher()
    assert config["docker"]["image"] == TEST_IMAGE
    assert "head_image" not in config["docker"] and "worker_image" not in config["docker"]
    assert not any("docker" in node for node in config["available_node_types"].values())  # one image everywhere
    assert not any("pip install" in c and "boto3" not in c for c in _launcher_commands(config))
    # the synced checkout lands where the image keeps the code (its WORKDIR and PYTHONPATH)
    assert config["file_mounts"]["~/cotrec"] == "."
    assert "WORKDIR /home/ray/cotrec" in DOCKERFILE.read_text() and "PYTHONPATH=/home/ray/cotrec" in DOCKERFILE.read_text()


def test_launcher_starts_ray_with_token_auth_and_ships_the_token():
    config = launcher()
    starts = [c for c in _launcher_commands(config) if "ray start" in c]
    assert any("--head" in c for c in starts) and any("--address" in c for c in starts)
    assert all("RAY_AUTH_MODE=token" in c for c in starts), starts
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(config["head_start_ray_commands"])
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


SHARED_EXPORT = "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/"


def test_launcher_mounts_the_users_nfs_export_or_leaves_run_directories_to_a_bucket():
    """With COTREC_SHARED, every node mounts it at /shared before docker starts and a failed mount
    fails the node's start; without it, nothing is mounted (and Ray's schema takes both files)."""
    import subprocess

    import jsonschema
    import ray.autoscaler

    module = cluster_files()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    text = (CLUSTER / "ray-cluster.yaml").read_text()
    with_nfs = yaml.safe_load(module.render(text, TEST_IMAGE, shared=SHARED_EXPORT))
    without = yaml.safe_load(module.render(text, TEST_IMAGE))
    for config in (with_nfs, without):
        jsonschema.validate(config, schema)
        assert "-v /shared:/shared" in config["docker"]["run_options"]
    mounts = [c for c in with_nfs["initialization_commands"] if "mount -t nfs4" in c]
    assert len(mounts) == 1 and f" {SHARED_EXPORT} /shared" in mounts[0]
    assert not any("mount" in c for c in without["initialization_commands"])
    # the mount command's logic: a failed mount is a failed command (the node does not start)
    script = mounts[0].replace("sudo ", "").replace("mountpoint -q /shared", "false").replace(
        "mkdir -p /shared", "true")
    failing = subprocess.run(["bash", "-c", script.replace("mount -t nfs4", "false && mount -t nfs4")],
                             capture_output=True)
    assert failing.returncode != 0
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "cluster-files.py"), "--image", TEST_IMAGE,
                          "--shared", "/local/folder", "--out", "/nonexistent/never"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "COTREC_SHARED" in bad.stderr


def test_launcher_nodes_start_ray_with_the_serve_api_keys_in_their_environment(tmp_path):
    """Serve's Ingress replicas read COTREC_API_KEYS (serve/config.yaml's api_keys_env), which must be in
    each node's environment before `ray start`: the keys file the launcher ships, read the way every
    start command reads it, gives the keys the app accepts."""
    import subprocess

    config = launcher()
    variable = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]["args"]["api_keys_env"]
    assert config["file_mounts"]["~/.cotrec/serve-api-keys"] == "~/.cotrec/serve-api-keys"
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2
    keys = ["a" * 64, "b" * 64]
    (tmp_path / ".cotrec").mkdir()
    (tmp_path / ".cotrec" / "serve-api-keys").write_text(f"# serve keys\n{keys[0]}\n{keys[1]}\n")
    for start in starts:
        prefix = start[:start.index("ray start")]
        assert f'{variable}="$(cat ~/.cotrec/serve-api-keys)"' in prefix
        probe = (prefix + f"{sys.executable} -c 'from cotrec.guard import load_api_keys; "
                 f"print(\",\".join(load_api_keys(env=\"{variable}\")))'")
        out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True,
                             env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
        assert out.returncode == 0 and out.stdout.split() == [",".join(keys)], out.stderr


def test_the_cluster_readmes_resource_table_is_the_gpu_cluster_preset():
    """Each row of cluster/README.md's table names keys and the values the preset gives them."""
    config = load_config("gpu-cluster")
    text = (CLUSTER / "README.md").read_text()
    section = text[text.index("## How the config's resources map onto the node types"):]
    rows = re.findall(r"^\| ((?:`[a-z_]+\.[a-z_]+`(?:, )?)+) \| ([^|]+) \|", section, re.M)
    assert len(rows) >= 7
    checked = set()
    for keys, values in rows:
        names = re.findall(r"`([a-z_]+\.[a-z_]+)`", keys)
        given = [v.strip() for v in values.split(",")]
        assert len(names) == len(given), keys
        for name, value in zip(names, given):
            section_name, key = name.split(".")
            actual = getattr(getattr(config, section_name), key)
            assert str(actual).lower() == value.lower() or (isinstance(actual, float) and actual == float(value)), \
                f"cluster/README.md says {name} is {value} in gpu-cluster; the preset has {actual}"
            checked.add(name)
    assert {"extract.gpus_per_actor", "retriever.gpus_per_worker", "ranker.gpus_per_worker",
            "ranker.gradient_checkpointing"} <= checked


def test_launcher_syncs_no_venv_runs_or_git():
    excludes = set(launcher()["rsync_exclude"])
    for name in (".venv", "runs", ".git"):
        assert f"**/{name}" in excludes and f"**/{name}/**" in excludes, name
    assert ".gitignore" in launcher()["rsync_filter"]


def test_the_image_is_the_pinned_ray_with_the_package_its_engine_and_pinned_torch():
    import ray

    text = DOCKERFILE.read_text()
    assert ray.__version__ == ray_pin()  # the laptop's `ray up` must match the cluster's Ray
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    assert args["RAY_IMAGE"] == f"rayproject/ray:{ray_pin()}-{PY_TAG}-gpu" and args["EXTRA"] == "gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    (install,) = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert '"torch==2.13.0"' in install and '".[${EXTRA}]"' in install
    assert "pip uninstall -y torchvision torchaudio torchcodec" in install
    # the CPU build the header documents names the PyTorch CPU index and the cpu extra
    assert "--build-arg EXTRA=cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert set(pyproject()["project"]["optional-dependencies"]) >= {"gpu", "cpu"}
    for source in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for name in source.split():
            assert (REPO / name).exists(), f"cluster/Dockerfile copies {name}, which does not exist"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored) and not {"cotrec", "jobs", "serve"} & set(ignored)


def test_cluster_files_are_written_with_the_users_image_and_nothing_left_to_fill(tmp_path):
    import subprocess

    script = [sys.executable, str(REPO / "scripts" / "cluster-files.py")]
    out = subprocess.run([*script, "--image", TEST_IMAGE, "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert written == sorted(cluster_files().FILES)
    for path in tmp_path.rglob("*.yaml"):
        text = path.read_text()
        assert "${" not in text and "YOUR-ORG" not in text, path
    images = re.findall(r"^\s*image: (\S+)", "\n".join(p.read_text() for p in tmp_path.rglob("*.yaml")), re.M)
    assert images and set(images) == {TEST_IMAGE}
    bad = subprocess.run([*script, "--image", "Not An Image", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "COTREC_IMAGE" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unset = subprocess.run(["make", "-s", "cluster-files", "COTREC_IMAGE="], cwd=REPO, capture_output=True, text=True)
    assert unset.returncode != 0 and "set COTREC_IMAGE" in unset.stderr


# ---------------------------------------------------------------------------------------------
# the job runtime env


def runtime_env() -> dict:
    return load(CLUSTER / "runtime_env.yaml")


def test_runtime_env_is_valid_and_its_working_dir_is_the_repository():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env()
    RuntimeEnv(**env)
    assert (REPO / env["working_dir"]).resolve() == REPO  # `ray job submit` runs from the repository root


def test_runtime_env_uploads_the_code_and_nothing_heavy():
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, runtime_env()["excludes"])
    for path in (".venv", ".venv/lib/python3.11/site-packages/torch/__init__.py", "runs", "runs/demo/config.yaml",
                 ".git", ".git/objects/ab/cdef", "bench/llm.json", "cotrec/__pycache__/cli.cpython-311.pyc",
                 "cotrec.egg-info", ".pytest_cache", "runs/x/data/items.parquet", "model/model.safetensors"):
        assert excluded(REPO / path), f"{path} would be uploaded"
    for path in ("cotrec/cli.py", "cotrec/bench/llm.py", "cotrec/presets/gpu-cluster.yaml", "jobs/run.py",
                 "cotrec/serve_app.py", "serve/config.yaml", "pyproject.toml", "cluster/runtime_env.yaml"):
        assert not excluded(REPO / path), f"{path} would be left out"

    # what this checkout would upload, walked the way Ray walks it (excluded folders pruned)
    total = 0
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not excluded(Path(folder) / d)]
        total += sum((Path(folder) / f).stat().st_size for f in files
                     if not excluded(Path(folder) / f) and (Path(folder) / f).is_file())
    assert 0 < total < UPLOAD_LIMIT / 4, f"{total / 1024**2:.1f} MiB"


def test_runtime_env_variables_are_ones_the_code_reads():
    env_vars = runtime_env()["env_vars"]
    sources = "\n".join(p.read_text() for p in (REPO / "cotrec").rglob("*.py"))
    for name in env_vars:
        if name.startswith("COTREC_"):
            assert f'"{name}"' in sources, f"{name}: cotrec never reads it"
    assert env_vars["COTREC_CACHE"].startswith("/shared/")  # fetched once per cluster
    # the preset's model comes from the hub: an offline switch here would break it
    assert "HF_HUB_OFFLINE" not in env_vars


# ---------------------------------------------------------------------------------------------
# KubeRay


KINDS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


def test_kuberay_manifests_are_ray_io_v1_of_the_right_kind():
    for name, kind in KINDS.items():
        documents = list(yaml.safe_load_all((KUBERAY / name).read_text()))
        assert [(d["apiVersion"], d["kind"]) for d in documents] == [("ray.io/v1", kind)], name
        assert documents[0]["metadata"]["name"]
    pvc = manifest("shared-pvc.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kuberay_manifests_pass_the_crd_schemas_of_a_named_kuberay_release(name):
    """What the API server checks (types, enums, required) and prunes (undeclared fields, silently)."""
    from crd_schema import crd_errors

    assert crd_errors(manifest(name)) == []


def test_the_crd_check_catches_a_misspelt_key_and_a_wrong_type():
    from crd_schema import crd_errors

    job = copy.deepcopy(manifest("rayjob.yaml"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] = "four"
    errors = crd_errors(job)
    assert len(errors) == 2, errors
    assert any("workerGroupSpecs[0].rayStartParam" in e and "drop" in e for e in errors)
    assert any("maxReplicas" in e and "integer" in e for e in errors)


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": manifest("raycluster.yaml")["spec"],
            "RayJob": manifest("rayjob.yaml")["spec"]["rayClusterSpec"],
            "RayService": manifest("rayservice.yaml")["spec"]["rayClusterConfig"]}


def _pods(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]


def _gpus(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_clusters_autoscale_cpu_and_gpu_groups_with_token_auth(owner):
    spec = cluster_specs()[owner]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == ray_pin()
    head = spec["headGroupSpec"]["template"]["spec"]
    assert _gpus(head) == 0
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1
    assert _gpus(groups["gpu"]["template"]["spec"]) >= 1 and _gpus(groups["cpu"]["template"]["spec"]) == 0
    claim = manifest("shared-pvc.yaml")["metadata"]["name"]
    for name, pod in _pods(spec):
        for container in pod["containers"]:
            assert container["image"] == TEST_IMAGE, (name, container["image"])  # the cotrec image
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/shared" in mounts, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = volumes[[m["name"] for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/shared"][0]]
        assert shared["persistentVolumeClaim"]["claimName"] == claim, name


def _check_kuberay_runtime_env(env: dict) -> None:
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)
    # the image has the code and the dependencies: nothing to fetch or install per job
    assert "working_dir" not in env and "pip" not in env and "conda" not in env
    assert env["env_vars"]["COTREC_CACHE"] == runtime_env()["env_vars"]["COTREC_CACHE"]


def test_rayjob_runs_the_pipeline_on_the_shared_volume():
    spec = manifest("rayjob.yaml")["spec"]
    commands = python_commands(spec["entrypoint"])
    assert len(commands) == 1 and commands[0][:2] == ["-m", "cotrec"]
    ns = check_command(commands[0])
    assert ns.command == "run" and ns.config == "gpu-cluster"
    assert ns.run_dir == "/shared/runs/gpu-cluster"
    config = load_config(ns.config, ns.overrides)
    assert config.extract.gpus_per_actor == config.llm.tensor_parallel_size  # one engine's GPUs per actor
    gpu_group = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    # the driver holds no engine (ranker scoring runs on actors): it asks for no GPU
    assert "entrypointNumGpus" not in spec and "entrypointResources" not in spec
    assert config.extract.max_actors * config.extract.gpus_per_actor <= gpu_group["maxReplicas"]
    assert config.ranker.num_workers * config.ranker.gpus_per_worker <= gpu_group["maxReplicas"]
    assert config.retriever.num_workers * config.retriever.gpus_per_worker <= gpu_group["maxReplicas"]
    # the preset places the engines and the trainings; the job only caps the actors at the group's size
    assert [o.split("=")[0] for o in ns.overrides] == ["extract.max_actors"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_kuberay_runtime_env(yaml.safe_load(spec["runtimeEnvYAML"]))


def serve_config() -> dict:
    return yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])


def test_rayservice_serves_the_app_builder_with_autoscaled_deployments():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)  # what the Serve controller accepts (remote working_dir included)
    (app,) = config["applications"]
    assert app["import_path"] == "cotrec.serve_app:app_builder"
    assert app["args"]["run_dir"] == check_command(python_commands(manifest("rayjob.yaml")["spec"]["entrypoint"])[0]).run_dir
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ranker", "Ingress"}  # retrieval runs in the Ingress
    for name, deployment in deployments.items():
        scaling = deployment["autoscaling_config"]
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
    assert deployments["Ranker"]["ray_actor_options"]["num_gpus"] >= 1
    gpu_group = {g["groupName"]: g for g in manifest("rayservice.yaml")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}["gpu"]
    assert deployments["Ranker"]["autoscaling_config"]["max_replicas"] <= gpu_group["maxReplicas"]
    _check_kuberay_runtime_env(app["runtime_env"])


LOAD_KEYS = ("max_ongoing_requests", "max_queued_requests", "health_check_period_s", "health_check_timeout_s")


@pytest.mark.parametrize("where", ["serve/config.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_load_settings_agree_with_the_app_and_let_batches_fill(where):
    """Every deployment's load settings in the Serve configs are the app's own, and coherent: a replica
    takes at least a full @serve.batch and at least the ongoing requests its autoscaler aims at."""
    from cotrec.serve_app import BATCHING, DEPLOYMENTS

    config = serve_config() if where.endswith("rayservice.yaml") else yaml.safe_load((REPO / where).read_text())
    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    assert set(deployments) == set(DEPLOYMENTS)
    for name, settings in DEPLOYMENTS.items():
        found = deployments[name]
        for key in LOAD_KEYS:
            assert found.get(key) == settings.get(key), f"{where}: {name}.{key}"
        target = found["autoscaling_config"]["target_ongoing_requests"]
        assert target == settings["autoscaling_config"]["target_ongoing_requests"], f"{where}: {name} target"
        assert target <= found["max_ongoing_requests"] <= found["max_queued_requests"], name
        assert BATCHING.get(name, {}).get("max_batch_size", 1) <= found["max_ongoing_requests"], name
    # the Ingress holds every request in flight while it waits on the others
    assert deployments["Ingress"]["max_ongoing_requests"] >= max(d["max_ongoing_requests"] for d in deployments.values())



@pytest.mark.parametrize("where", ["serve/config.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_configs_take_api_keys_from_a_secret_and_keep_private_routes_closed(where):
    """The access args are ones app_builder accepts: keys from a variable (never written in the
    config), no open app, the preference route and the evaluation horizons closed; on KubeRay the
    variable comes from a Secret on every pod that can host an Ingress replica."""
    from cotrec.serve_app import access_args

    config = serve_config() if where.endswith("rayservice.yaml") else yaml.safe_load((REPO / where).read_text())
    access = access_args(config["applications"][0]["args"])
    assert access["api_keys_env"] and not access.get("allow_unauthenticated"), where
    assert access["expose_preferences"] is False and access["open_horizons"] == [], where
    if not where.endswith("rayservice.yaml"):
        return
    spec = manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    hosts = [(name, pod) for name, pod in _pods(spec)
             if name != "head" or spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0"]
    assert {name for name, _ in hosts} == {"cpu", "gpu"}
    secrets = set()
    for name, pod in hosts:
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert access["api_keys_env"] in env, f"{name}: no ${access['api_keys_env']} for an Ingress replica"
            found = env[access["api_keys_env"]]
            assert "value" not in found and found["valueFrom"]["secretKeyRef"]["key"], name
            secrets.add(found["valueFrom"]["secretKeyRef"]["name"])
    (secret,) = secrets
    assert f"kubectl create secret generic {secret} " in (KUBERAY / "rayservice.yaml").read_text()

def test_rayservice_names_what_serve_app_defines():
    source = SERVE_APP.read_text()
    module, attribute = serve_config()["applications"][0]["import_path"].split(":")
    assert REPO / (module.replace(".", "/") + ".py") == SERVE_APP
    assert re.search(rf"^def {attribute}\(args", source, re.M)
    for deployment in serve_config()["applications"][0]["deployments"]:
        assert re.search(rf"@serve\.deployment\(name=\"{deployment['name']}\"", source), deployment["name"]
    for arg in serve_config()["applications"][0]["args"]:
        assert f'"{arg}"' in source, f"app_builder never reads args[{arg!r}]"


# ---------------------------------------------------------------------------------------------
# commands, presets, config keys and files named in the docs and manifests


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for where, text in (("cluster/README.md", (CLUSTER / "README.md").read_text()),
                        ("README.md#running-on-a-ray-cluster", readme_cluster_section())):
        for block in code_blocks(text):
            for line in shell_lines(block):
                found += [(where, argv) for argv in python_commands(line)]
    found += [("cluster/kuberay/rayjob.yaml", argv) for argv in python_commands(manifest("rayjob.yaml")["spec"]["entrypoint"])]
    return found


def test_every_documented_entrypoint_is_accepted_with_a_preset_and_valid_overrides():
    commands = documented_commands()
    where = {w for w, _ in commands}
    assert where == {"cluster/README.md", "README.md#running-on-a-ray-cluster", "cluster/kuberay/rayjob.yaml"}
    drivers = {argv[0] for _, argv in commands}
    assert {"jobs/run.py", "jobs/prepare.py", "jobs/extract.py", "jobs/retriever.py", "jobs/ranker.py"} <= drivers
    for source, argv in commands:
        ns = check_command(argv)
        assert ns.config in preset_names(), f"{source}: --config {ns.config}"
        assert ns.run_dir and ns.run_dir.startswith(("/shared/runs/", "s3://")), \
            f"{source}: run dirs go on the shared volume or a bucket"


def test_documented_job_submissions_use_the_runtime_env():
    text = (CLUSTER / "README.md").read_text() + readme_cluster_section()
    submits = [line for block in code_blocks(text) for line in shell_lines(block) if "ray job submit" in line]
    assert submits
    for line in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in line and "--address http" in line, line


def test_config_keys_named_in_the_cluster_readme_exist():
    config = load_config("gpu-cluster")
    text = (CLUSTER / "README.md").read_text()
    keys = set(re.findall(r"(?<![\w./{])(extract|retriever|ranker|llm|embed|data)\.([a-z_]+)\b", text))
    assert ("extract", "gpus_per_actor") in keys and ("llm", "tensor_parallel_size") in keys
    for section, key in keys:
        assert hasattr(getattr(config, section), key), f"{section}.{key}"


def test_repository_paths_named_in_the_cluster_files_exist():
    texts = {p.relative_to(REPO).as_posix(): p.read_text() for p in all_cluster_yaml()}
    texts["cluster/README.md"] = (CLUSTER / "README.md").read_text()
    texts["README.md"] = readme_cluster_section()
    pattern = re.compile(r"(?<![\w/~.-])((?:cluster|jobs|serve|cotrec)/[\w.-]+(?:/[\w.-]+)*\.(?:py|ya?ml|md))\b")
    named = 0
    for where, text in texts.items():
        for path in pattern.findall(text):
            assert (REPO / path).is_file(), f"{where} names {path}, which does not exist"
            named += 1
    assert named >= 10


def gpu_check_dry_run(**env: str) -> subprocess.CompletedProcess:
    """`make gpu-check DRY_RUN=1`, validating with this interpreter (the dry run's stand-in for .venv)."""
    return subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"PY={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_every_gpu_check_step_loads_a_config_that_validates_and_places_every_engine_on_a_gpu():
    """`make gpu-check DRY_RUN=1` runs anywhere: each `cotrec` step it prints is one the CLI accepts
    and its whole config (preset, or demo when it names none, with its --set overrides) passes the
    loader and validator the command itself calls; the steps that start engines put them on the GPU."""
    result = gpu_check_dry_run()
    assert result.returncode == 0, result.stderr
    assert "every step's config validates" in result.stdout
    steps = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    cotrec = [s[s.index(next(a for a in s if a.endswith("/cotrec"))) + 1:] for s in steps
              if any(a.endswith("/cotrec") for a in s)]
    assert [c[:2] for c in cotrec] == [["bench", "llm"], ["bench", "models"], ["run", "--config"], ["bench", "ranker"]]
    configs = []
    for args in cotrec:
        ns = build_parser().parse_args(args)
        try:
            configs.append(load_config(ns.config, ns.overrides))  # what each command's handler calls first
        except ConfigError as exc:
            pytest.fail(f"cotrec {' '.join(args[:2])}: {exc}")
    llm, models, demo, ranker = configs
    assert models.retriever.gpus_per_worker > 0 and models.embed.device == "cuda"
    for config in (llm, demo, ranker):
        assert config.llm.device == "cuda" and config.extract.gpus_per_actor >= 1 and config.ranker.gpus_per_worker >= 1


def test_the_gpu_check_dry_run_stops_in_one_line_at_a_step_whose_config_does_not_validate(tmp_path):
    """The script's own check, not only this test's: a copy whose LLM bench asks for CUDA without a GPU
    for the engines it places is refused before any step, naming the step and the key."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    script = (REPO / "scripts" / "gpu-check.sh").read_text()
    broken = script.replace('LLM=(bench llm "${CUDA[@]}"', "LLM=(bench llm --set llm.device=cuda")
    assert broken != script
    (copy / "scripts" / "gpu-check.sh").write_text(broken)
    (copy / "scripts" / "gpu-check.sh").chmod(0o755)
    result = subprocess.run(["bash", str(copy / "scripts" / "gpu-check.sh"), "--dry-run"], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CHECK_PYTHON": sys.executable})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bench llm" in result.stderr and "extract.gpus_per_actor" in result.stderr
    assert "/cotrec bench llm" not in result.stdout  # refused before the plan's first cotrec step


def test_the_kuberay_run_directory_is_the_shared_volume_or_a_bucket_the_user_names(tmp_path):
    import subprocess

    script = [sys.executable, str(REPO / "scripts" / "cluster-files.py"), "--image", TEST_IMAGE]
    out = subprocess.run([*script, "--run-dir", "s3://team-bucket/runs/gpu-cluster", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job = yaml.safe_load((tmp_path / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert check_command(python_commands(job["entrypoint"])[0]).run_dir == "s3://team-bucket/runs/gpu-cluster"
    service = yaml.safe_load(yaml.safe_load((tmp_path / "kuberay" / "rayservice.yaml").read_text())["spec"]["serveConfigV2"])
    assert service["applications"][0]["args"]["run_dir"] == "s3://team-bucket/runs/gpu-cluster"
    bad = subprocess.run([*script, "--run-dir", "runs/relative", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "COTREC_RUN_DIR" in bad.stderr


def test_a_local_session_quiets_the_placement_group_cleaner_in_every_worker_and_keeps_the_callers_runtime_env(
        monkeypatch):
    """Without a dashboard there is no State API, which Ray Train's placement-group cleaner asks
    every second: a local session's workers start with its warnings off, and a caller's own
    runtime_env (Serve's PYTHONPATH) still reaches them."""
    import logging

    import ray

    from cotrec.cluster import PLACEMENT_GROUP_CLEANER_LOGGER, ensure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ensure_ray(num_cpus=1, runtime_env={"env_vars": {"COTREC_PROBE": "kept"}})
    try:
        @ray.remote(num_cpus=0)
        def worker_view():
            return logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).getEffectiveLevel(), os.environ.get("COTREC_PROBE")

        assert ray.get(worker_view.remote()) == (logging.ERROR, "kept")
    finally:
        ray.shutdown()


@pytest.fixture(scope="class")
def two_cpu_ray():
    import ray

    previous = os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    if previous is not None:
        os.environ["RAY_ADDRESS"] = previous


class TestTrainingFailures:
    """One Ray session for the three (a fit's start-up is most of each one's time)."""

    @pytest.mark.parametrize("fail", ["user-on-rank-1-of-2", "bug", "dies-once"])
    def test_an_error_no_restart_can_fix_is_raised_once_and_a_dead_worker_is_restarted(self, tmp_path, two_cpu_ray,
                                                                                          fail):
        """Ray Train would retry any error max_failures times; a deterministic one ends the fit at once
        (a user's error as one line, a bug with its type), also when one rank of two raises it while
        the other waits in a collective; a worker that dies still restarts the group from its checkpoint."""
        from cotrec.cluster import fit_torch_trainer
        from cotrec.errors import CotrecError

        counter = tmp_path / "starts"
        workers = 2 if fail == "user-on-rank-1-of-2" else 1

        def counting_loop(config: dict) -> dict:
            """Counts its starts in a file, then fails as `config["fail"]` says (defined here, so Ray pickles
            it by value: the workers cannot import a test module)."""
            import tempfile
            import time

            import ray.train
            import torch

            from cotrec.errors import DataError

            with Path(config["counter"]).open("a") as file:
                file.write("x")
            rank, resumed = ray.train.get_context().get_world_rank(), ray.train.get_checkpoint() is not None
            if config["fail"] == "user-on-rank-1-of-2" and rank == 1:
                raise DataError("lists.parquet: no lists")
            if config["fail"] == "bug":
                raise KeyError("shape")
            if config["fail"] == "user-on-rank-1-of-2":
                torch.distributed.all_reduce(torch.ones(1))  # waits for rank 1, which never comes
            with tempfile.TemporaryDirectory() as folder:
                ray.train.report({"resumed": resumed}, checkpoint=ray.train.Checkpoint.from_directory(folder))
            if config["fail"] == "dies-once" and not resumed:
                time.sleep(2)
                os._exit(1)  # the worker process dies: what a restart is for
            return {"resumed": resumed}

        def fit():
            return fit_torch_trainer(counting_loop, {"counter": str(counter), "fail": fail}, name="probe",
                                     storage=str(tmp_path / "storage"), num_workers=workers, cpus_per_worker=1,
                                     gpus_per_worker=0, max_failures=3)

        if fail.startswith("user"):
            with pytest.raises(CotrecError, match="^lists.parquet: no lists$"):
                fit()
        elif fail == "bug":
            with pytest.raises(RuntimeError, match="raised KeyError, which a restart would raise again"):
                fit()
        else:
            assert fit().return_value == {"resumed": True}
        assert len(counter.read_text()) == (1 if fail == "bug" else 2)  # one start per worker, or a restart


def test_a_runs_workers_print_to_its_log_and_cotrecs_own_lines_to_the_terminal(tmp_path, monkeypatch, capfd):
    """Engine start-up chatter (a library's warning, native code writing to its descriptor) goes to
    the run's log file; a training loop's progress line still reaches the driver's terminal."""
    import time

    import ray

    from cotrec import progress
    from cotrec.cluster import ensure_ray

    import logging

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(progress, "_run_log", None)
    for name in ("ray", "ray.data"):  # restored after the test: later tests print Ray's messages as usual
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
        monkeypatch.setattr(logger, "level", logger.level)
    log_file = progress.use_run_log(tmp_path / "run")
    assert log_file == tmp_path / "run" / "logs" / "run.log"
    assert ensure_ray(num_cpus=1)
    try:
        @ray.remote(num_cpus=0)
        def engine_like():
            import logging
            import os

            from cotrec.progress import worker_log

            logging.getLogger("vllm.platforms").warning("Triton is not installed (probe)")
            os.write(2, b"native code on fd 2 (probe)\n")
            print("a stray print (probe)")
            worker_log("[ranker probe] epoch 1 loss 2.2")
            return os.getpid()

        ray.get(engine_like.remote())
        time.sleep(2.0)  # Ray's log monitor forwards worker lines to the driver once a second
    finally:
        ray.shutdown()
    written = log_file.read_text()
    terminal = "".join(capfd.readouterr())
    for line in ("Triton is not installed (probe)", "native code on fd 2 (probe)", "a stray print (probe)"):
        assert line in written and line not in terminal, line
    assert "[ranker probe] epoch 1 loss 2.2" in terminal and "[ranker probe]" not in written
    assert "Started a local Ray instance" not in terminal


def test_rayservice_pods_agree_on_direct_ingress_and_cotrec_serve_turns_it_on():
    """The Serve controller (head) and the replicas (workers) read RAY_SERVE_ENABLE_DIRECT_INGRESS
    when they start: every RayService pod states it, with one value; `cotrec serve` sets it on."""
    from cotrec.serving import SERVE_ENV

    spec = manifest("rayservice.yaml")["spec"]["rayClusterConfig"]
    values = {name: [e.get("value") for c in pod["containers"] for e in c.get("env", [])
                     if e["name"] == "RAY_SERVE_ENABLE_DIRECT_INGRESS"] for name, pod in _pods(spec)}
    assert all(len(found) == 1 for found in values.values()) and len({v[0] for v in values.values()}) == 1, values
    assert SERVE_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" in (REPO / "serve" / "config.yaml").read_text()
