"""`python -m loadtest.service_bench.collector --port P`: an OTLP/HTTP trace endpoint that accepts
every export and drops it, for `psad bench service --tracing`.

The traced server runs its real span pipeline (the SDK's BatchSpanProcessor and the OTLP/HTTP
exporter, protobuf encoding and POSTs included) against it. It decodes each export only to count
its spans, so the benchmark can check that every span of every answered request arrived:
GET /spans answers {"exports": n, "spans": m}. It runs in its own process so that its CPU time is
measured apart from the server's and the load generator's.
"""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import orjson
import typer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from psad.procs import LOOPBACK

TRACES_PATH = "/v1/traces"
SPANS_PATH = "/spans"


def span_count(body: bytes) -> int:
    """The spans of one OTLP export request (protobuf)."""
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter reuses its connection
    counts: ClassVar[dict[str, int]] = {"exports": 0, "spans": 0}
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != TRACES_PATH:
            self.answer(404, b"", "text/plain")
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        spans = span_count(body)
        with self.lock:
            self.counts["exports"] += 1
            self.counts["spans"] += spans
        self.answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path != SPANS_PATH:
            self.answer(404, b"", "text/plain")
            return
        with self.lock:
            body = orjson.dumps(self.counts)
        self.answer(200, body, "application/json")

    def answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # the base class's name
        """No line per export."""


def main(port: int = typer.Option(..., min=1, max=65535, help="Loopback port to listen on.")) -> None:
    """Accept OTLP/HTTP trace exports on 127.0.0.1:PORT, count their spans, drop them."""
    ThreadingHTTPServer((LOOPBACK, port), Handler).serve_forever()


if __name__ == "__main__":
    typer.run(main)
