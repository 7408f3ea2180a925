"""The Open Inference Protocol (KServe v2) aliases, against a real HTTP server serving the tiny bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest

from tests.test_service_api import serve, settings_for

# ONNX Runtime's type strings -> OIP datatypes, written out here so the test does not share the service's table.
ORT_TO_OIP = {"tensor(int64)": "INT64", "tensor(float)": "FP32", "tensor(bool)": "BOOL"}


@pytest.fixture(scope="module")
def client(tiny_bundle: Path, redis_server) -> Iterator[httpx.Client]:
    with serve(settings_for(tiny_bundle.parents[1], redis_server.url)) as c:
        yield c


def test_server_metadata_and_health(client: httpx.Client) -> None:
    server = client.get("/v2")
    assert server.status_code == 200 and server.json()["name"] == "psad" and server.json()["extensions"] == []
    assert isinstance(server.json()["version"], str)
    live = client.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    ready = client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert client.get("/readyz").json()["ready"] is True  # the same decision


def test_model_ready_and_unknown_model(client: httpx.Client) -> None:
    ready = client.get("/v2/models/psad/ready")
    assert (ready.status_code, ready.json()) == (200, {"name": "psad", "ready": True})
    for path in ("/v2/models/other", "/v2/models/other/ready"):
        r = client.get(path)
        assert r.status_code == 404 and set(r.json()) == {"error"} and "'other'" in r.json()["error"], path


def test_model_metadata_matches_the_onnx_session(client: httpx.Client, tiny_bundle: Path) -> None:
    r = client.get("/v2/models/psad")
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["name"] == "psad" and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])

    def oip(args: list) -> list[dict]:
        return [
            {
                "name": a.name,
                "datatype": ORT_TO_OIP[a.type],
                "shape": [d if isinstance(d, int) else -1 for d in a.shape],
            }
            for a in args
        ]

    assert meta["inputs"] == oip(session.get_inputs())
    assert meta["outputs"] == oip(session.get_outputs())


def test_v2_routes_are_in_the_openapi_schema(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready"} <= set(paths)
    assert "404" in paths["/v2/models/{name}"]["get"]["responses"]
