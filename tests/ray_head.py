"""A private Ray head node for tests: `ray start --head --block` on 127.0.0.1, stopped by its own handle.

    with ray_head(tmp_path) as head:
        job_id = head.submit(f"{sys.executable} jobs/prepare.py --config demo --run-dir {run}")
        status, logs = head.wait(job_id, timeout=300)

Why it looks like this:

* Every port the head opens is picked free here, and the temp dir is its own short folder under
  /tmp (unix socket paths are limited to ~107 bytes), so a neighbour's Ray is never joined or hit.
* Ray 2.60 wants token auth for job submission. The token is a fresh random one, handed to the head
  (and so to everything it spawns, job drivers included) as `RAY_AUTH_TOKEN` with
  `RAY_AUTH_MODE=token`; `RAY_AUTH_TOKEN_PATH` is removed from the head's environment because the
  env var wins anyway. The client sends it as an explicit `Authorization: Bearer` header. Nothing
  is written to ~/.ray/auth_token and this process's own environment is left untouched.
* It is stopped by its own pid (SIGTERM to `ray start`, which tears its node down), then anything
  left that is its own (its process group/session, its temp dir in the command line or as cwd,
  or its token in the environment: job drivers run in sessions of their own) gets SIGTERM and
  then SIGKILL, by pid. Never `ray stop`: that kills every Ray process on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))

# Kept out of the job package: the upload limit is 100 MiB and none of these are needed by a job.
JOB_EXCLUDES = [".venv", "runs", ".git", "bench/*.json", "**/__pycache__"]
TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(unreadable)"


def _proc_info(pid: int) -> tuple[int, int, str, bytes, str] | None:
    """(pgid, sid, cmdline, environ, cwd) of a live process of ours; None if gone, foreign or a zombie."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] in "ZX":
            return None  # already dead; only waiting for its parent (or init) to reap it
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
        return int(fields[2]), int(fields[3]), cmdline, environ, cwd
    except (OSError, ValueError, IndexError):
        return None


class RayHead:
    """One private head node. `start()` blocks until the job API answers; `stop()` ends it all."""

    def __init__(self, log_dir: str | os.PathLike | None = None, num_cpus: int = 2,
                 object_store_memory: int = 256 * 1024**2, extra_env: dict[str, str] | None = None,
                 start_timeout: float = 120.0):
        self.num_cpus = num_cpus
        self.object_store_memory = object_store_memory
        self.extra_env = dict(extra_env or {})
        self.start_timeout = start_timeout
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
        self.log_dir = Path(log_dir) if log_dir is not None else self.temp_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / "ray_head.log"
        self.token = secrets.token_hex(32)
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http_port,
         self.agent_grpc_port, self.metrics_port, self.runtime_env_port) = free_ports(7)
        self.process: subprocess.Popen | None = None
        self._client = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """GCS address, for `ray.init(address=...)` (that process also needs the token env)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def env(self) -> dict[str, str]:
        """Environment for the head and for any process that should talk to it."""
        env = dict(os.environ)
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # On SIGTERM `ray start` first drains the node for up to 30 s (for Serve upgrades);
            # a test head has nothing to drain.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        env.update(self.extra_env)
        return env

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "RayHead":
        command = [
            RAY_CLI, "start", "--head", "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--metrics-export-port={self.metrics_port}",
            f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--disable-usage-stats",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env(), cwd=REPO,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_logs=True)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {self.process.returncode} before the job API "
                                   f"answered\n{self.describe_logs()}")
            try:
                request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self.auth_headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
                    last_error = f"HTTP {response.status}"
            except (urllib.error.URLError, OSError) as error:
                last_error = repr(error)
            time.sleep(0.5)
        raise TimeoutError(f"Ray head's job API at {self.dashboard_url} did not answer within "
                           f"{self.start_timeout:.0f} s (last: {last_error})\n{self.describe_logs()}")

    def describe_logs(self, lines: int = 40) -> str:
        """Tails of the head's own output and of the dashboard/GCS/raylet logs, for error messages."""
        parts = [f"--- {self.log_path} ---\n{_tail(self.log_path, lines)}"]
        logs = self.temp_dir / "session_latest" / "logs"
        for name in ("dashboard.log", "dashboard.err", "gcs_server.err", "raylet.err", "raylet.out"):
            if (logs / name).is_file() and (logs / name).stat().st_size:
                parts.append(f"--- {logs / name} ---\n{_tail(logs / name, lines)}")
        return "\n".join(parts)

    def _members(self) -> list[int]:
        """Live processes of ours that belong to this head.

        That is: its process group or session (only while the `ray start` leader is unreaped, so
        its pid cannot have been reused), anything naming or working in its private temp dir, and
        anything carrying its token in the environment (job drivers run in sessions of their own).
        """
        if self.process is None:
            return []
        leader = self.process.pid if self.process.returncode is None else None
        marker = str(self.temp_dir)
        token = f"RAY_AUTH_TOKEN={self.token}".encode()
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            info = _proc_info(int(entry))
            if info is None:
                continue
            pgid, sid, cmdline, environ, cwd = info
            if (leader in (pgid, sid) or marker in cmdline or cwd == marker or cwd.startswith(marker + "/")
                    or token in environ.split(b"\0")):
                members.append(int(entry))
        return members

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
        for pid in self._members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        # The leader is reaped only after this, so its pid (= the group and session id) cannot be
        # reused by an unrelated process while we are still matching on it.
        while True:
            if not self._members():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)

    def stop(self, timeout: float = 30.0, keep_logs: bool = False) -> None:
        """End the head and everything it started; remove its temp dir.

        SIGTERM goes to `ray start` alone first: its handler tears the node down in order (raylet
        first, GCS last), which takes ~5-8 s here. Signalling the whole group at once kills the GCS
        under the raylet, which then hangs on reconnecting. Whatever is left after `timeout` gets
        SIGTERM by group/session/temp dir, then SIGKILL. With `keep_logs`, the session logs are
        copied to `log_dir/ray_logs` first (when `log_dir` is not the temp dir itself).
        """
        self._client = None
        if self.process is not None:
            if self.process.returncode is None:  # unreaped (at worst a zombie): the pid is still ours
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGTERM)
            if not self._wait_gone(timeout):
                self._signal(signal.SIGTERM)
                if not self._wait_gone(5):
                    self._signal(signal.SIGKILL)
                    if not self._wait_gone(10):
                        raise RuntimeError(f"Ray head processes survived SIGKILL: {self._members()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        if keep_logs and self.log_dir != self.temp_dir:
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(self.temp_dir / "session_latest" / "logs", self.log_dir / "ray_logs",
                                symlinks=True, dirs_exist_ok=True)
        if not (keep_logs and self.log_dir == self.temp_dir):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(keep_logs=exc_type is not None)

    # -- jobs --------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.dashboard_url, headers=self.auth_headers)
        return self._client

    def submit(self, entrypoint: str, working_dir: str | os.PathLike = REPO, env: dict[str, str] | None = None,
               excludes: list[str] | None = None) -> str:
        """Submit `entrypoint` with `working_dir` uploaded as the job package; returns the job id."""
        runtime_env = {"working_dir": str(working_dir),
                       "excludes": list(JOB_EXCLUDES if excludes is None else excludes)}
        if env:
            runtime_env["env_vars"] = {key: str(value) for key, value in env.items()}
        return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)

    def wait(self, job_id: str, timeout: float = 300.0, poll: float = 1.0) -> tuple[str, str]:
        """Wait until the job ends (or `timeout`); returns (status name, the job's logs)."""
        deadline = time.monotonic() + timeout
        while True:
            status = str(self.client.get_job_status(job_id).value)
            if status in TERMINAL_STATES or time.monotonic() >= deadline:
                break
            time.sleep(poll)
        try:
            logs = self.client.get_job_logs(job_id)
        except Exception as error:  # the logs are a diagnostic; never hide the status behind them
            logs = f"(could not fetch logs: {error!r})"
        return status, logs


@contextlib.contextmanager
def ray_head(tmp_path: str | os.PathLike | None = None, **kwargs) -> Iterator[RayHead]:
    """A started `RayHead`, stopped on exit. Its output (and, on failure, its logs) go to `tmp_path`."""
    head = RayHead(log_dir=tmp_path, **kwargs)
    with head:
        yield head
