"""The Ray Serve chain on 127.0.0.1: responses, validation, and --via-serve == offline metrics.

A small synthetic run (the retriever tests' learnable walk) with the real embedded model as a
zero-shot ranker on the transformers backend (it starts in seconds inside a replica).
"""

from __future__ import annotations

import httpx
import pytest

from cotrec.ranker.stage import ranker_eval
from cotrec.retriever import train_variant
from cotrec.serving import evaluate_via_serve, free_port, start_app, stop_app
from conftest import FLOAT32
from retriever_data import FAST_RETRIEVER, fake_extraction, synthetic_run

# float32: the served ranker's probabilities must equal the offline ones (see conftest.FLOAT32)
SMALL = FAST_RETRIEVER + ("llm.backend=transformers", "ranker.mapb=false", FLOAT32)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("serve")
    config, run = synthetic_run(root / "run", users=30, config_overrides=SMALL)
    train_variant(config, run, "none/random")
    fake_extraction(run)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        url = start_app(run.root, "none/random", "llm/zero-shot", port=free_port())
        yield config, run, url
    finally:
        stop_app()
        ray.shutdown()


@pytest.mark.slow
def test_recommend_health_preference_and_validation(served):
    _, _, url = served
    with httpx.Client(base_url=url, timeout=120) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["retriever"]["users"] == 30
        reply = client.post("/recommend", json={"user_id": "u3", "k": 5})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert len(body["items"]) == 5 and body["items"][0]["caption"] and "retrieve_ms" in body["latency"]
        scores = [row["retriever_score"] for row in body["items"]]
        assert scores == sorted(scores, reverse=True)
        # the k -> k+1 walk: the next catalogue item after u3's last one is among the top 5
        reranked = client.post("/recommend", json={"user_id": "u3", "k": 10, "rerank": True}).json()
        assert len(reranked["items"]) == 10 and reranked["reranked"] and "rerank_ms" in reranked["latency"]
        assert {r["item_id"] for r in reranked["items"]} >= {r["item_id"] for r in body["items"]}
        assert abs(sum(r["ranker_prob"] for r in reranked["items"]) - 1) < 1e-6
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
    retrieval = evaluate_via_serve(run, url, "none/random", "none")
    assert retrieval["users"] == 30 and retrieval["equal"], retrieval
    ranker_eval(config, run, "none/random", "llm/zero-shot")
    reranked = evaluate_via_serve(run, url, "none/random", "llm/zero-shot")
    assert reranked["equal"], reranked
