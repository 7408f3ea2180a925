"""One log format: every line `psad serve` writes (uvicorn's, the worker supervisor's and the
service's own) is one JSON object with the same keys, and the service's lines keep their fields."""

from __future__ import annotations

import http.client
import json
import logging
from pathlib import Path

import pytest

from service.logs import JsonFormatter
from tests.test_service_cli import start_serve, stop_serve, wait_for

KEYS = {"ts", "level", "logger", "msg"}
STARTED = "Application startup complete"


def json_lines(text: str) -> list[dict]:
    lines, plain = [], []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            plain.append(line)
    assert not plain, "lines that are not JSON:\n" + "\n".join(plain)
    return lines


def rerank(port: int, request_id: str) -> dict:
    body = {"user_id": "u1", "request_id": request_id, "candidates": [{"item_id": "a"}, {"item_id": "b"}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/rerank", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return json.loads(resp.read())


@pytest.mark.parametrize("workers", [1, 2])
def test_every_line_the_server_writes_is_json_with_the_same_keys(
    tiny_bundle: Path, redis_server, workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PSAD_KEY_PREFIX", f"logtest{workers}")  # never loaded: answers flagged profiles_missing
    proc, port, log = start_serve(tiny_bundle, redis_server.url, workers, tmp_path)
    try:
        wait_for(lambda: log.read_text().count(STARTED) == workers, f"{workers} workers started", proc, log)
        assert rerank(port, "logtest-1")["degraded_reasons"] == ["profiles_missing"]
    finally:
        stop_serve(proc, log)
    lines = json_lines(log.read_text())
    assert all(set(line) >= KEYS for line in lines), [line for line in lines if not set(line) >= KEYS]
    by_logger = {line["logger"] for line in lines}
    assert {"uvicorn.error", "psad.service"} <= by_logger
    messages = [line["msg"] for line in lines]
    assert any(STARTED in m for m in messages) and any("Application shutdown complete" in m for m in messages)
    if workers > 1:
        assert "workers started" in messages  # the supervisor's own line
    (request,) = [line for line in lines if line["msg"] == "request"]
    assert request["level"] == "info" and request["route"] == "/rerank" and request["request_id"] == "logtest-1"
    assert request["degraded"] == ["profiles_missing"] and request["candidates"] == 2 and request["latency_ms"] > 0


def test_a_line_keeps_the_keys_first_then_its_fields_and_the_exception() -> None:
    """The order is part of the format: tests and log searches match `"msg":...,"pid":...`."""
    try:
        raise ValueError("boom")
    except ValueError as exc:
        record = logging.LogRecord(
            "psad.service", logging.WARNING, __file__, 1, "unhandled error", None, (type(exc), exc, None)
        )
    record.__dict__.update(path="/rerank", pid=7, color_message="\x1b[1mignored\x1b[0m")
    line = JsonFormatter().format(record)
    assert line.startswith('{"ts":') and '"level":"warning","logger":"psad.service","msg":"unhandled error"' in line
    entry = json.loads(line)
    assert entry["path"] == "/rerank" and entry["pid"] == 7 and "color_message" not in entry
    assert entry["exc"].endswith("ValueError: boom")
