"""The Ray Serve application: a retriever deployment, a ranker deployment and a FastAPI ingress.

    POST /recommend               {"user_id": "196", "k": 10, "rerank": true}
                                  or {"history": ["242", "302", ...], "k": 10} for an unknown user
    GET  /healthz
    GET  /users/{user_id}/preference

The model code lives in `cotrec.recommend` (shared with the offline evaluation); this module only
puts it behind Serve: `Retriever` batches concurrent requests into one SASRec forward pass
(`@serve.batch`), `Ranker` holds one LLM engine and batches concurrent candidate lists into one
engine call, `Ingress` validates requests (pydantic: malformed bodies and out-of-range values are
422), chains the two and reports each stage's latency. Deploy with `serve deploy serve/config.yaml`
or `cotrec serve --run-dir R`; `app_builder` is the import path both use.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle

from cotrec.config import parse_ranker
from cotrec.recommend import RankerService, RequestError, RetrieverService, run_config
from cotrec.rundir import RunDir

MAX_K = 100
api = FastAPI(title="cotrec", description="CoT-Rec: SASRec retrieval, then LLM re-ranking")


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Optional[Union[StrictStr, StrictInt]] = None  # the dataset's raw user id
    history: Optional[list[Union[StrictStr, StrictInt]]] = Field(None, min_length=1)  # raw item ids, oldest first
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: bool = False
    # next: after the whole stored history; test / valid: the leave-one-out histories (evaluation)
    horizon: Literal["next", "valid", "test"] = "next"


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.25},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                                      "upscale_delay_s": 2, "downscale_delay_s": 60})
class Retriever:
    def __init__(self, run_dir: str, variant: Optional[str], max_history: int = 2000):
        self.service = RetrieverService(run_dir, variant, max_history=max_history)

    def info(self) -> dict[str, Any]:
        return {"variant": self.service.variant, "users": len(self.service.user_ids),
                "items": len(self.service.item_ids), "domain": self.service.domain}

    def resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's user and history, or {"error", "status"} (errors cross handles as values)."""
        try:
            resolved = self.service.resolve(request)
        except RequestError as exc:
            return {"error": str(exc), "status": exc.status}
        return {**resolved, "history": resolved["history"].tolist()}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def top_k(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import numpy as np

        k = max(r["k"] for r in requests)
        resolved = [{**r["resolved"], "history": np.asarray(r["resolved"]["history"], dtype=np.int64)} for r in requests]
        found = self.service.retrieve(resolved, k)
        return [{"items": f["items"][:r["k"]], "scores": f["scores"][:r["k"]]} for f, r in zip(found, requests)]

    def describe(self, items: list[int], scores: list[float]) -> list[dict[str, Any]]:
        return self.service.describe(items, scores)

    def preference(self, user_id: str) -> dict[str, Any]:
        service = self.service
        user = service.user_index.get(str(user_id))
        if user is None:
            return {"error": f"unknown user {user_id!r}", "status": 404}
        return {"user_id": str(user_id), "preferences": service.preferences_of(user)}


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16})
class Ranker:
    def __init__(self, run_dir: str, variant: str, ranker: str):
        self.service = RankerService(run_dir, variant, ranker)

    def info(self) -> dict[str, Any]:
        return {"ranker": self.service.ranker, "model": self.service.model}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def rerank(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import numpy as np

        lists = [self.service.candidate_list(r["user_idx"], r["horizon"], np.asarray(r["history"], dtype=np.int64),
                                             r["candidates"]) for r in requests]
        return await self.service.rerank(lists)


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                      "upscale_delay_s": 2, "downscale_delay_s": 60})
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, ranker: Optional[DeploymentHandle], top_m: int):
        self.retriever, self.ranker, self.top_m = retriever, ranker, top_m

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        info = {"status": "ok", "retriever": await self.retriever.info.remote()}
        if self.ranker is not None:
            info["ranker"] = await self.ranker.info.remote()
        return info

    @api.get("/users/{user_id}/preference")
    async def preference(self, user_id: str) -> dict[str, Any]:
        found = await self.retriever.preference.remote(user_id)
        if "error" in found:
            raise HTTPException(status_code=found["status"], detail=found["error"])
        return found

    @api.post("/recommend")
    async def recommend(self, body: RecommendRequest) -> dict[str, Any]:
        started = time.perf_counter()
        request = body.model_dump()
        if body.rerank and self.ranker is None:
            raise HTTPException(status_code=422, detail="this deployment has no ranker; send rerank: false")
        resolved = await self.retriever.resolve.remote(request)
        if "error" in resolved:
            raise HTTPException(status_code=resolved["status"], detail=resolved["error"])
        k = max(body.k, self.top_m) if body.rerank else body.k
        found = await self.retriever.top_k.remote({"resolved": resolved, "k": k})
        retrieved = time.perf_counter()
        items, scores = found["items"], found["scores"]
        latency = {"retrieve_ms": (retrieved - started) * 1e3}
        probs: list[Optional[float]] = [None] * len(items)
        if body.rerank and len(items) >= 2:
            m = min(self.top_m, len(items))
            ranked = await self.ranker.rerank.remote({"user_idx": resolved["user_idx"], "horizon": resolved["horizon"],
                                                      "history": resolved["history"], "candidates": items[:m]})
            order = ranked["order"] + list(range(m, len(items)))
            probs = ranked["probs"] + [None] * (len(items) - m)
            items, scores = [items[i] for i in order], [scores[i] for i in order]
            latency["rerank_ms"] = (time.perf_counter() - retrieved) * 1e3
        described = await self.retriever.describe.remote(items[:body.k], scores[:body.k])
        for row, prob in zip(described, probs):
            row["retriever_score"] = row.pop("score")
            if prob is not None:
                row["ranker_prob"] = prob
        latency["total_ms"] = (time.perf_counter() - started) * 1e3
        return {"user_id": body.user_id, "horizon": resolved["horizon"], "reranked": bool(body.rerank),
                "items": described, "latency": latency}


def app_builder(args: dict[str, Any]) -> Any:
    """The application from `args`: run_dir (required), variant, ranker ("none" for none), top_m."""
    if "run_dir" not in args:
        raise ValueError("serve: args.run_dir is required (the run directory to serve)")
    run_dir = str(args["run_dir"])
    config = run_config(RunDir(run_dir))
    variant = args.get("variant") or config.ranker.default_retriever
    ranker = args.get("ranker") or config.ranker.grid[-1]
    retriever = Retriever.bind(run_dir, variant, int(args.get("max_history", 2000)))
    ranker_handle = None if parse_ranker(ranker)[0] == "none" else Ranker.bind(run_dir, variant, ranker)
    return Ingress.bind(retriever, ranker_handle, int(args.get("top_m", config.retriever.top_m)))
