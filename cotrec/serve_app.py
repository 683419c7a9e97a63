"""The Ray Serve application: a FastAPI ingress that retrieves, and a ranker deployment.

    POST /recommend               {"user_id": "196", "k": 10, "rerank": true}
                                  or {"history": ["242", "302", ...], "k": 10, "rerank": true} for an unknown user
    GET  /healthz                 liveness only ({"status": "ok"}), the one route without a key
    GET  /users/{user_id}/preference   off unless args.expose_preferences

The model code lives in `cotrec.recommend` (shared with the offline evaluation); this module only
puts it behind Serve: `Ingress` validates requests (pydantic: malformed bodies and out-of-range values
are 422), resolves, scores and describes concurrent requests in one SASRec forward pass
(`@serve.batch`, in the replica the proxy reached: retrieval costs no second hop), calls `Ranker`
only when a re-rank is asked for, and reports each stage's latency. `Ranker` holds one LLM engine and
scores concurrent candidate lists in one engine call. A request that cannot be answered comes back
from a batch as an error value, never as an exception, so a bad request in a batch fails alone. Deploy with `serve deploy serve/config.yaml` or `cotrec serve --run-dir R`; `app_builder` is
the import path both use.

Access (`cotrec.guard.Guard`, an ASGI middleware around `api`): every route but `/healthz` needs an
API key (`Authorization: Bearer`), from the file `args.api_keys_file` and/or the environment
variable `args.api_keys_env` read by each Ingress replica; without either the app is open only
with `allow_unauthenticated: true` (what `cotrec serve` sets on a loopback address). The body
limit, the request timeout (`request_timeout_s`, 504) and 500s that return only a request id live
there too. The preference route answers only with `expose_preferences: true`, and a request for
the `valid`/`test` horizons (evaluation data) only when `open_horizons` names them (else 403).

`DEPLOYMENTS` holds each deployment's load settings; serve/config.yaml and the RayService restate
them (a test checks they agree). Why these numbers: a replica takes up to `max_ongoing_requests`
(Ray's default of 5 would cap every `@serve.batch` below its batch size), the autoscaler aims at
`target_ongoing_requests` per replica (at most `max_ongoing_requests`, or it is never reached), and
past `max_queued_requests` waiting at a handle a request is refused at once (503) instead of
queueing without bound.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal, Optional, TypedDict, Union

import numpy as np
from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cotrec.config import parse_ranker
from cotrec.guard import Guard, Policy, install_policy, installed_policy, load_api_keys
from cotrec.llm.base import EngineDeadError
from cotrec.llm.placement import give_engine_every_core
from cotrec.recommend import ItemRow, RankerService, RecommendBody, RequestError, RetrieverService, run_config
from cotrec.rundir import RunDir

MAX_K = 100
MAX_BODY_BYTES = 1 << 20  # a history of the longest accepted length fits many times over
MAX_ID_CHARS = 200  # a raw user or item id
HISTORY_CAP = 10_000  # the schema's bound; args.max_history (at most this) is the one a client meets
DEFAULT_TIMEOUT_S = 60.0  # a re-rank queued behind a full batch on a CPU engine still fits
CLOSABLE_HORIZONS = ("valid", "test")  # the leave-one-out histories: evaluation data
LIVENESS_PATH = "/healthz"
LOG = logging.getLogger("ray.serve")



class DeploymentOptions(TypedDict, total=False):
    """A deployment's `@serve.deployment` options that the app sets."""

    ray_actor_options: dict[str, float]
    max_ongoing_requests: int
    max_queued_requests: int
    autoscaling_config: dict[str, float]
    health_check_period_s: float
    health_check_timeout_s: float


# Each deployment's load settings (serve/config.yaml and the RayService restate them). Retrieval runs
# in the Ingress (one hop from the proxy, not two); the Ranker is called only for a re-rank.
DEPLOYMENTS: dict[str, DeploymentOptions] = {
    "Ranker": {
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": 32, "max_queued_requests": 256,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16,
                               "upscale_delay_s": 10, "downscale_delay_s": 120},
        "health_check_period_s": 10, "health_check_timeout_s": 30,
    },
    "Ingress": {
        "ray_actor_options": {"num_cpus": 0.25},
        "max_ongoing_requests": 256, "max_queued_requests": 2048,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32,
                               "upscale_delay_s": 5, "downscale_delay_s": 60},
    },
}
# @serve.batch per deployment: the most requests in one forward pass, and how long a batch waits to
# fill. Retrieval waits for nothing: what queued while the previous batch ran is the next batch,
# and a lone request is not held back.
BATCHING = {"Ingress": {"max_batch_size": 64, "batch_wait_timeout_s": 0.0},
            "Ranker": {"max_batch_size": 32, "batch_wait_timeout_s": 0.01}}


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a request's text echoed back (a lone surrogate
    included) can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


api = FastAPI(title="cotrec", description="CoT-Rec: SASRec retrieval, then LLM re-ranking",
              default_response_class=SafeJSONResponse)


@api.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    """422 with each problem's location and message (the offending input is not echoed back)."""
    problems = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
                for error in exc.errors()]
    return SafeJSONResponse(status_code=422, content={"detail": problems})


# Outside every route: keys, body limit, timeout, opaque 500s; the policy is the replica's own
# (installed by Ingress.__init__, since Serve serves a copy of `api` taken at import).
api.add_middleware(Guard, policy=installed_policy)


def shown(value: Any, width: int = 60) -> str:
    """A client's value in an error message: quoted and cut short."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


RawId = Union[Annotated[StrictStr, StringConstraints(max_length=MAX_ID_CHARS)],
              Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Optional[RawId] = None  # raw user id
    history: Optional[list[RawId]] = Field(None, min_length=1, max_length=HISTORY_CAP)  # raw item ids, oldest first
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: bool = False
    # next: after the whole stored history; test / valid: the leave-one-out histories (evaluation)
    horizon: Literal["next", "valid", "test"] = "next"


class ErrorValue(TypedDict, total=False):
    """A request's failure as a deployment returns it: the message, the HTTP status, and for a 500 the
    id it was logged under."""

    error: str
    status: int
    error_id: str


class RerankRequest(TypedDict):
    """What the Ingress sends the Ranker: the user, horizon and history its prompt shows, and the
    candidates (item_idx) in the retriever's order."""

    user_idx: Optional[int]
    horizon: str
    history: list[int]
    candidates: list[int]


class RerankReply(ErrorValue, total=False):
    """The Ranker's reply to one request: `recommend.Ranked`, or an error value."""

    order: list[int]
    probs: list[float]


class Retrieved(ErrorValue, total=False):
    """The retrieval batch's reply to one request: the user, horizon and top items, the history (for a
    re-rank only), and the batch's timing; or an error value."""

    user_idx: Optional[int]
    horizon: str
    items: list[ItemRow]
    history: list[int]
    timing: dict[str, float]


class PreferenceReply(ErrorValue, total=False):
    """`GET /users/{user_id}/preference`: the stored preference per horizon, or an error value."""

    user_id: str
    preferences: dict[str, str]


class RecommendReply(TypedDict):
    """`POST /recommend`'s reply: the items, best first, and where the time went (milliseconds)."""

    user_id: Optional[Union[str, int]]
    horizon: str
    reranked: bool
    items: list[ItemRow]
    latency: dict[str, float]


class RetrieverArgs(TypedDict):
    """`RetrieverService`'s arguments, as each Ingress replica gets them."""

    run_dir: str
    variant: str
    max_history: int


class AccessArgs(TypedDict, total=False):
    """Who may call what (`ACCESS_ARGS`), checked by `access_args`."""

    api_keys_file: str
    api_keys_env: str
    allow_unauthenticated: bool
    expose_preferences: bool
    open_horizons: list[str]
    request_timeout_s: float


def error_value(exc: Exception) -> ErrorValue:
    """An exception as the value a deployment returns: a request's own problem is its status (4xx);
    anything else is logged here under an error id, and only that id travels (never its text)."""
    if isinstance(exc, RequestError):
        return {"error": str(exc), "status": exc.status}
    error_id = uuid.uuid4().hex[:16]
    LOG.error("error %s", error_id, exc_info=exc)
    return {"error": "internal error", "status": 500, "error_id": error_id}


class InternalError(Exception):
    """A deployment's 500, raised in the Ingress so that the guard logs it with the request id."""


def raise_error(found: ErrorValue, where: str) -> None:
    """A deployment's error value as the reply: its own message for a 4xx or 503 (texts written for
    clients), an opaque 500 otherwise."""
    if found["status"] >= 500 and found["status"] != 503:
        raise InternalError(f"{where}: error {found.get('error_id')} (in that replica's log)")
    raise HTTPException(status_code=found["status"], detail=found["error"])


@serve.deployment(name="Ranker", **DEPLOYMENTS["Ranker"])
class Ranker:
    def __init__(self, run_dir: str, variant: str, ranker: str):
        give_engine_every_core(run_config(RunDir(run_dir)).llm)
        self.service = RankerService(run_dir, variant, ranker)

    def check_health(self) -> None:
        """Serve's probe: a replica whose engine died is replaced instead of receiving traffic."""
        self.service.check_health()

    @serve.batch(**BATCHING["Ranker"])
    async def rerank(self, requests: list[RerankRequest]) -> list[RerankReply]:
        """Per request, the candidates' ranked order and probabilities, or an error value."""
        out: list[RerankReply] = [{} for _ in requests]
        lists = {}
        for i, r in enumerate(requests):
            try:
                lists[i] = self.service.candidate_list(r["user_idx"], r["horizon"], np.asarray(r["history"], dtype=np.int64),
                                                       r["candidates"])
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail its batch
                out[i] = error_value(exc)
        if lists:
            try:
                ranked = await self.service.rerank(list(lists.values()))
            except EngineDeadError as exc:
                LOG.error("the ranker's engine died: %s", exc)
                ranked = [{"error": "the ranker is unavailable (its engine stopped); try again", "status": 503}] * len(lists)
            for i, result in zip(lists, ranked):
                out[i] = result
        return out


@serve.deployment(name="Ingress", **DEPLOYMENTS["Ingress"])
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: Optional[RetrieverArgs], ranker: Optional[DeploymentHandle], top_m: int,
                 access: Optional[AccessArgs] = None):
        """`retriever`: RetrieverService's args (run_dir, variant, max_history), loaded after the
        access args are checked so that a replica without keys fails before loading a model."""
        self.ranker, self.top_m = ranker, top_m
        access = access or {}
        keys = load_api_keys(access.get("api_keys_file"), access.get("api_keys_env"))
        if not keys and not access.get("allow_unauthenticated"):
            raise ValueError("serve: no API keys (args.api_keys_file or args.api_keys_env); an open app needs "
                             "args.allow_unauthenticated: true")
        self.expose_preferences = bool(access.get("expose_preferences"))
        self.open_horizons = frozenset(access.get("open_horizons") or ())
        install_policy(Policy(keys=keys, max_body_bytes=MAX_BODY_BYTES, open_paths=frozenset({LIVENESS_PATH}),
                              timeout_s=float(access.get("request_timeout_s") or DEFAULT_TIMEOUT_S)))
        self.service = RetrieverService(**retriever) if retriever is not None else None

    @staticmethod
    async def call(method: Any, request: RerankRequest) -> RerankReply:
        """A deployment method, once more if its replica died under the request (both are
        idempotent: the router sends the retry to a live replica)."""
        try:
            try:
                return await method.remote(request)
            except RayActorError:
                return await method.remote(request)
        except BackPressureError:
            raise HTTPException(status_code=503, detail="the service is at capacity; try again") from None

    async def retrieve(self, request: RecommendBody) -> Retrieved:
        """One request through the retrieval batch, with its wait and the batch's work (for the bench)."""
        queued_at = time.perf_counter()
        found = await self.retrieve_batch(request)
        timing = found.pop("timing", None)
        if timing is not None:
            found["timing"] = {"batch_wait_ms": (timing["batch_at"] - queued_at) * 1e3,
                               "retrieval_ms": timing["retrieval_ms"], "batch_size": timing["batch_size"]}
        return found

    @serve.batch(**BATCHING["Ingress"])
    async def retrieve_batch(self, requests: list[RecommendBody]) -> list[Retrieved]:
        """Per request: its user, horizon and history (kept only for a re-rank), and the top `k`
        items described, or an error value for that request alone."""
        batch_at = time.perf_counter()
        out: list[Retrieved] = [{} for _ in requests]
        resolved = {}
        for i, request in enumerate(requests):
            try:
                resolved[i] = self.service.resolve(request)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail its batch
                out[i] = error_value(exc)
        if resolved:
            try:
                k = max(requests[i]["k"] for i in resolved)
                found = self.service.retrieve(list(resolved.values()), k)
                for (i, request), top in zip(resolved.items(), found):
                    n = requests[i]["k"]
                    out[i] = {"user_idx": request["user_idx"], "horizon": request["horizon"],
                              "items": self.service.describe(top["items"][:n], top["scores"][:n])}
                    if requests[i].get("rerank"):  # what the Ranker's prompt shows, and no more
                        out[i]["history"] = request["history"][-self.service.config.ranker.history_items:].tolist()
            except Exception as exc:  # noqa: BLE001 - the batch's failure is each request's 500
                failed = error_value(exc)
                for i in resolved:
                    out[i] = failed
        timing = {"batch_at": batch_at, "retrieval_ms": (time.perf_counter() - batch_at) * 1e3,
                  "batch_size": len(requests)}
        for row in out:
            if "error" not in row:
                row["timing"] = timing
        return out

    def user_preference(self, user_id: str) -> PreferenceReply:
        user = self.service.user_index.get(str(user_id))
        if user is None:
            return {"error": f"unknown user {shown(user_id)}", "status": 404}
        return {"user_id": str(user_id), "preferences": self.service.preferences_of(user)}

    @api.get(LIVENESS_PATH)
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/users/{user_id}/preference", response_model=None)  # the reply is built here, not validated again
    async def preference(self, user_id: str = Path(max_length=MAX_ID_CHARS)) -> PreferenceReply:
        if not self.expose_preferences:  # as if the route did not exist
            raise HTTPException(status_code=404, detail="Not Found")
        found = self.user_preference(user_id)
        if "error" in found:
            raise_error(found, "preference")
        return found

    @api.post("/recommend", response_model=None)  # the reply is built here, not validated again
    async def recommend(self, body: RecommendRequest, http: Request = None) -> RecommendReply:  # type: ignore[assignment]
        started = time.perf_counter()
        received_at = getattr(getattr(http, "state", None), "received_at", None) or time.time()
        parse_ms = (time.time() - received_at) * 1e3
        if body.horizon in CLOSABLE_HORIZONS and body.horizon not in self.open_horizons:
            raise HTTPException(status_code=403, detail=f"horizon {body.horizon!r} is closed on this deployment "
                                                        f"(evaluation data); its operator opens it with open_horizons")
        request: RecommendBody = body.model_dump()
        if body.rerank and self.ranker is None:
            raise HTTPException(status_code=422, detail="this deployment has no ranker; send rerank: false")
        request["k"] = max(body.k, self.top_m) if body.rerank else body.k
        found = await self.retrieve(request)
        if "error" in found:
            raise_error(found, "retrieve")
        retrieved = time.perf_counter()
        rows = found["items"]
        for row in rows:
            row["retriever_score"] = row.pop("score")
        latency: dict[str, float] = {"retrieve_ms": (retrieved - started) * 1e3, "received_at": received_at, "parse_ms": parse_ms,
                   **found.get("timing", {})}
        if body.rerank and len(rows) >= 2:
            m = min(self.top_m, len(rows))
            ranked = await self.call(self.ranker.rerank, {"user_idx": found["user_idx"], "horizon": found["horizon"],
                                                          "history": found["history"],
                                                          "candidates": [row["item_idx"] for row in rows[:m]]})
            if "error" in ranked:
                raise_error(ranked, "Ranker.rerank")
            reordered = [rows[i] for i in ranked["order"]]
            for row, prob in zip(reordered, ranked["probs"]):
                row["ranker_prob"] = prob
            rows = reordered + rows[m:]
            latency["rerank_ms"] = (time.perf_counter() - retrieved) * 1e3
        latency["total_ms"] = (time.perf_counter() - started) * 1e3
        latency["app_ms"] = parse_ms + latency["total_ms"]
        return RecommendReply(user_id=body.user_id, horizon=found["horizon"], reranked=bool(body.rerank),
                              items=rows[:body.k], latency=latency)


def ranker_resources(config: Any) -> dict[str, float]:
    """The Ranker replica's resources: a CUDA engine gets the GPUs the ranker's workers get."""
    options = dict(DEPLOYMENTS["Ranker"]["ray_actor_options"])
    if config.llm.device == "cuda":
        options["num_gpus"] = config.ranker.gpus_per_worker
    return options


ACCESS_ARGS = ("api_keys_file", "api_keys_env", "allow_unauthenticated", "expose_preferences", "open_horizons",
               "request_timeout_s")


def access_args(args: dict[str, Any]) -> AccessArgs:
    """Who may call what, from the app's args, checked before any replica starts (keys are read by
    each Ingress replica, where the Secret is mounted)."""
    access: AccessArgs = {key: args[key] for key in ACCESS_ARGS if args.get(key) is not None}
    for flag in ("allow_unauthenticated", "expose_preferences"):
        if not isinstance(access.get(flag, False), bool):
            raise ValueError(f"serve: args.{flag} must be true or false, got {access[flag]!r}")
    horizons = access.get("open_horizons", [])
    if isinstance(horizons, str) or not set(horizons) <= set(CLOSABLE_HORIZONS):
        raise ValueError(f"serve: args.open_horizons must be a list of {', '.join(CLOSABLE_HORIZONS)}, got {horizons!r}")
    timeout = access.get("request_timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"serve: args.request_timeout_s must be a number of seconds above 0, got {timeout!r}")
    if not (access.get("api_keys_file") or access.get("api_keys_env") or access.get("allow_unauthenticated")):
        raise ValueError("serve: no API keys: set args.api_keys_file (a file every node has, e.g. a mounted Secret) or "
                         "args.api_keys_env, or args.allow_unauthenticated: true for an app nobody else can reach")
    return access


def app_builder(args: dict[str, Any]) -> Any:
    """The application from `args`: run_dir (required), variant, ranker ("none" for none), top_m,
    max_history, and the access args (`ACCESS_ARGS`, docs/design.md "Serving")."""
    if "run_dir" not in args:
        raise ValueError("serve: args.run_dir is required (the run directory to serve)")
    access = access_args(args)
    max_history = int(args.get("max_history", 2000))
    if not 1 <= max_history <= HISTORY_CAP:
        raise ValueError(f"serve: args.max_history must be within 1..{HISTORY_CAP}, got {max_history}")
    run_dir = str(args["run_dir"])
    config = run_config(RunDir(run_dir))
    variant = args.get("variant") or config.ranker.default_retriever
    ranker = args.get("ranker") or config.ranker.grid[-1]
    retriever = RetrieverArgs(run_dir=run_dir, variant=variant, max_history=max_history)
    ranker_handle = None
    if parse_ranker(ranker)[0] != "none":
        ranker_handle = Ranker.options(ray_actor_options=ranker_resources(config)).bind(run_dir, variant, ranker)
    return Ingress.bind(retriever, ranker_handle, int(args.get("top_m", config.retriever.top_m)), access)
