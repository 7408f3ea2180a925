"""The reranking API over real HTTP: a uvicorn server in a thread, a real redis-server, a real bundle."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from psad.load_profiles import bulk_load
from service.app import create_app
from service.http import uvicorn_options
from service.settings import Settings, SettingsError, load_settings, usable_cpus
from tests.conftest import free_port

PREFIX = "apitest"


@contextmanager
def serve(settings: Settings, app: FastAPI | None = None) -> Iterator[httpx.Client]:
    """The real app (lifespan included), or `app` made by create_app(settings), on a free port;
    yields a client bound to it."""
    port = free_port()
    options = uvicorn_options(settings)  # the connection limits `psad serve` runs with
    config = uvicorn.Config(app or create_app(settings), host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service failed to start; see the log above")
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def settings_for(repo: Path | str, redis_url: str, **overrides: object) -> Settings:
    """The service's settings for a test. The profile-read budget is 1 s unless a test sets it: the
    5 ms default is a production budget, and a loaded CI machine would degrade healthy reads."""
    overrides.setdefault("redis_budget_ms", 1000)
    return load_settings(model_repo=repo, redis_url=redis_url, key_prefix=PREFIX, device="cpu", **overrides)


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def loaded_data(tiny_data: Path, redis_url: str) -> dict:
    """The tiny data set's profiles loaded into Redis; returns its users and items."""
    bulk_load(redis_url, tiny_data, prefix=PREFIX, ttl_s=0, progress=False)
    users = pd.read_parquet(tiny_data / "users.parquet")["user_id"].tolist()
    items = json.loads((tiny_data / "vocab.json").read_text())["items"]
    return {"users": users, "items": items}


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    return loaded_data(tiny_data, redis_server.url)


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, redis_server, data) -> Iterator[httpx.Client]:
    settings = settings_for(
        tiny_bundle.parents[1], redis_server.url, admin_token="secret", enable_floor_endpoint=True, max_candidates=50
    )
    with serve(settings) as c:
        yield c


def request(data: dict, user: str | None = None, n: int = 10, **extra: object) -> dict:
    cands = [{"item_id": item, "score": 1.0 - k / n} for k, item in enumerate(data["items"][:n])]
    return {"user_id": user or data["users"][0], "candidates": cands, **extra}


def test_happy_path_reorders_the_given_items(client, data):
    body = request(data, request_id="req-1", top_k=5)
    r = client.post("/rerank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["request_id"] == "req-1" and r.headers["x-request-id"] == "req-1"
    assert out["model_version"] == "1" and out["degraded"] is False and out["degraded_reasons"] == []
    full = client.post("/rerank", json=request(data)).json()["items"]
    assert sorted(i["item_id"] for i in full) == sorted(c["item_id"] for c in body["candidates"])
    scores = [i["score"] for i in full]
    assert scores == sorted(scores, reverse=True)
    assert [i["item_id"] for i in out["items"]] == [i["item_id"] for i in full[:5]]


def test_profile_personalises_and_cold_start_and_unknown_items_are_served(client, data):
    known = client.post("/rerank", json=request(data)).json()
    cold = client.post("/rerank", json=request(data, user="never-seen-user")).json()
    assert not cold["degraded"]
    assert [i["score"] for i in known["items"]] != [i["score"] for i in cold["items"]]
    unknown = {"user_id": "never-seen-user", "candidates": [{"item_id": "new-a"}, {"item_id": "new-b"}]}
    r = client.post("/rerank", json=unknown)
    assert r.status_code == 200 and {i["item_id"] for i in r.json()["items"]} == {"new-a", "new-b"}
    assert len(r.json()["request_id"]) == 32  # generated uuid4 hex


def test_request_id_from_header(client, data):
    r = client.post("/rerank", json=request(data), headers={"X-Request-ID": "from-header"})
    assert r.json()["request_id"] == "from-header" and r.headers["x-request-id"] == "from-header"
    r = client.post("/rerank", json=request(data), headers={"X-Request-ID": "not usable"})  # a space: replaced
    assert r.status_code == 200 and len(r.json()["request_id"]) == 32 and r.headers["x-request-id"] != "not usable"


@pytest.mark.parametrize("rid", ["r\u00e9q-1", "two words", "line\r\nbreak", "nul\u0000"])
def test_request_ids_that_a_header_cannot_carry_answer_422(client, data, rid):
    r = client.post("/rerank", json=request(data, request_id=rid))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "request_id"]


def test_integers_beyond_64_bits_answer_422_and_the_connection_keeps_serving(client, data):
    huge = 10**30
    r = client.post("/rerank", json=request(data, n=3, top_k=huge))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top_k"]
    assert str(huge) in r.text  # echoed as the input, though orjson cannot encode it
    r = client.post("/events", json={"user_id": "u", "item_id": "a", "action": "click", "timestamp": -huge})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "single", "timestamp"]
    assert client.post("/rerank", json=request(data)).status_code == 200


def test_timestamps_far_ahead_of_the_clock_answer_422(client, data):
    millis = int(time.time() * 1000)  # the usual mistake: milliseconds sent as seconds
    r = client.post("/events", json={"user_id": "u", "item_id": "a", "action": "click", "timestamp": millis})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "timestamp"]
    assert "milliseconds" in r.json()["detail"][0]["msg"]
    r = client.post("/rerank", json=request(data, context={"timestamp": millis}))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "context", "timestamp"]
    soon = int(time.time()) + 60  # within the default clock skew of an hour
    assert client.post("/rerank", json=request(data, context={"timestamp": soon})).status_code == 200


def test_bodies_over_the_limit_answer_413_before_parsing(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, max_body_bytes=2048)
    big = json.dumps(request(data, n=60)).encode()
    events = json.dumps({"events": [{"user_id": "u", "item_id": "a" * 100, "action": "click"}] * 30}).encode()
    assert min(len(big), len(events)) > 2048

    def streamed(body: bytes) -> Iterator[bytes]:  # no Content-Length: counted as the chunks arrive
        yield from (body[i : i + 512] for i in range(0, len(body), 512))

    with serve(settings) as c:
        for path, body in (("/rerank", big), ("/rerank/batch", big), ("/events", events)):
            for content in (body, streamed(body)):
                r = c.post(path, content=content, headers={"content-type": "application/json"})
                assert r.status_code == 413 and "max_body_bytes=2048" in r.json()["detail"], path
        assert c.post("/rerank", json=request(data, n=5)).status_code == 200


def test_events_of_a_user_whose_keys_are_unusable_are_reported_and_the_others_stored(client, redis_server):
    import redis

    store = redis.Redis.from_url(redis_server.url)
    store.set(f"{PREFIX}:{{wrong-type}}:h", "not a sorted set")
    events = [
        {"user_id": "wrong-type", "item_id": "a", "action": "click", "event_id": "w1"},
        {"user_id": "fine-user", "item_id": "a", "action": "click", "event_id": "w2"},
    ]
    r = client.post("/events", json={"events": events})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "'wrong-type'" in r.json()["detail"] and "WRONGTYPE" in r.json()["detail"]
    assert store.zcard(f"{PREFIX}:{{fine-user}}:h") == 1


def test_an_error_escaping_every_handler_is_counted_as_500():
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import REGISTRY

    from service.metrics import MetricsMiddleware

    async def app(scope, receive, send):
        raise RuntimeError("escaped")

    labels = {"route": "/escape-test", "status": "500"}
    before = REGISTRY.get_sample_value("psad_requests_total", labels) or 0.0
    with pytest.raises(RuntimeError):
        asyncio.run(MetricsMiddleware(app)({"type": "http", "route": SimpleNamespace(path="/escape-test")}, None, None))
    assert REGISTRY.get_sample_value("psad_requests_total", labels) == before + 1


def _too_many(d):
    return request(d, n=60)  # max_candidates=50 in this module


INVALID = {
    "too_many_candidates": (_too_many, ["body", "candidates"]),
    "empty_candidates": (lambda d: {"user_id": "u", "candidates": []}, ["body", "candidates"]),
    "duplicate_ids": (
        lambda d: {"user_id": "u", "candidates": [{"item_id": "a"}, {"item_id": "a"}]},
        ["body", "candidates", 1, "item_id"],
    ),
    "long_id": (
        lambda d: {"user_id": "u", "candidates": [{"item_id": "x" * 200}]},
        ["body", "candidates", 0, "item_id"],
    ),
    "long_user": (lambda d: {"user_id": "u" * 200, "candidates": [{"item_id": "a"}]}, ["body", "user_id"]),
    "top_k_above_list": (lambda d: request(d, n=3, top_k=4), ["body", "top_k"]),
    "top_k_zero": (lambda d: request(d, n=3, top_k=0), ["body", "top_k"]),
    "top_k_as_bool": (lambda d: request(d, n=3, top_k=True), ["body", "top_k"]),
    "score_as_string": (
        lambda d: {"user_id": "u", "candidates": [{"item_id": "a", "score": "0.5"}]},
        ["body", "candidates", 0, "score"],
    ),
    "unknown_feature": (
        lambda d: {"user_id": "u", "candidates": [{"item_id": "a", "features": {"colour": 1.0}}]},
        ["body", "candidates", 0, "features"],
    ),
    "negative_timestamp": (lambda d: request(d, context={"timestamp": -1}), ["body", "context", "timestamp"]),
    "score_for_some_only": (
        lambda d: {"user_id": "u", "candidates": [{"item_id": "a", "score": 1}, {"item_id": "b"}]},
        ["body", "candidates", 1, "score"],
    ),
    "unknown_field": (lambda d: request(d, colour="red"), ["body", "colour"]),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_requests_answer_422_naming_the_field(client, data, case):
    make, loc = INVALID[case]
    r = client.post("/rerank", json=make(data))
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]], r.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"1e999", b"1e39"])
def test_non_finite_numbers_are_rejected(client, literal):
    raw = b'{"user_id": "u", "candidates": [{"item_id": "a", "score": ' + literal + b"}]}"
    r = client.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "candidates", 0, "score"]


def test_batch_matches_single_requests(client, data):
    bodies = [request(data, user=u, request_id=f"b{k}") for k, u in enumerate(data["users"][:3])]
    r = client.post("/rerank/batch", json={"requests": bodies})
    assert r.status_code == 200, r.text
    answers = r.json()["responses"]
    assert [a["request_id"] for a in answers] == ["b0", "b1", "b2"]
    for body, answer in zip(bodies, answers, strict=True):
        single = client.post("/rerank", json=body).json()
        assert [i["item_id"] for i in single["items"]] == [i["item_id"] for i in answer["items"]]
        assert [i["score"] for i in single["items"]] == pytest.approx([i["score"] for i in answer["items"]], abs=1e-5)
    bad = client.post("/rerank/batch", json={"requests": [bodies[0], {"user_id": "u", "candidates": []}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "requests", 1, "candidates"]


def test_floor_endpoint_sorts_by_the_given_score(client, data):
    body = request(data, n=4)
    body["candidates"][2]["score"] = 10.0
    out = client.post("/bench/floor", json=body).json()
    assert out["items"][0]["item_id"] == body["candidates"][2]["item_id"]
    assert [i["score"] for i in out["items"]] == sorted((c["score"] for c in body["candidates"]), reverse=True)


def test_events_validate_the_action_and_are_stored(client, data, redis_server):
    r = client.post("/events", json={"user_id": "ev-user", "item_id": "a", "action": "purchase"})
    assert r.status_code == 422 and "view" in r.json()["detail"][0]["msg"]
    single = {"user_id": "ev-user", "item_id": data["items"][0], "action": "click", "timestamp": 100, "event_id": "e1"}
    assert client.post("/events", json=single).json() == {"accepted": 1}
    assert client.post("/events", json=single).json() == {"accepted": 1}  # a retry: same event id, stored once
    for retry in ({**single, "timestamp": 101}, {k: v for k, v in single.items() if k != "timestamp"}):
        assert client.post("/events", json=retry).json() == {"accepted": 1}  # another timestamp: still once
    batch = {"events": [{**single, "event_id": f"e{k}", "timestamp": 100 + k} for k in range(2, 5)]}
    assert client.post("/events", json=batch).json() == {"accepted": 3}
    import redis

    assert redis.Redis.from_url(redis_server.url).zcard(f"{PREFIX}:{{ev-user}}:h") == 4


def test_admin_reload_needs_the_token(client):
    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post("/admin/reload", headers={"Authorization": "Basic secret"}).status_code == 401
    ok = client.post("/admin/reload", headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200 and ok.json()["result"] == "unchanged"
    assert client.post("/admin/reload", headers={"Authorization": "bearer secret"}).status_code == 200


def test_admin_is_disabled_without_a_token(tiny_bundle, redis_server, data):
    with serve(settings_for(tiny_bundle.parents[1], redis_server.url)) as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 403
        assert c.post("/bench/floor", json=request(data)).status_code == 404


def test_health_and_metrics(client, data):
    assert client.get("/livez").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["version"] == 1 and ready.json()["redis"] == "ok"
    assert ready.json()["profiles"] == "loaded"  # the data fixture's bulk_load wrote the marker
    key = ("psad_requests_total", (("route", "/rerank"), ("status", "200")))
    before = metric_samples(client).get(key, 0.0)
    client.post("/rerank", json=request(data))
    after = metric_samples(client)
    assert after[key] == before + 1
    for stage in ("profile_read", "feature_assembly", "inference", "response"):
        assert after[("psad_stage_duration_seconds_count", (("stage", stage),))] >= 1
    assert ("psad_request_duration_seconds_bucket", (("le", "0.0001"), ("route", "/rerank"))) in after
    assert any(name == "psad_model_info" and value == 1.0 for (name, _), value in after.items())
    assert after[("psad_candidates_per_request_count", ())] >= 1


def test_routes_are_labelled_by_their_template_and_strays_as_unmatched(client):
    """FastAPI's own pages are routes like the others; random paths share one label."""
    client.get("/openapi.json")
    client.get("/no/such/path/1")
    client.get("/no/such/path/2")
    samples = metric_samples(client)
    assert samples[("psad_requests_total", (("route", "/openapi.json"), ("status", "200")))] >= 1
    routes = {dict(labels)["route"] for name, labels in samples if name == "psad_requests_total"}
    assert "unmatched" in routes and not any(r.startswith("/no/") for r in routes)


@pytest.mark.parametrize(
    "field, value, variable",
    [
        ("threads", 0, "PSAD_THREADS"),
        ("key_prefix", "a{b", "PSAD_KEY_PREFIX"),
        ("model_version", "v2", "PSAD_MODEL_VERSION"),
        ("processes", 0, "PSAD_PROCESSES"),
        ("model_name", "../elsewhere", "PSAD_MODEL_NAME"),
        ("inference_workers", 0, "PSAD_INFERENCE_WORKERS"),
    ],
)
def test_bad_settings_name_the_variable(field, value, variable):
    with pytest.raises(SettingsError, match=variable):
        load_settings(**{field: value})


def test_misspelt_variables_are_refused_with_the_likely_setting(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PSAD_LOADTEST_DATA", "data/demo")  # another tool's variable: left alone
    monkeypatch.setenv("PSAD_REDIS_ULR", "redis://elsewhere:6379/0")
    with pytest.raises(SettingsError, match="PSAD_REDIS_ULR: not a setting; did you mean PSAD_REDIS_URL"):
        load_settings()
    monkeypatch.delenv("PSAD_REDIS_ULR")
    assert load_settings().redis_url == "redis://127.0.0.1:6379/0"


def test_usable_cpus_honours_a_cgroup_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr("service.settings.CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cpus() == 64  # no quota file
    cpu_max.write_text("max 100000\n")
    assert usable_cpus() == 64
    cpu_max.write_text("150000 100000\n")  # docker --cpus 1.5
    assert usable_cpus() == 2


def test_inference_threads_default_to_the_process_share_of_the_cpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PSAD_INFERENCE_WORKERS", raising=False)
    monkeypatch.setattr("service.settings.usable_cpus", lambda: 8)
    assert load_settings().inference_workers == 4  # one process: at most 4
    assert load_settings(processes=4).inference_workers == 2
    assert load_settings(processes=16).inference_workers == 1
    assert load_settings(processes=4, inference_workers=3).inference_workers == 3  # set: kept


@pytest.mark.parametrize("path", ["/rerank", "/bench/floor", "/rerank/batch"])
def test_unparseable_bodies_answer_422(client, path):
    empty = client.post(path, content=b"", headers={"content-type": "application/json"})
    assert empty.status_code == 422 and empty.json()["detail"][0]["loc"] == ["body"]
    broken = client.post(path, content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    wrong = client.post(path, json=[1, 2])
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body"]


def test_hot_routes_keep_their_http_semantics_and_schema(client, data):
    assert client.get("/rerank").status_code == 405  # other methods still go through FastAPI's router
    assert client.post("/rerank/", json=request(data)).status_code in (307, 404)
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/rerank"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RerankRequest")
    assert [p["name"] for p in op["parameters"]] == ["x-request-id"]
    assert "parameters" not in spec["paths"]["/rerank/batch"]["post"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/RerankResponse")
    answers = {path: set(ops[m]["responses"]) for path, ops in spec["paths"].items() for m in ops}
    assert {"200", "413", "422"} <= answers["/rerank"] and {"413", "503"} <= answers["/events"]
    assert {"401", "403", "409"} <= answers["/admin/reload"] and "503" in answers["/readyz"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    key = ("psad_requests_total", (("route", "/rerank"), ("status", "422")))
    before = metric_samples(client).get(key, 0.0)
    client.post("/rerank", json={"user_id": "u", "candidates": []})
    assert metric_samples(client)[key] == before + 1


def test_an_unexpected_error_answers_500_and_is_logged(client, data, monkeypatch):
    from service import api

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "check_rerank", boom)
    r = client.post("/rerank", json=request(data), headers={"X-Request-ID": "rid-500"})
    assert r.status_code == 500 and "RuntimeError" in r.json()["detail"]
