"""One error contract for every route, and a schema that states what the server enforces: checked
by hand-made hostile bodies and by schemathesis, generating requests from /openapi.json against
the real server (a real redis-server, a real bundle)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from export.runtime import load_bundle
from service import api, routes
from service.app import create_app
from tests.test_service_api import loaded_data, request, serve, settings_for

ADMIN = {"Authorization": "Bearer secret"}
JSON_TYPE = {"Content-Type": "application/json"}
FUZZ_CASES = 1000  # at least this many generated requests, all answered within the schema


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    return loaded_data(tiny_data, redis_server.url)


@pytest.fixture(scope="module")
def contract(tiny_bundle: Path, redis_server, data) -> Iterator[httpx.Client]:
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, admin_token="secret", max_candidates=50)
    with serve(settings) as c:
        yield c


def bodies(data: dict) -> dict[str, dict]:
    """A valid body per body route; the malformed ones below are derived from these."""
    return {
        "/rerank": request(data),
        "/rerank/batch": {"requests": [request(data)]},
        "/events": {"user_id": "u", "item_id": data["items"][0], "action": "click", "event_id": "contract"},
        "/admin/reload": {"version": 1},
    }


MALFORMED = {
    "invalid UTF-8": b'{"user_id": "\xff\xfe"}',
    "a 5,000-digit integer": b'{"version": ' + b"9" * 5000 + b"}",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "truncated JSON": b'{"user_id": ',
}


@pytest.mark.parametrize("path", ["/rerank", "/rerank/batch", "/events", "/admin/reload"])
@pytest.mark.parametrize("what", list(MALFORMED))
def test_every_body_route_answers_malformed_json_with_a_422_naming_it(contract, path, what):
    r = contract.post(path, content=MALFORMED[what], headers={**JSON_TYPE, **ADMIN})
    assert r.status_code == 422, (what, r.status_code, r.text)
    errors = r.json()["detail"]
    assert errors and all(e["loc"][0] == "body" and e["msg"] for e in errors)


@pytest.mark.parametrize("path", ["/rerank", "/rerank/batch", "/events", "/admin/reload"])
def test_every_body_route_refuses_a_non_json_content_type_and_reads_a_missing_one_as_json(contract, data, path):
    body = json.dumps(bodies(data)[path]).encode()
    r = contract.post(path, content=body, headers={"Content-Type": "text/plain", **ADMIN})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert contract.post(path, content=body, headers={"Content-Type": content_type, **ADMIN}).status_code == 200
    assert contract.post(path, content=body, headers=ADMIN).status_code == 200  # no Content-Type: JSON


def test_admin_reload_checks_the_token_before_it_reads_the_body(contract):
    bad = MALFORMED["invalid UTF-8"]
    assert contract.post("/admin/reload", content=bad, headers=JSON_TYPE).status_code == 401
    wrong = {**JSON_TYPE, "Authorization": "Bearer wrong"}
    assert contract.post("/admin/reload", content=bad, headers=wrong).status_code == 403
    assert contract.post("/admin/reload", headers=ADMIN).json()["result"] == "unchanged"  # no body: the latest


def test_the_schema_states_the_limits_and_the_models_vocabulary(contract, tiny_bundle):
    schema = contract.get("/openapi.json").json()
    models = schema["components"]["schemas"]
    bundle_schema = load_bundle(tiny_bundle, device="cpu", warmup=False).schema
    action = models["Event"]["properties"]["action"]
    assert action["enum"] == list(bundle_schema.actions)
    assert models["RerankRequest"]["properties"]["candidates"]["maxItems"] == 50
    assert models["Candidate"]["properties"]["item_id"]["maxLength"] == 128
    features = next(b for b in models["Candidate"]["properties"]["features"]["anyOf"] if b["type"] == "object")
    assert features["additionalProperties"] is False
    assert set(features["properties"]) == {f.name for f in bundle_schema.candidate_numeric} - {"rank_score"}
    declared = {s for p in schema["paths"].values() for op in p.values() for s in op["responses"]}
    assert "400" not in declared
    for path in ("/rerank", "/rerank/batch", "/events", "/admin/reload"):
        assert {"413", "415", "422"} <= set(schema["paths"][path]["post"]["responses"])


def test_each_rule_the_schema_cannot_state_is_enforced_and_named(contract, data):
    dup = request(data, n=3)
    dup["candidates"][1]["item_id"] = dup["candidates"][0]["item_id"]
    r = contract.post("/rerank", json=dup)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "candidates", 1, "item_id"]
    r = contract.post("/rerank", json=request(data, n=3, top_k=4))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top_k"]
    r = contract.post("/rerank", json=request(data, n=3, top_k=2.0))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top_k"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(contract, tmp_path):
    """Generated requests (valid and invalid) against every operation: no 5xx, and every answer's
    status, content type, headers and body are the ones the schema declares."""
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.fail("schemathesis is not installed: run `make setup` (pip install -e '.[dev]')")
    report = tmp_path / "report.json"
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance"
    cmd = [
        binary,
        "run",
        f"{contract.base_url}/openapi.json",
        "--checks",
        f"{checks},response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "220",  # per operation; the body routes get most of the cases
        "--seed",
        "15",
        "--workers",
        "2",
        "--header",
        f"Authorization: {ADMIN['Authorization']}",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--generation-database",
        "none",
        "--no-color",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache goes there
    summary = run.stdout[-4000:]
    assert run.returncode == 0, summary
    cases = json.loads(report.read_text())["test_cases"]
    assert cases["with_failures"] == 0 and cases["errored"] == 0, summary
    assert cases["generated"] >= FUZZ_CASES, summary


def test_a_reload_of_a_version_no_directory_can_be_named_is_refused_not_a_500(contract):
    r = contract.post("/admin/reload", json={"version": 10**300}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["result"] == "refused", r.text
    assert "File name too long" in r.json()["detail"] and r.json()["version"] == 1


def test_the_schema_lists_each_degradation_reason_of_the_docs(contract):
    """degraded_reasons is an enum in /openapi.json, the reasons docs/service.md's table gives."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "service.md").read_text()
    table = docs.split("## Degradation rules", 1)[1].split("\n## ", 1)[0]
    documented = {row.rsplit("|", 2)[1].strip().strip("`") for row in table.splitlines() if row.startswith("| ")}
    documented -= {"degraded_reasons", "-"}  # the header row, and the rows of /events
    schema = contract.get("/openapi.json").json()["components"]["schemas"]
    reasons = schema["RerankResponse"]["properties"]["degraded_reasons"]["items"]["$ref"].rsplit("/", 1)[1]
    assert set(schema[reasons]["enum"]) == documented == set(api.Degraded)


# One request path: FastPath and FastAPI's router answer alike ----------------------------------


async def failing(svc: routes.Svc, body: api.ReloadRequest | None = None) -> routes.JSON:
    """A body route that fails as a bug would: both paths must answer its 500 alike."""
    raise RuntimeError(f"a bug (body {body})")


def with_failing_route(app: FastAPI) -> FastAPI:
    app.router.routes.append(routes.BodyRoute("/test/fail", failing, methods=["POST"], include_in_schema=False))
    return app


def without_fast_path(app: FastAPI) -> FastAPI:
    """The app with every request through FastAPI's router: its middleware less FastPath. The stack
    is built at the first request, so this is the app that then serves."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not routes.FastPath]
    return app


@pytest.fixture(scope="module")
def both_paths(tiny_bundle: Path, redis_server, data) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The same settings served twice: as in production, and without FastPath."""
    settings = settings_for(
        tiny_bundle.parents[1], redis_server.url, admin_token="secret", max_candidates=50, enable_floor_endpoint=True
    )
    fast = with_failing_route(create_app(settings))
    routed = without_fast_path(with_failing_route(create_app(settings)))
    assert [m.cls for m in fast.user_middleware if m.cls is routes.FastPath] and routed.user_middleware
    assert routes.FastPath not in [m.cls for m in routed.user_middleware]
    with serve(settings, fast) as f, serve(settings, routed) as r:
        yield f, r


def same_requests(data: dict) -> dict[str, tuple[str, bytes, list[tuple[str, str]]]]:
    """What each case sends: path, raw body, headers (a list: a header may repeat)."""
    at = {"context": {"timestamp": 1_700_000_000}}  # a fixed request time: the same model inputs on both
    rerank = json.dumps(request(data, request_id="same-1", **at)).encode()
    anonymous = json.dumps(request(data, **at)).encode()  # its id comes from the header
    lists = [request(data, user=u, request_id=f"same-b{k}", **at) for k, u in enumerate(data["users"][:3])]
    event = {"user_id": "same-path-user", "item_id": data["items"][0], "action": "click", "event_id": "same-1"}
    typed = request(data, request_id="same-2", **at)
    typed["candidates"][0]["score"] = "0.5"
    as_json = [("Content-Type", "application/json")]
    admin = [("Authorization", ADMIN["Authorization"])]
    return {
        "200 /rerank": ("/rerank", rerank, as_json),
        "200 /rerank, the id from X-Request-ID": ("/rerank", anonymous, [*as_json, ("X-Request-ID", "same-h")]),
        "200 /rerank/batch": ("/rerank/batch", json.dumps({"requests": lists}).encode(), as_json),
        "200 /bench/floor": ("/bench/floor", rerank, as_json),
        "200 /events": ("/events", json.dumps(event).encode(), as_json),
        "200 /admin/reload": ("/admin/reload", b"", admin),
        "409 /admin/reload": ("/admin/reload", b'{"version": 99}', [*as_json, *admin]),
        "401 no token": ("/admin/reload", b'{"version": 1}', as_json),
        "401 another scheme": ("/admin/reload", b"", [("Authorization", "Basic secret")]),
        "403 a wrong token": ("/admin/reload", b"", [("Authorization", "Bearer wrong")]),
        "415": ("/rerank", rerank, [("Content-Type", "text/plain")]),
        "422 malformed JSON": ("/rerank", b'{"user_id": ', as_json),
        "422 invalid UTF-8": ("/events", b'{"user_id": "\xff\xfe"}', as_json),
        "422 a wrong type": ("/rerank", json.dumps(typed).encode(), as_json),
        "422 an unknown field": ("/events", json.dumps({**event, "colour": "red"}).encode(), as_json),
        "422 a missing body": ("/rerank", b"", as_json),
        "422 a settings limit": ("/rerank", json.dumps(request(data, n=3, top_k=4)).encode(), as_json),
        "a repeated X-Request-ID: the first": (
            "/rerank",
            anonymous,
            [*as_json, ("X-Request-ID", "same-first"), ("X-Request-ID", "same-second")],
        ),
        "a repeated Content-Type: the first": (
            "/rerank",
            rerank,
            [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
        ),
        "500": ("/test/fail", b"", []),
    }


SAME_HEADERS = ("content-type", "x-request-id", "retry-after", "www-authenticate")


def test_fast_path_and_the_router_answer_the_same_bytes(both_paths, data):
    """Each case sent to both servers: the same status, body and headers, byte for byte."""
    differ, statuses = {}, {}
    for case, (path, body, headers) in same_requests(data).items():
        answers = [client.post(path, content=body, headers=headers) for client in both_paths]
        fast, routed = ((a.status_code, a.content, [(h, a.headers.get(h)) for h in SAME_HEADERS]) for a in answers)
        if fast != routed:
            differ[case] = (fast, routed)
        statuses[case] = (answers[0].status_code, answers[0].headers.get("x-request-id"))
    assert not differ, {c: (f[0], r[0], f[2], r[2]) for c, (f, r) in differ.items()}
    assert {c: s for c, (s, _) in statuses.items() if c[0].isdigit() and s != int(c[:3])} == {}
    assert statuses["a repeated X-Request-ID: the first"] == (200, "same-first")
    assert statuses["a repeated Content-Type: the first"][0] == 415
