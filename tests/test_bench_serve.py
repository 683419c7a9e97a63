"""`cotrec bench serve`'s bookkeeping without Ray: the hop breakdown from a reply's stamps, the
comparison with the bare process and issue 43's bar, and the bare process itself (seconds)."""

from __future__ import annotations

import httpx
import pytest

from cotrec.bench.floor import start_floor, stop_floor
from cotrec.bench.serve import CpuMeter, hop_breakdown, hops, summarize, target_check, versus_floor
from cotrec.retriever import train_variant
from cotrec.serving import free_port
from retriever_data import FAST_RETRIEVER, synthetic_run


def test_the_client_hops_are_what_the_reply_does_not_account_for():
    record = {"latency_ms": 10.0, "received_at": 100.002, "app_ms": 5.0, "parse_ms": 1.0, "retrieval_ms": 3.0}
    got = hops(record, sent_at=100.0, answered_at=100.010)
    assert got["inbound_ms"] == pytest.approx(2.0) and got["outbound_ms"] == pytest.approx(3.0)
    breakdown = hop_breakdown([{**record, **got}])
    assert breakdown["retrieval_ms"]["share"] == pytest.approx(0.3) and "handle_ms" not in breakdown
    assert hops({"latency_ms": 1.0}, 0.0, 1.0) == {}  # a reply without stamps (another server) adds none


def level(server, c, rps, p99, errors=0, mode="retrieve"):
    return {"server": server, "mode": mode, "concurrency": c, "requests_per_s": rps,
            "latency_ms": {"p50": p99 / 2, "p99": p99}, "errors": {"4xx": errors, "5xx": 0, "exceptions": 0}}


def test_the_ratio_is_of_the_medians_over_rounds_and_the_bar_is_issue_43s():
    serve = [level("serve", 8, r, 40) for r in (50, 60, 400)] + [level("serve", 32, r, 90) for r in (55, 60, 70)]
    bare = [level("bare", 8, r, 20) for r in (100, 110, 120)] + [level("bare", 32, r, 50) for r in (100, 100, 100)]
    rows = {row["concurrency"]: row for row in versus_floor(serve, bare)}
    assert rows[8]["serve"]["requests_per_s"] == {"min": 50, "median": 60, "max": 400}
    assert rows[8]["throughput_ratio"] == pytest.approx(60 / 110, abs=1e-3) and rows[32]["p99_ratio"] == 1.8
    assert target_check(list(rows.values()))["met"] is True
    proxied = {row["concurrency"]: row for row in versus_floor(serve, bare, [level("serve", 8, r, 80) for r in (20, 30, 40)])}
    assert proxied[8]["serve_via_proxy"]["requests_per_s"]["median"] == 30 and proxied[8]["via_proxy_p99_ratio"] == 4.0
    assert proxied[8]["throughput_ratio"] == rows[8]["throughput_ratio"] and "serve_via_proxy" not in proxied[32]
    slow = versus_floor(serve + [level("serve", 32, 1, 500, errors=1)] * 3, bare)
    checks = target_check(slow)["checks"]
    assert not checks["throughput_ratio_c32_at_least_0.5"] and not checks["no_errors"]


def test_cpu_per_request_leaves_the_rest_of_the_machine_as_other():
    got = CpuMeter.per_request({"proxy": 1.0, "machine": 10.0}, {"proxy": 1.5, "machine": 12.0}, 100, 1.0)
    assert got == {"proxy": 5.0, "other (not this bench)": 15.0, "cores_busy": 2.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config, run = synthetic_run(tmp_path_factory.mktemp("floor") / "run", users=12, config_overrides=FAST_RETRIEVER)
    train_variant(config, run, "none/random")
    return run


@pytest.mark.slow  # a child process that imports torch and loads the model: tens of seconds on 2 busy cores
def test_the_bare_process_answers_like_the_app(trained):
    process = start_floor(trained.root, "none/random", port := free_port())
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            reply = client.post("/recommend", json={"user_id": "u3", "k": 4})
            unknown = client.post("/recommend", json={"user_id": "nobody"})
    finally:
        stop_floor(process)
    assert process.poll() is not None
    body = reply.json()
    assert reply.status_code == 200 and len(body["items"]) == 4 and "retriever_score" in body["items"][0]
    assert unknown.status_code == 404
    summary = summarize([{"status": 200, "latency_ms": 3.0, **body["latency"], **hops(
        {"latency_ms": 3.0, **body["latency"]}, body["latency"]["received_at"] - 0.001, 0.0)}], 1.0)
    assert summary["hops_ms"]["inbound_ms"]["mean"] == pytest.approx(1.0)
