"""The bare-process floor of `cotrec bench serve`: one FastAPI + uvicorn process holding the same
`RetrieverService` as the Serve app, answering `POST /recommend` (retrieval only) with the same reply.

No Ray, no batching, no proxy: what the same cores do for the same work without Serve, so that the
bench can report Serve's figures as a ratio of it. `python -m cotrec.bench.floor RUN_DIR VARIANT PORT`
serves until terminated; `start_floor` runs it as a child process and waits until it answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cotrec.errors import CotrecError

READY_TIMEOUT_S = 120.0


def make_app(run_dir: str, variant: str) -> Any:
    import json

    from fastapi import FastAPI, HTTPException
    from fastapi.responses import Response

    import torch

    from cotrec.recommend import RequestError, RetrieverService

    # one intra-op thread, as Ray gives a replica with under 2 CPUs (OMP_NUM_THREADS): the same
    # forward pass as the Serve replica's, and no thread fighting the load generator for the cores
    torch.set_num_threads(1)
    service = RetrieverService(run_dir, variant)
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/recommend")
    async def recommend(body: dict[str, Any]) -> Response:
        received_at = time.time()
        started = time.perf_counter()
        try:
            request = service.resolve({"horizon": "next", **body})
        except RequestError as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        k = int(body.get("k", 10))
        top = service.retrieve([request], k)[0]
        rows = service.describe(top["items"], top["scores"])
        for row in rows:
            row["retriever_score"] = row.pop("score")
        total = (time.perf_counter() - started) * 1e3
        latency = {"retrieve_ms": total, "retrieval_ms": total, "total_ms": total, "received_at": received_at,
                   "parse_ms": 0.0, "app_ms": total}
        content = {"user_id": body.get("user_id"), "horizon": request["horizon"], "reranked": False, "items": rows,
                   "latency": latency}
        return Response(json.dumps(content, separators=(",", ":")).encode(), media_type="application/json")

    return app


def start_floor(run_dir: str | Path, variant: str, port: int) -> subprocess.Popen:
    """The floor as a child process on 127.0.0.1:`port`, once it answers /healthz."""
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "cotrec.bench.floor", str(run_dir), variant, str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CotrecError(f"bench serve: the bare process exited ({process.returncode}): "
                              f"{process.stderr.read().decode(errors='replace')[-500:] if process.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_floor(process)
    raise CotrecError(f"bench serve: the bare process did not answer within {READY_TIMEOUT_S:.0f} s")


def stop_floor(process: Optional[subprocess.Popen]) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> None:
    import uvicorn

    run_dir, variant, port = argv
    # one worker, no access log: the floor is the least a process needs to answer
    uvicorn.run(make_app(run_dir, variant), host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
