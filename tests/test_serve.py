"""The Ray Serve chain on 127.0.0.1: keys, closed routes, responses, validation, bad requests, and
--via-serve == offline metrics; `cotrec serve` with its defaults, stopped by SIGTERM.

A small synthetic run (the retriever tests' learnable walk) with the real embedded model as a
zero-shot ranker on the transformers backend (it starts in seconds inside a replica). The front
door's own behaviour (keys, body limit, timeout, 500s) is tested without Ray in test_guard.py;
here, that it stands in front of the deployed app, through Serve's proxy and at the Ingress
replica's own port (direct ingress). Each Serve start costs tens of seconds: two in this module.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cotrec.ranker.evaluate import ranker_eval
from cotrec.retriever import train_variant
from cotrec.serving import apply_serve_env, direct_urls, evaluate_via_serve, free_port, start_app, stop_app
from conftest import FLOAT32, REPO
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

# float32: the served ranker's probabilities must equal the offline ones (see conftest.FLOAT32)
SMALL = FAST_RETRIEVER + ("llm.backend=transformers", "ranker.mapb=false", FLOAT32)
KEY = "test-key-" + "0123456789abcdef" * 2
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config, run = synthetic_run(root / "run", users=30, config_overrides=SMALL)
    train_variant(config, run, "none/random")
    fake_extraction(run)
    return config, run


@pytest.mark.slow
def test_cotrec_serve_with_its_defaults_and_stopped_by_sigterm(trained, tmp_path):
    """`cotrec serve` as a user starts it (loopback, no keys): the preference route and the
    evaluation horizons are closed; SIGTERM (what Docker, systemd and Kubernetes send) stops it
    like Ctrl-C: exit 0, no stack dump (red with Ray's own SIGTERM handler: it aborts, status -6).
    First in the module: its Ray is gone before the `served` fixture starts one."""
    _, run = trained
    url = f"http://127.0.0.1:{free_port()}"
    output = tmp_path / "serve.out"
    with output.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "cotrec", "serve", "--run-dir", str(run.root), "--variant",
                                   "none/random", "--ranker", "none", "--port", url.rsplit(":", 1)[1]], cwd=REPO,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while "\nserving " not in "\n" + output.read_text():
            assert server.poll() is None and time.monotonic() < deadline, output.read_text()[-3000:]
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/recommend", json={"user_id": "u3", "k": 3}).status_code == 200  # open on loopback
            assert client.get("/users/u3/preference").status_code == 404
            for horizon in ("valid", "test"):
                closed = client.post("/recommend", json={"user_id": "u3", "horizon": horizon})
                assert closed.status_code == 403 and "open_horizons" in closed.json()["detail"]
            assert client.get("/healthz").json() == {"status": "ok"}
        # the Ingress replica's own port, printed beside the proxy's: the same app without the proxy
        direct = re.search(r"the Ingress replica at (http://127\.0\.0\.1:\d+)", output.read_text())
        assert direct and direct[1] != url, output.read_text()[-3000:]
        assert httpx.post(direct[1] + "/recommend", json={"user_id": "u3", "k": 3}, timeout=60).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, output.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = output.read_text()
    assert "serve: stopping" in log and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """The app with an API key, the preference route on and the test horizon open (what --via-serve
    asks for); every client below sends the key."""
    import ray

    config, run = trained
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# the suite's key\n{KEY}\n")
    apply_serve_env()  # what `cotrec serve` runs with: the controller and replicas read it at their start
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        url = start_app(run.root, "none/random", "llm/zero-shot", port=free_port(),
                        access={"api_keys_file": str(keys), "expose_preferences": True, "open_horizons": ["test"]})
        yield config, run, url
    finally:
        stop_app()
        ray.shutdown()


def run_histories(run) -> dict[str, list[int]]:
    """Each user's whole history (item_idx, in order), what `horizon: next` recommends after."""
    import pandas as pd

    inter = pd.read_parquet(run.root / "data" / "interactions.parquet").sort_values(["user_idx", "position"])
    return {f"u{user}": rows.item_idx.tolist() for user, rows in inter.groupby("user_idx")}


def keyed(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers=AUTH)


@pytest.mark.slow
def test_every_route_but_healthz_needs_the_key_and_healthz_says_only_ok(served):
    """No key or a wrong one: 401 on every route and horizon, nothing of a user in the reply
    (red without the guard: the user's data comes back)."""
    _, _, url = served
    strangers = [{}, {"authorization": "Bearer wrong-key-0123456789abcdef"}, {"authorization": f"Bearer {KEY[:-1]}"},
                 {"authorization": KEY}]
    with httpx.Client(base_url=url, timeout=120) as client:
        for headers in strangers:
            replies = [client.get("/users/u3/preference", headers=headers),
                       client.post("/recommend", json={"history": ["i10", "i11"]}, headers=headers)]
            replies += [client.post("/recommend", json={"user_id": "u3", "horizon": h}, headers=headers)
                        for h in ("next", "valid", "test")]
            for reply in replies:
                assert reply.status_code == 401 and reply.headers["www-authenticate"].startswith("Bearer"), reply.text
                assert "u3" not in reply.text and "item" not in reply.text
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
    with keyed(url) as client:
        assert client.post("/recommend", json={"user_id": "u3", "horizon": "test"}).status_code == 200
        valid = client.post("/recommend", json={"user_id": "u3", "horizon": "valid"})  # not opened
        assert valid.status_code == 403 and "'valid'" in valid.json()["detail"]


@pytest.mark.slow
def test_recommend_health_preference_and_validation(served):
    _, run, url = served
    with keyed(url) as client:
        reply = client.post("/recommend", json={"user_id": "u3", "k": 5})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert len(body["items"]) == 5 and body["items"][0]["caption"] and "retrieve_ms" in body["latency"]
        scores = [row["retriever_score"] for row in body["items"]]
        assert scores == sorted(scores, reverse=True)
        reranked = client.post("/recommend", json={"user_id": "u3", "k": 10, "rerank": True}).json()
        assert len(reranked["items"]) == 10 and reranked["reranked"] and "rerank_ms" in reranked["latency"]
        assert {r["item_id"] for r in reranked["items"]} >= {r["item_id"] for r in body["items"]}
        assert abs(sum(r["ranker_prob"] for r in reranked["items"]) - 1) < 1e-6
        # the synthetic users walk k -> k+1: the first item after a user's last one that the user has not
        # seen is in most users' top 5 (a retriever that ignored the history: about 2 of the 30)
        walks = run_histories(run)
        found = 0
        for user, history in walks.items():
            after = (history[-1] + 1) % 80
            while after in history:
                after = (after + 1) % 80
            top = client.post("/recommend", json={"user_id": user, "k": 5}).json()["items"]
            found += f"i{after}" in [row["item_id"] for row in top]
        assert found >= 15, f"{found} of {len(walks)}"
        unknown = client.post("/recommend", json={"history": ["i10", "i11", "i12"], "k": 3})
        assert unknown.status_code == 200 and len(unknown.json()["items"]) == 3
        assert client.get("/users/u3/preference").json()["preferences"]["test"]
        for bad in ({"user_id": "u3", "k": 0}, {"user_id": "u3", "k": "ten"}, {"user_id": "u3", "colour": 1},
                    {"user_id": "u3", "horizon": "later"}, {"history": []}, {}):
            assert client.post("/recommend", json=bad).status_code == 422, bad
        assert client.post("/recommend", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert client.post("/recommend", json={"user_id": "nobody"}).status_code == 404
        assert client.get("/users/nobody/preference").status_code == 404
        big = client.post("/recommend", json={"history": ["i1"] * 2001})
        assert big.status_code == 422 and "at most 2000" in big.json()["detail"]
        wrong_item = client.post("/recommend", json={"history": ["i1", "no-such-item"]})
        assert wrong_item.status_code == 422 and "no-such-item" in wrong_item.json()["detail"]


@pytest.mark.slow
def test_via_serve_metrics_equal_the_offline_metrics(served):
    config, run, url = served
    retrieval = evaluate_via_serve(run, url, "none/random", "none", api_key=KEY)
    assert retrieval["users"] == 30 and retrieval["equal"], retrieval
    sampled = config.model_copy(deep=True)
    sampled.ranker.max_eval_users = 8  # a seeded sample: the served comparison asks for the same users
    sampled.extract.cpus_per_actor = 0.25  # the scoring actor fits beside the app's replicas (1.5 of 2 CPUs)
    ranker_eval(sampled, run, "none/random", "llm/zero-shot")
    reranked = evaluate_via_serve(run, url, "none/random", "llm/zero-shot", api_key=KEY)
    assert reranked["users"] == 8 and reranked["equal"], reranked


@pytest.mark.slow
def test_an_anonymous_rerank_and_bad_requests_batched_with_good_ones(served):
    """Concurrent requests land in the same @serve.batch: the anonymous re-rank is answered (the same
    order every time), and a bad request fails alone with its own 4xx."""
    _, _, url = served
    anonymous = {"history": ["i10", "i11", "i12", "i13"], "k": 10, "rerank": True}
    bodies = [{"user_id": "u3", "rerank": True}, anonymous, {"user_id": "nobody", "rerank": True},
              {"user_id": "u5", "rerank": True}, {"history": ["i1", "no-such-item"], "rerank": True},
              {"user_id": "u7", "k": 3}, anonymous]

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=AUTH) as client:
            return await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))

    replies = asyncio.run(send_all())
    assert [r.status_code for r in replies] == [200, 200, 404, 200, 422, 200, 200], [r.text for r in replies]
    first, again = replies[1].json(), replies[6].json()
    assert first["reranked"] and len(first["items"]) == 10 and all("ranker_prob" in row for row in first["items"])
    assert [row["item_id"] for row in first["items"]] == [row["item_id"] for row in again["items"]]
    assert "nobody" in replies[2].json()["detail"] and "no-such-item" in replies[4].json()["detail"]


unicode = st.text(st.characters(exclude_categories=[]))  # every code point, lone surrogates included
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | unicode,
                           lambda children: st.lists(children, max_size=4) | st.dictionaries(unicode, children, max_size=4),
                           max_leaves=12)
request_fields = st.builds(lambda known, extra: {**extra, **known}, st.fixed_dictionaries({}, optional={
    "user_id": json_values | st.text(min_size=150, max_size=400), "history": json_values | st.lists(unicode, max_size=3),
    "k": json_values, "rerank": json_values, "horizon": json_values}), st.dictionaries(unicode, json_values, max_size=2))
bodies = (request_fields.map(lambda b: json.dumps(b).encode()) | json_values.map(lambda b: json.dumps(b).encode())
          | st.binary(max_size=200) | st.text().map(lambda t: t.encode("utf-8", "surrogatepass")))


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.text(st.characters(exclude_categories=[]), max_size=40))
def test_bad_requests_are_4xx_with_a_message_never_500(served, body, path):
    """Malformed, wrongly typed, unicode-heavy bodies and paths: a 4xx that says why (or a 200 for the
    rare body that happens to be a valid request), never a 5xx."""
    _, _, url = served
    raw = path.encode("utf-8", "surrogatepass")  # lone surrogates become bytes no UTF-8 decoder accepts
    with keyed(url) as client:
        for reply in (client.post("/recommend", content=body, headers={"content-type": "application/json"}),
                      client.get("/users/" + quote(raw, safe="") + "/preference"),
                      client.post("/" + quote(raw, safe="/").lstrip("/"), content=body)):
            assert reply.status_code < 500, (body, path, reply.status_code, reply.text[:300])
            if reply.status_code != 200:
                assert 400 <= reply.status_code < 500 and reply.json()["detail"], (body, path, reply.text[:300])


@pytest.mark.slow
def test_oversized_requests_are_refused_and_good_ones_still_served(served):
    _, _, url = served

    def chunked():  # no Content-Length: the limit is counted on the stream (test_guard.py)
        yield b'{"history": ['
        for _ in range(64):
            yield b'"i1",' * 13_000
        yield b'"i2"]}'

    with keyed(url) as client:
        huge = client.post("/recommend", content=b'{"history": [' + b'"i1",' * 300_000 + b'"i2"]}',
                           headers={"content-type": "application/json"})
        assert huge.status_code == 413 and "at most" in huge.json()["detail"]
        streamed = client.post("/recommend", content=chunked(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "at most" in streamed.json()["detail"], streamed.text[:300]
        long = client.post("/recommend", json={"history": ["i1"] * 5000})
        assert long.status_code == 422 and "at most 2000" in long.json()["detail"]
        assert client.post("/recommend", json={"user_id": "u3", "k": 5}).status_code == 200


@pytest.mark.slow
def test_a_ranker_replica_killed_under_load_fails_no_retrieval_and_comes_back(served):
    """SIGKILL the Ranker replica while requests flow: retrieval (in the Ingress) answers every
    request, a re-rank waits for the new replica (the Ingress sends the call again) or runs out its
    request timeout (504, never a 500), and re-ranks are answered again once it is up."""
    from cotrec.bench.faults import Killer

    _, _, url = served
    statuses: dict[bool, list[int]] = {True: [], False: []}
    started = time.perf_counter()

    async def load(seconds):
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=AUTH) as client:
            async def worker(n):
                while time.perf_counter() - started < seconds:
                    rerank = n == 0
                    reply = await client.post("/recommend", json={"user_id": f"u{n}", "k": 5, "rerank": rerank})
                    statuses[rerank].append(reply.status_code)
            await asyncio.gather(*(worker(n) for n in range(4)))

    with Killer("ServeReplica:cotrec:Ranker", lambda: time.perf_counter() - started > 2) as killer:
        asyncio.run(load(8))
    assert killer.killed and statuses[False] and set(statuses[False]) == {200}, statuses
    assert statuses[True] and set(statuses[True]) <= {200, 504}, statuses
    with keyed(url) as client:
        deadline = time.perf_counter() + 120
        while (code := client.post("/recommend", json={"user_id": "u3", "k": 5, "rerank": True}).status_code) != 200:
            assert code == 504 and time.perf_counter() < deadline, code


@pytest.mark.slow
def test_the_ingress_replica_answers_on_its_own_port_with_the_proxy_gone(served):
    """Direct ingress: the Ingress replica serves HTTP on a port of its own, which keeps working with
    every Serve proxy actor killed (no proxy hop), behind the same guard (401 without the key,
    /healthz open) and with a bad request failing alone in its batch; the proxy comes back (red
    without RAY_SERVE_ENABLE_DIRECT_INGRESS in serving.SERVE_ENV: no such port)."""
    import ray

    _, _, url = served
    direct = direct_urls()
    assert len(direct) == 1 and direct[0] != url, direct
    proxies = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_PROXY_ACTOR")]
    assert proxies
    for actor in proxies:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    bodies = [{"user_id": "u3", "k": 4}, {"user_id": "nobody"}, {"history": ["i1", "i2"], "k": 2}]

    async def send_all():
        async with httpx.AsyncClient(base_url=direct[0], timeout=120, headers=AUTH) as client:
            return await asyncio.gather(*(client.post("/recommend", json=b) for b in bodies))

    replies = asyncio.run(send_all())
    assert [r.status_code for r in replies] == [200, 404, 200], [r.text for r in replies]
    assert len(replies[0].json()["items"]) == 4 and replies[0].headers["x-request-id"]
    with httpx.Client(base_url=direct[0], timeout=60) as client:
        stranger = client.post("/recommend", json={"user_id": "u3"}, headers={"authorization": "Bearer wrong-key-0123456789abcdef"})
        assert stranger.status_code == 401 and "u3" not in stranger.text
        assert client.get("/healthz").json() == {"status": "ok"}
    with keyed(url) as client:  # Serve starts the proxy again
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.post("/recommend", json={"user_id": "u3", "k": 2}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the proxy did not come back"
            time.sleep(1)
