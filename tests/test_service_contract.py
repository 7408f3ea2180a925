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

from export.runtime import load_bundle
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
