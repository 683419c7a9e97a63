"""A real S3-compatible server for the storage tests: moto's, started on 127.0.0.1 by the test.

The client side is configured as a user would configure theirs: `AWS_ENDPOINT_URL` and keys in the
environment, which s3fs (the run directory) and pyarrow (Ray Train's storage) both read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto server on 127.0.0.1 for as long as the block runs; yields its endpoint URL."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextmanager
def s3_server(bucket: str = "cotrec-runs") -> Iterator[str]:
    """Start moto's server, point this process's (and its children's) S3 clients at it, create
    `bucket`; yields `s3://<bucket>`. The server and the environment are put back afterwards."""
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*settings, "AWS_ENDPOINT_URL"]}
    try:
        with moto_server() as endpoint:
            os.environ.update(settings, AWS_ENDPOINT_URL=endpoint)
            import boto3

            boto3.client("s3").create_bucket(Bucket=bucket)
            yield f"s3://{bucket}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
