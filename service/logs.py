"""JSON logs: one object per line, so log shippers need no parsing rules.

Per request: debug when all went well, info when degraded, warning on errors (with the request
id, so a failure can be matched to the caller's request).
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

LOGGER_NAME = "psad.service"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> logging.Logger:
    """JSON lines on stderr for the service's logger (idempotent: safe in tests and reloads)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def log_request(
    logger: logging.Logger, route: str, request_id: str, started: float, degraded: list[str], **fields: object
) -> None:
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    level = logging.INFO if degraded else logging.DEBUG
    if logger.isEnabledFor(level):
        extra = {"route": route, "request_id": request_id, "latency_ms": latency_ms, "degraded": degraded, **fields}
        logger.log(level, "request", extra=extra)
