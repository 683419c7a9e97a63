"""The Serve app's front door without Ray: `cotrec.guard.Guard` as the middleware of small FastAPI
apps (as cotrec/serve_app.py installs it), the Ingress's own refusals (preference route, closed horizons), the access args that
`app_builder` hands the Ingress, and `cotrec serve`'s refusals before anything starts."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from cotrec.errors import CotrecError
from cotrec.guard import Guard, Policy, install_policy, installed_policy, load_api_keys
from cotrec.serving import checked_access

KEY = "k" * 16 + "-good-0123456789"
OTHER = "o" * 16 + "-other-012345678"
POLICY = Policy(keys=(KEY, OTHER), max_body_bytes=1 << 20, timeout_s=5.0)
USER_DATA = {"user_id": "u3", "preferences": {"test": "likes horror"}, "items": ["i1", "i2"]}


class Body(BaseModel):
    history: list[str]


def inner_app(seen: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/users/{user_id}/preference")
    async def preference(user_id: str):
        return USER_DATA

    @app.post("/recommend")
    async def recommend(body: Body):
        seen["parsed"] = len(body.history)  # reached only once the whole body was read and parsed
        return USER_DATA

    @app.get("/fail")
    async def fail():
        raise RuntimeError("/secret/run/model.pt: disk quota of user alice")

    @app.get("/slow")
    async def slow():
        await asyncio.sleep(30)
        return USER_DATA

    return app


def call(policy, method, path, seen=None, **kwargs):
    app = inner_app(seen if seen is not None else {})
    app.add_middleware(Guard, policy=policy)  # as cotrec/serve_app.py: inside Starlette's own 500 handler

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guarded") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def bearer(key):
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method,path", [("POST", "/recommend"), ("GET", "/users/u3/preference")])
@pytest.mark.parametrize("headers", [{}, bearer("wrong-key-0123456789"), bearer(KEY[:-1]), bearer(KEY + "x"),
                                     {"authorization": KEY}, {"authorization": f"Basic {KEY}"}, bearer("")])
def test_no_key_or_a_wrong_key_is_401_and_reveals_nothing(method, path, headers):
    reply = call(POLICY, method, path, headers=headers, json={"history": ["i1"]})
    assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith("Bearer")
    assert "u3" not in reply.text and "horror" not in reply.text and "i1" not in reply.text


@pytest.mark.parametrize("key", [KEY, OTHER])
def test_each_configured_key_is_served(key):
    assert call(POLICY, "GET", "/users/u3/preference", headers=bearer(key)).json() == USER_DATA
    assert call(POLICY, "POST", "/recommend", headers={"authorization": f"bearer  {key} "},
                json={"history": ["i1"]}).status_code == 200


def test_healthz_needs_no_key_and_says_only_ok():
    reply = call(POLICY, "GET", "/healthz")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    # only the exact path is open: a look-alike is behind the key
    assert call(POLICY, "GET", "/healthz/../users/u3/preference").status_code in (401, 404)
    assert call(POLICY, "GET", "/healthzz").status_code == 401


def test_without_a_policy_every_request_waits_and_a_policy_without_keys_admits_everyone():
    assert call(lambda: None, "GET", "/healthz").status_code == 503
    assert call(Policy(), "GET", "/users/u3/preference").json() == USER_DATA


def test_a_chunked_body_over_the_limit_is_413_before_it_is_read_whole_or_parsed():
    """No Content-Length to trust: the guard counts the bytes as they arrive and stops the request
    at the first chunk past the limit (red when counted_receive does not count: the app reads all
    64 chunks and parses the body)."""
    pulled, seen = [], {}
    chunk = b'"i1",' * (64 * 1024 // 5)

    async def body():
        yield b'{"history": ['
        for n in range(64):  # 4 MiB
            pulled.append(n)
            yield chunk
        yield b'"i2"]}'

    limit = Policy(keys=(KEY,), max_body_bytes=1 << 20)
    reply = call(limit, "POST", "/recommend", seen, content=body(),
                 headers={**bearer(KEY), "content-type": "application/json"})
    assert reply.status_code == 413 and "at most 1048576 bytes" in reply.json()["detail"]
    assert "parsed" not in seen and len(pulled) <= 17, len(pulled)


def test_a_declared_length_over_the_limit_is_413_and_a_bad_one_400_and_a_body_under_it_is_parsed():
    headers = {**bearer(KEY), "content-type": "application/json"}
    big = call(POLICY, "POST", "/recommend", content=b"{}", headers={**headers, "content-length": str(2 << 20)})
    assert big.status_code == 413
    seen = {}
    assert call(POLICY, "POST", "/recommend", seen, json={"history": ["i1"] * 1000}, headers=headers).status_code == 200
    assert seen["parsed"] == 1000


def test_a_500_says_only_its_request_id_and_the_log_has_the_rest(caplog):
    """Red when the guard passes the exception on: the ASGI server's 500, or the exception's text."""
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        reply = call(POLICY, "GET", "/fail", headers=bearer(KEY))
    assert reply.status_code == 500
    body = reply.json()
    assert set(body) == {"detail", "request_id"} and body["detail"] == "internal error"
    assert reply.headers["x-request-id"] == body["request_id"]
    assert "alice" not in reply.text and "model.pt" not in reply.text and "RuntimeError" not in reply.text
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert logged and "alice" in logging.Formatter().formatException(logged[0].exc_info)


def test_the_request_id_of_serves_proxy_is_the_one_used_and_not_repeated():
    reply = call(POLICY, "GET", "/fail", headers={**bearer(KEY), "x-request-id": "5781ce5d-e6bc-4a79"})
    assert reply.json()["request_id"] == "5781ce5d-e6bc-4a79"
    assert "x-request-id" not in reply.headers  # the proxy that named it puts it on the reply


def test_a_request_past_the_timeout_is_504():
    reply = call(Policy(keys=(KEY,), timeout_s=0.2), "GET", "/slow", headers=bearer(KEY))
    assert reply.status_code == 504 and "0.2 s" in reply.json()["detail"]


def test_api_keys_from_a_file_and_a_variable(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"# rotated 2026-12\n{KEY}\n\n{OTHER}\n")
    monkeypatch.setenv("COTREC_TEST_KEYS", f"{OTHER}, {KEY}")
    assert load_api_keys(str(keys)) == (KEY, OTHER)
    assert load_api_keys(None, "COTREC_TEST_KEYS") == (OTHER, KEY)
    assert load_api_keys(str(keys), "COTREC_TEST_KEYS") == (KEY, OTHER)
    assert load_api_keys() == ()


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such API key file"), ("empty", "no API key in it"), ("short", "line 2: an API key must be"),
    ("unset", "$COTREC_TEST_UNSET: the environment variable"),
])
def test_bad_api_keys_are_one_line_errors_that_never_show_a_key(tmp_path, case, expected):
    path = tmp_path / case
    if case == "empty":
        path.write_text("# nothing yet\n")
    if case == "short":
        path.write_text(f"{KEY}\nshort-secret\n")
    with pytest.raises(CotrecError) as raised:
        load_api_keys(None, "COTREC_TEST_UNSET") if case == "unset" else load_api_keys(str(path))
    message = str(raised.value)
    assert expected in message and "\n" not in message and "short-secret" not in message
    assert case == "unset" or str(path) in message


def test_an_app_without_keys_only_on_loopback_unless_insecure(tmp_path):
    assert checked_access("127.0.0.1")["allow_unauthenticated"] is True
    assert checked_access("::1")["allow_unauthenticated"] is True
    for host in ("0.0.0.0", "10.1.2.3", "my-host"):
        with pytest.raises(CotrecError, match="needs API keys"):
            checked_access(host)
        assert checked_access(host, insecure=True)["allow_unauthenticated"] is True
    keys = tmp_path / "keys"
    keys.write_text(KEY)
    keyed = checked_access("0.0.0.0", {"api_keys_file": str(keys)})
    assert keyed == {"api_keys_file": str(keys.resolve())}  # absolute: the replicas run elsewhere


def test_cotrec_serve_refuses_a_public_address_without_keys_with_one_line(cli, tmp_path):
    """Before Ray or the run directory are touched (red when checked_access admits any host: the
    command goes on to open the run directory)."""
    refused = cli("serve", "--run-dir", str(tmp_path / "no-run"), "--host", "0.0.0.0", timeout=60)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--host 0.0.0.0" in refused.stderr and "--api-keys-file" in refused.stderr
    missing = cli("serve", "--run-dir", str(tmp_path / "no-run"), "--api-keys-file", str(tmp_path / "keys"), timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such API key file" in missing.stderr
    horizon = cli("serve", "--run-dir", str(tmp_path / "no-run"), "--open-horizons", "valid,later", timeout=60)
    assert horizon.returncode == 2 and horizon.stderr.count("\n") == 1 and "--open-horizons" in horizon.stderr
    absent = cli("serve", "--run-dir", str(tmp_path / "no-run"), timeout=60)  # loopback, no keys: allowed, no run
    assert absent.returncode == 2 and absent.stderr.count("\n") == 1 and "not a prepared run directory" in absent.stderr
    assert not (tmp_path / "no-run").exists()


# ---------------------------------------------------------------------------------------------
# the Ingress's routes and access args (cotrec/serve_app.py), without Serve


def ingress(**access):
    """The Ingress's route methods on a stand-in replica whose retrieval answers with a user's data."""
    from cotrec.serve_app import Ingress

    async def retrieve(request):
        return {"user_idx": 3, "horizon": request.get("horizon"), "items": [{"item_id": "i1", "score": 1.0}]}

    replica = SimpleNamespace(expose_preferences=access.get("expose_preferences", False),
                              open_horizons=frozenset(access.get("open_horizons", ())), top_m=10, ranker=None,
                              retrieve=retrieve, user_preference=lambda user_id: dict(USER_DATA))
    return Ingress.func_or_class, replica


def test_the_preference_route_is_404_unless_exposed():
    """Red when the route does not check expose_preferences: the user's preference text comes back."""
    routes, replica = ingress()
    with pytest.raises(HTTPException) as raised:
        asyncio.run(routes.preference(replica, "u3"))
    assert raised.value.status_code == 404 and raised.value.detail == "Not Found"
    routes, replica = ingress(expose_preferences=True)
    assert asyncio.run(routes.preference(replica, "u3"))["preferences"] == USER_DATA["preferences"]


@pytest.mark.parametrize("horizon", ["valid", "test"])
def test_the_evaluation_horizons_are_403_unless_opened(horizon):
    """Red when recommend does not check open_horizons: that horizon's recommendations come back."""
    from cotrec.serve_app import RecommendRequest

    request = RecommendRequest(user_id="u3", horizon=horizon)
    other = {"valid": "test", "test": "valid"}[horizon]
    for opened in ((), (other,)):
        routes, replica = ingress(open_horizons=opened)
        with pytest.raises(HTTPException) as raised:
            asyncio.run(routes.recommend(replica, request))
        assert raised.value.status_code == 403 and repr(horizon) in raised.value.detail
    routes, replica = ingress(open_horizons=(horizon,))
    assert asyncio.run(routes.recommend(replica, request))["horizon"] == horizon
    routes, replica = ingress()  # the default horizon is always open
    assert asyncio.run(routes.recommend(replica, RecommendRequest(user_id="u3")))["items"]


def test_the_ingress_takes_its_keys_where_it_runs_and_refuses_to_start_open_unless_allowed(monkeypatch):
    from cotrec.serve_app import Ingress

    init = Ingress.func_or_class.__mro__[1].__init__  # the class under Serve's wrapper
    monkeypatch.setenv("COTREC_TEST_KEYS", KEY)
    try:
        init(SimpleNamespace(), None, None, 10, {"api_keys_env": "COTREC_TEST_KEYS", "request_timeout_s": 7})
        policy = installed_policy()
        assert policy.keys == (KEY,) and policy.timeout_s == 7 and policy.open_paths == {"/healthz"}
        install_policy(None)
        with pytest.raises(ValueError, match="allow_unauthenticated"):
            init(SimpleNamespace(), None, None, 10, {})
        assert installed_policy() is None
        init(SimpleNamespace(), None, None, 10, {"allow_unauthenticated": True})
        assert installed_policy().keys == ()
    finally:
        install_policy(None)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from retriever_data import synthetic_run

    _, run = synthetic_run(tmp_path_factory.mktemp("guard") / "run", users=4, items=10, length=6)
    return run


def test_app_builder_hands_the_access_args_to_the_ingress(small_run):
    """Red when app_builder binds the Ingress without them: every replica would start without keys."""
    from cotrec.serve_app import app_builder

    args = {"run_dir": str(small_run.root), "variant": "none/random", "ranker": "none",
            "api_keys_file": "/etc/cotrec/keys", "api_keys_env": "COTREC_API_KEYS", "expose_preferences": True,
            "open_horizons": ["test"], "request_timeout_s": 30}
    ingress_args = app_builder(args)._bound_deployment.init_args
    assert ingress_args[-1] == {key: args[key] for key in ("api_keys_file", "api_keys_env", "expose_preferences",
                                                           "open_horizons", "request_timeout_s")}
    assert app_builder({**args, "api_keys_file": None, "api_keys_env": None, "allow_unauthenticated": True}
                       )._bound_deployment.init_args[-1]["allow_unauthenticated"] is True


@pytest.mark.parametrize("change,named", [
    ({"api_keys_file": None, "api_keys_env": None}, "no API keys"),
    ({"open_horizons": "test"}, "args.open_horizons"), ({"open_horizons": ["train"]}, "args.open_horizons"),
    ({"expose_preferences": "yes"}, "args.expose_preferences"), ({"request_timeout_s": 0}, "args.request_timeout_s"),
])
def test_app_builder_refuses_bad_access_args_naming_the_arg(small_run, change, named):
    from cotrec.serve_app import app_builder

    args = {"run_dir": str(small_run.root), "ranker": "none", "api_keys_env": "COTREC_API_KEYS", **change}
    with pytest.raises(ValueError, match=named):
        app_builder({k: v for k, v in args.items() if v is not None})
