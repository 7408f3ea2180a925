"""JSON logs: one object per line on stderr, the service's own lines and the server's (uvicorn,
the worker supervisor) alike, so a log shipper needs one parsing rule.

Every line has `ts` (seconds since the epoch), `level`, `logger` and `msg`, then the record's own
fields (`route`, `request_id`, `latency_ms`, `degraded`, ...) and `exc` for an exception. The
formatter is python-json-logger's; `log_config()` puts every logger of a server process on it,
and uvicorn applies it (`log_config`) in each process before the app starts. `configure()` is the
app's own setup, for when no server applied it (the app run in-process by tests).

Per request: debug when all went well, info when degraded, warning on errors (with the request
id, so a failure can be matched to the caller's request).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS, LogData
from pythonjsonlogger.orjson import OrjsonFormatter

from service import tracing

LOGGER_NAME = "psad.service"
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
KEYS = {"created": "ts", "levelname": "level", "name": "logger", "message": "msg", "exc_info": "exc"}


class JsonFormatter(OrjsonFormatter):
    """python-json-logger (orjson) with the service's key names and lower-case levels."""

    def __init__(self) -> None:
        # color_message: uvicorn's copy of a message with terminal colour codes
        super().__init__(list(KEYS)[:4], rename_fields=KEYS, reserved_attrs=[*RESERVED_ATTRS, "color_message"])

    def process_log_record(self, log_data: LogData) -> LogData:
        log_data["level"] = log_data["level"].lower()
        if tracing.TRACER is not None:  # the ids of the request's span, when written inside one
            log_data.update(tracing.log_ids())
        return log_data


def log_config(level: str) -> dict[str, Any]:
    """The logging.config dict of a server process: the service's and the server's loggers at
    `level`, and the root's (any library's) at warning, all on one JSON handler."""
    own = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {name: own for name in (LOGGER_NAME, *SERVER_LOGGERS)},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


def configure(level: str) -> logging.Logger:
    """The service's logger at `level` on a JSON handler (idempotent: safe in tests and reloads,
    and a no-op for the handler where the server already applied log_config)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def log_request(
    logger: logging.Logger, route: str, request_id: str, started: float, degraded: Sequence[str], **fields: object
) -> None:
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    level = logging.INFO if degraded else logging.DEBUG
    if tracing.TRACER is not None:
        tracing.annotate(request_id, degraded, fields)
    if logger.isEnabledFor(level):
        extra = {"route": route, "request_id": request_id, "latency_ms": latency_ms, "degraded": degraded, **fields}
        logger.log(level, "request", extra=extra)
