"""Connection limits that uvicorn's httptools protocol lacks: a cap on the request head, and
timeouts on reading it and the body.

Why: uvicorn's httptools protocol reads a request head of any size (a huge header holds the
worker's event loop, and the health probes routed to that worker wait) and bounds only the idle
time after a response (`timeout_keep_alive`): a socket that sends nothing, half a head or half a
body stays open for ever, and thousands of them can be held at once. `LimitedHttpToolsProtocol`
adds, per connection (docs/service.md, "Connection limits"):

- a head cap: once a request head not yet complete passes `max_header_bytes`, it is answered 431
  at once and the write side is shut; what still arrives is dropped unparsed until the client
  closes or the header timer fires (a close with unread data would send a reset, and the client
  would lose the 431);
- a header timer, from the connection's start or a request's first byte to its complete head:
  on expiry a 408, or a plain close when no request had begun;
- a body timer, from the complete head to the body's last byte: on expiry a 408 when the app has
  not answered yet, and a close (the app sees http.disconnect).

Time that a connection waits on this server (a pipelined request queued behind a response, reads
paused while the app has not taken the body) does not count. `uvicorn_options()` is the one place
that turns the settings into uvicorn's keyword arguments, for `psad serve`, its workers and tests.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.settings import Settings

log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.Config keyword arguments carrying these settings' connection limits. Picklable (a
    partial of a module-level class), so spawned worker processes receive them in their config."""
    limits = HttpLimits(settings.max_header_bytes, settings.header_timeout_s, settings.body_timeout_s)
    return {
        "http": functools.partial(LimitedHttpToolsProtocol, limits=limits),
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head cap and header and body read timeouts."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.head_bytes: int | None = 0  # bytes read of the coming request head; None while a body is read
        self.refused = False  # a 431 went out: what still arrives is dropped
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    # Connection events.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.head_bytes is not None:  # a chunk that ends the head counts whole, but is then not checked
            self.head_bytes += len(data)
            self.arm_header_timer()  # CRLFs before a request start no message: they count too
        super().data_received(data)
        if (
            self.head_bytes is not None
            and self.head_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self.refuse_head()

    def handle_websocket_upgrade(self) -> None:
        self.cancel_timers()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    # Parser callbacks.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.arm_header_timer()  # a later request on a kept-alive connection: from its first byte

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        self.cancel_timers()
        self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.cancel_timers()
        self.head_bytes = 0
        super().on_message_complete()

    # Limits.
    def refuse_head(self) -> None:
        limit = self.limits.max_header_bytes
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined: a 431 would
            self.transport.close()  # land inside the response being written
            return
        log.warning("Request head over %d bytes: 431.", limit)
        self.refused = True
        self.answer(
            431, f"request head over max_header_bytes={limit}: shorten the headers, or raise PSAD_MAX_HEADER_BYTES"
        )
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the header timer, or the client's close, ends the connection
        else:  # pragma: no cover - TCP transports can
            self.transport.close()

    def header_timeout(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if not self.refused and self.cycle is not None and not self.cycle.response_complete:
            self.arm_header_timer()  # a pipelined head waits on this server's response, not on the client
        elif self.refused or not self.head_bytes:  # nothing of a request arrived: just close
            self.transport.close()
        else:
            limit = self.limits.header_timeout_s
            self.answer(408, f"request head not complete within header_timeout_s={limit:g} (PSAD_HEADER_TIMEOUT_S)")
            self.transport.close()

    def body_timeout(self) -> None:
        self.body_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused:  # queued behind a response, or the app has not taken the body yet
            self.body_timer = self.loop.call_later(self.limits.body_timeout_s, self.body_timeout)
            return
        cycle = self.cycle
        if not cycle.response_started:
            cycle.disconnected = True  # the app's receive() now returns http.disconnect; its answer is dropped
            cycle.message_event.set()
            limit = self.limits.body_timeout_s
            self.answer(408, f"request body not complete within body_timeout_s={limit:g} (PSAD_BODY_TIMEOUT_S)")
        self.transport.close()

    def answer(self, status: int, detail: str) -> None:
        """Write a JSON error response that closes the connection (the caller closes it)."""
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.transport.write(b"".join(head) + body)

    def arm_header_timer(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self.header_timeout)

    def cancel_timers(self) -> None:
        for timer in (self.header_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.header_timer = self.body_timer = None
