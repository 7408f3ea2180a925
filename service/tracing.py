"""OpenTelemetry tracing, opt-in (PSAD_TRACING or PSAD_OTLP_ENDPOINT): one server span per body
request (/rerank, /rerank/batch, /events, /admin/reload) with the rerank stages as its children.

Off, nothing of OpenTelemetry is imported and the request path only tests `TRACER is None`: the
SDK is an optional extra (`pip install 'psad[tracing]'`) the serving image may lack.

The stage spans are recorded after the fact from the same perf_counter readings that time
psad_stage_duration_seconds, converted to wall-clock nanoseconds. Feature assembly and inference
run in a worker thread on a micro-batch shared by several requests, so no span context crosses
into that thread: the batch records its times (BatchTiming), and each request, back on the event
loop inside its own server span, gets its own `feature_assembly` and `inference` spans with the
batch's start and end times and psad.batch_size. Log lines written while a server span is current
carry its trace_id and span_id (service.logs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

INSTALL = "pip install 'psad[tracing]'"

TRACER: Tracer | None = None  # None: tracing is off
_OFFSET_NS = 0  # wall-clock ns minus perf_counter ns
_FIELDS: frozenset[bytes] = frozenset()  # the propagator's header names, as ASGI gives them


class BatchTiming(NamedTuple):
    """perf_counter readings of one scored batch: assembly start, assembled, scored; its size."""

    start: float
    assembled: float
    end: float
    size: int


def setup(enabled: bool, endpoint: str | None) -> Callable[[], None]:
    """Turn tracing on (or leave it off); returns what flushes and stops it at shutdown.

    A tracer provider already installed (opentelemetry-instrument, or a test) is used as it is;
    else one with the OTEL_* environment (OTEL_SERVICE_NAME, default "psad"; OTEL_TRACES_SAMPLER)
    and a batch exporter over OTLP/HTTP to `endpoint` (+ /v1/traces) or OTEL_EXPORTER_OTLP_ENDPOINT."""
    global TRACER, _OFFSET_NS, _FIELDS
    if not enabled:
        TRACER = None
        return lambda: None
    try:
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            f"PSAD_TRACING / PSAD_OTLP_ENDPOINT turn tracing on, but OpenTelemetry is missing ({exc}): "
            f"{INSTALL}, or unset both"
        ) from None
    provider = trace.get_tracer_provider()
    stop: Callable[[], None] = lambda: None  # noqa: E731
    if not isinstance(provider, TracerProvider):
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "psad")})
        provider = TracerProvider(resource=resource)
        url = f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        trace.set_tracer_provider(provider)
        stop = provider.shutdown
    _FIELDS = frozenset(f.lower().encode("latin-1") for f in propagate.get_global_textmap().fields)
    _OFFSET_NS = time.time_ns() - time.perf_counter_ns()
    TRACER = provider.get_tracer("psad.service")
    return stop


def _ns(t: float) -> int:
    return int(t * 1e9) + _OFFSET_NS


@contextmanager
def server_span(scope: Mapping[str, Any]) -> Iterator[Span]:
    """The request's server span, current while it runs; its parent is the incoming traceparent."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    assert TRACER is not None
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _FIELDS}
    name = f"{scope['method']} {scope['path']}"
    attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
    with TRACER.start_as_current_span(
        name, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
    ) as span:
        yield span


def _recording() -> bool:
    """Whether the current span records: a request the sampler dropped gets no stage spans or
    attributes, so it pays for its server span only."""
    from opentelemetry import trace

    return trace.get_current_span().is_recording()


def stage(name: str, start: float, end: float, attributes: Mapping[str, Any] | None = None) -> None:
    """A finished child span of the current one, from perf_counter readings."""
    assert TRACER is not None
    if _recording():
        TRACER.start_span(name, start_time=_ns(start), attributes=attributes).end(end_time=_ns(end))


def batch(timing: BatchTiming) -> None:
    """This request's feature_assembly and inference spans, with its batch's times."""
    attributes = {"psad.batch_size": timing.size}
    stage("feature_assembly", timing.start, timing.assembled, attributes)
    stage("inference", timing.assembled, timing.end, attributes)


def annotate(request_id: str, degraded: Sequence[str], fields: Mapping[str, object]) -> None:
    """The request's own attributes on the current span (psad.request_id, psad.degraded_reasons,
    psad.<field> for each numeric field of its log line, e.g. psad.candidates)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("psad.request_id", request_id)
    span.set_attribute("psad.degraded_reasons", [str(d) for d in degraded])
    for key, value in fields.items():
        if isinstance(value, int):
            span.set_attribute(f"psad.{key}", value)


def log_ids() -> dict[str, str]:
    """trace_id and span_id (hex) of the current span; empty outside one."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
