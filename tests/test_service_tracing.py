"""Tracing over real HTTP: the in-process server with the SDK's in-memory exporter as its tracer
provider (service.tracing uses a provider already installed), a real redis-server and bundle."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service import logs, tracing
from tests.test_service_api import loaded_data, request, serve, settings_for

EXPORTER = InMemorySpanExporter()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = {"profile_read", "feature_assembly", "inference", "response"}


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)
    return loaded_data(tiny_data, redis_server.url)


@contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """The service logger's JSON lines (at debug: every request writes one)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(logs.LOGGER_NAME)
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_request_is_a_server_span_under_the_callers_with_the_stages_as_children(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, tracing=True, log_level="debug")
    EXPORTER.clear()
    with serve(settings) as client, captured_log() as stream:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1"}
        r = client.post("/rerank", json=request(data, request_id="traced-1", n=7), headers=headers)
        assert r.status_code == 200, r.text
    spans = EXPORTER.get_finished_spans()
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert server.name == "POST /rerank"
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    assert server.context.trace_state.get("vendor") == "1"
    attrs = server.attributes
    assert attrs["http.request.method"] == "POST" and attrs["url.path"] == "/rerank"
    assert attrs["http.response.status_code"] == 200
    assert attrs["psad.request_id"] == "traced-1" and attrs["psad.candidates"] == 7
    assert tuple(attrs["psad.degraded_reasons"]) == ()
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
    assert set(children) == STAGES
    for child in children.values():
        assert child.context.trace_id == server.context.trace_id
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    assert children["inference"].attributes["psad.batch_size"] == 1
    assert children["feature_assembly"].end_time == children["inference"].start_time
    (line,) = [x for x in lines(stream) if x.get("request_id") == "traced-1"]
    assert line["trace_id"] == TRACE_ID and line["span_id"] == format(server.context.span_id, "016x")
    startup = [x for x in lines(stream) if x.get("request_id") is None]
    assert all("trace_id" not in x for x in startup)


def test_without_a_traceparent_a_request_starts_its_own_trace(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, otlp_endpoint="http://127.0.0.1:9")
    EXPORTER.clear()
    with serve(settings) as client:
        assert client.post("/rerank/batch", json={"requests": [request(data), request(data)]}).status_code == 200
        assert client.post("/rerank", json={"candidates": []}).status_code == 422
    server = [s for s in EXPORTER.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [s.name for s in server] == ["POST /rerank/batch", "POST /rerank"]
    assert server[0].parent is None and server[0].attributes["psad.lists"] == 2
    assert server[1].attributes["http.response.status_code"] == 422


def test_a_request_its_caller_did_not_sample_exports_nothing_but_logs_its_trace(tiny_bundle, redis_server, data):
    """traceparent flags 00: the default parent-based sampler records nothing for it (no stage span
    either), while its log line still carries the caller's trace id for correlation."""
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, tracing=True, log_level="debug")
    EXPORTER.clear()
    with serve(settings) as client, captured_log() as stream:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
        assert client.post("/rerank", json=request(data, request_id="unsampled"), headers=headers).status_code == 200
    assert EXPORTER.get_finished_spans() == ()
    (line,) = [x for x in lines(stream) if x.get("request_id") == "unsampled"]
    assert line["trace_id"] == TRACE_ID


def test_tracing_off_records_no_spans_and_logs_no_ids(tiny_bundle, redis_server, data):
    settings = settings_for(tiny_bundle.parents[1], redis_server.url, log_level="debug")
    EXPORTER.clear()
    with serve(settings) as client, captured_log() as stream:
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        assert client.post("/rerank", json=request(data, request_id="untraced"), headers=headers).status_code == 200
    assert tracing.TRACER is None
    assert EXPORTER.get_finished_spans() == ()
    (line,) = [x for x in lines(stream) if x.get("request_id") == "untraced"]
    assert "trace_id" not in line and "span_id" not in line


def test_tracing_on_without_opentelemetry_names_the_setting_and_the_fix() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    code = """
import sys
sys.modules["opentelemetry.sdk"] = None
from service import tracing
try:
    tracing.setup(True, None)
except RuntimeError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "PSAD_TRACING" in done.stdout and tracing.INSTALL in done.stdout, done.stderr
