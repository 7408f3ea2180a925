"""Service settings: every knob is a `PSAD_*` environment variable, validated at startup.

docs/service.md lists each variable with its default. A bad value stops the service before it
binds a port, with a message naming the variable and the allowed values.
"""

from __future__ import annotations

import difflib
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from export.contract.bundle import NAME_PATTERN, Device

ENV_PREFIX = "PSAD_"
# PSAD_* variables read by other tools, not by the service: the test suite's MovieLens path,
# docker-compose's worker count (it becomes `psad serve --workers`), the locust load test's knobs.
OTHER_TOOLS = ("PSAD_ML100K", "PSAD_WORKERS", "PSAD_LOADTEST_")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 CPU quota: "<quota> <period>" or "max <period>"


def usable_cpus() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup CPU quota (docker --cpus,
    Kubernetes limits), which the affinity set does not show."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to read: the affinity set is the limit
    return cpus


class SettingsError(ValueError):
    """A PSAD_* variable has a bad value; the message names it and says what is allowed."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=())

    # Model repository: bundles live at <model_repo>/<model_name>/<version>/.
    model_repo: str = Field(
        "models", description="model repository: a directory, or an fsspec URL (`s3://bucket/prefix`, `gs://...`)"
    )
    model_repo_options: dict[str, Any] = Field(
        {}, description='JSON object of fsspec storage options for a URL repository, e.g. `{"endpoint_url": ...}`'
    )
    model_cache_dir: Path = Field(
        Path(tempfile.gettempdir()) / "psad-model-cache",
        description="where versions of a URL repository are downloaded and verified (shared by the workers)",
        json_schema_extra={"docs_default": "`$TMPDIR/psad-model-cache` (`/tmp/...` when unset)"},
    )
    model_name: str = Field(
        "psad",
        pattern=NAME_PATTERN,
        description="model name in the repository (letters, digits, `_`, `.`, `-`: what `psad export --name` accepts)",
    )
    model_version: str = Field("latest", description="`latest` or a version number (pinned: polling is off)")
    device: Device = Field(
        "auto", description="`auto`, `cpu` or `cuda`; the active provider is reported in /readyz and `psad_model_info`"
    )
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per model call")
    processes: int = Field(
        1,
        ge=1,
        description=(
            "server processes on this host; `psad serve --workers N` sets it, so the inference-thread "
            "default divides the CPUs among them"
        ),
    )
    inference_workers: int | None = Field(
        None,
        ge=1,
        description=(
            "threads per process running feature assembly + model calls (the event loop never does). When"
            " the processes fill the cores, one thread each is best: more only add thread switches and "
            "shrink micro-batches (measured below)"
        ),
        json_schema_extra={
            "docs_default": (
                "min(4, CPUs / `PSAD_PROCESSES`), at least 1 (CPUs: the affinity set, capped by a cgroup "
                "v2 quota such as `docker --cpus`)"
            )
        },
    )
    microbatch_max_size: int = Field(
        8,
        ge=0,
        description=(
            "0 or 1 = off; else lists that queue up while the inference workers are busy are merged into "
            "model calls of up to this many lists. An idle service scores a list at once, with no "
            "collector round trip"
        ),
    )
    microbatch_max_wait_us: int = Field(
        0,
        ge=0,
        description=(
            "how long a batch waits for more lists once a worker is free; 0 = take only what is already "
            "queued, never wait (event loops round waits up to 1 ms)"
        ),
    )
    poll_interval_s: float = Field(0.0, ge=0, description="seconds between repository polls; 0 = off")
    fleet_dir: Path | None = Field(
        None,
        description=(
            "set by `psad serve --workers N` (a temporary directory): where its workers agree on one "
            "model version; leave it unset"
        ),
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of /admin/*; unset or empty = admin disabled (403 on /admin/*)"
    )

    # Redis profile store.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="`redis://`, `rediss://` or `unix://`; with `PSAD_REDIS_CLUSTER`, any one node of the cluster",
    )
    redis_cluster: bool = Field(
        False, description="`true`: Redis Cluster (`redis.asyncio.cluster.RedisCluster`, nodes discovered from the URL)"
    )
    redis_budget_ms: float = Field(
        5.0,
        gt=0,
        description=(
            "time budget of the profile read per request (a reconnect included), from sending the "
            "commands to the replies reaching the socket (over it: cold start, `redis_timeout`)"
        ),
    )
    redis_pool_size: int = Field(
        64,
        ge=1,
        description=(
            "redis-py connections per worker process (per cluster node): appends and PING. Profile reads "
            "share one multiplexed connection per process (per cluster node; below)"
        ),
    )
    events_timeout_ms: float = Field(1000.0, gt=0, description="time limit of an /events write (over it: 503)")
    redis_health_interval_s: float = Field(
        2.0,
        gt=0,
        description=(
            "period of the store check (PING + the profile load marker) behind `psad_redis_up`, "
            "`psad_profiles_missing` and `profiles_missing`"
        ),
    )
    profile_ttl_s: int = Field(
        30 * 86_400,
        ge=0,
        description="profile keys expire this long after the last write; 0 = never",
        json_schema_extra={"docs_default": "`2592000` (30 days)"},
    )
    key_prefix: str = Field(
        "psad", min_length=1, max_length=64, description="Redis key prefix, 1-64 characters, no braces or whitespace"
    )
    history_len: int = Field(
        0, ge=0, description="behaviours kept per user by /events; 0 = the bundle schema's `max_history`"
    )

    # Request limits.
    max_candidates: int = Field(1000, ge=1, description="candidates per request")
    max_id_length: int = Field(128, ge=1, description="characters per user, item, request or event id")
    max_batch_requests: int = Field(64, ge=1, description="requests per /rerank/batch")
    max_events: int = Field(1000, ge=1, description="events per /events call")
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description=(
            "request body size; a larger body is answered 413 before it is parsed (a batch of 64 lists of"
            " 1,000 candidates takes about 4 MB)"
        ),
        json_schema_extra={"docs_default": "`8388608` (8 MiB)"},
    )
    max_future_s: int = Field(
        3600,
        ge=0,
        description=(
            "how far an event's `timestamp` or a request's `context.timestamp` may be ahead of the server"
            " clock (clock skew); beyond it: 422. Catches milliseconds sent as seconds, which would "
            "otherwise fill a history with behaviours that are never read and push the real ones out"
        ),
    )
    # Connections (service.http): a longer request head is answered 431 as it arrives; a head or a
    # body not complete in time, 408 and closed; an idle keep-alive connection, closed.
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description=(
            "request line + headers; a longer head is answered 431 as soon as it passes the limit, and the "
            'connection is closed (below, "Connection limits")'
        ),
        json_schema_extra={"docs_default": "`65536` (64 KiB), at least 1024"},
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "time to send a complete request head, from connecting (or from a later request's first "
            "byte); over it: 408, or a plain close if nothing was sent"
        ),
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="time to send the body, from the end of the head; over it: 408 and a close"
    )
    keepalive_timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "an idle keep-alive connection is closed this long after its last response (uvicorn's "
            "`timeout_keep_alive`); keep it above a load balancer's idle timeout (below)"
        ),
    )

    # Tracing (service.tracing): OpenTelemetry spans over OTLP/HTTP; the OTEL_* variables apply too.
    tracing: bool = Field(
        False,
        description=(
            "OpenTelemetry tracing (needs `pip install 'psad[tracing]'`): spans to `OTEL_EXPORTER_OTLP_ENDPOINT` "
            "(default http://localhost:4318); `PSAD_OTLP_ENDPOINT` turns it on too"
        ),
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP collector base URL for traces (`/v1/traces` appended); set = tracing on"
    )

    # Shadow sampling (service.shadow): answered lists and their clicks, to a Redis Stream.
    shadow_sample_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "share of answered /rerank and /rerank/batch lists recorded for `psad shadow run`, decided by "
            "a hash of the request id (a replay samples the same ones); 0 = off"
        ),
    )
    shadow_redis_url: str | None = Field(
        None,
        description=(
            "Redis of the shadow stream; unset = `PSAD_REDIS_URL`. A separate Redis keeps shadow traffic off "
            "the profile store. The consumer (`psad shadow run`) needs a single-node Redis: with "
            "`PSAD_REDIS_CLUSTER` set, point this at one (the service then writes to it as one node)"
        ),
    )
    shadow_stream_maxlen: int = Field(
        20_000,
        ge=1,
        description="records the stream keeps, about (`XADD ... MAXLEN ~ N`): older ones are trimmed, read or not",
    )
    shadow_queue_size: int = Field(
        1_000,
        ge=1,
        description=(
            "records waiting to be written, per process; when it is full a new record is dropped and "
            'counted (`psad_shadow_records_total{result="dropped"}`), never waited for'
        ),
    )
    shadow_timeout_ms: float = Field(
        1000.0,
        gt=0,
        description="time limit of one write of queued records (over it: they count as `failed`)",
    )

    enable_floor_endpoint: bool = Field(False, description="expose /bench/floor")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="`debug`, `info`, `warning`, `error`"
    )

    @field_validator("model_repo", mode="before")
    @classmethod
    def _repo(cls, v: object) -> object:
        return os.fspath(v) if isinstance(v, os.PathLike) else v  # callers pass a Path for a directory

    @field_validator("model_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v != "latest" and not (v.isdigit() and int(v) >= 1):
            raise ValueError("must be 'latest' or a version number >= 1")
        return v

    @field_validator("admin_token", mode="before")
    @classmethod
    def _no_empty_token(cls, v: object) -> object:
        """An empty token (compose's `${PSAD_ADMIN_TOKEN:-}`) disables admin rather than accepting `Bearer `."""
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_url", "shadow_redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if any(c in v for c in "{}\n\r\t "):
            raise ValueError("must not contain braces or whitespace (braces would break the per-user hash tag)")
        return v

    @field_validator("log_level", "device", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cpu_share(self) -> Settings:
        """Default inference threads: this process's share of the CPUs, at most 4. One thread per
        process when processes fill the cores: more only add thread switches and shrink batches."""
        if self.inference_workers is None:
            self.inference_workers = max(1, min(4, usable_cpus() // self.processes))
        return self

    @property
    def microbatching(self) -> bool:
        return self.microbatch_max_size > 1

    @property
    def shadow_url(self) -> str:
        return self.shadow_redis_url or self.redis_url


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """PSAD_* names that are neither a setting nor another tool's variable, each with the setting
    it most likely misspells: a typo must not silently leave a default (say, another Redis) in place."""
    fields = [name.upper() for name in Settings.model_fields]
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper[len(ENV_PREFIX) :] in fields or upper.startswith(OTHER_TOOLS):
            continue
        close = difflib.get_close_matches(upper[len(ENV_PREFIX) :], fields, n=1, cutoff=0.7)
        hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "docs/service.md#settings lists them"
        lines.append(f"{name}: not a setting; {hint}")
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Read PSAD_* variables (keyword overrides win); raise SettingsError naming each bad or
    unknown variable."""
    lines = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{ENV_PREFIX}{field.upper()}={err.get('input')!r}: {err['msg']}")
    except SourceError as exc:  # a variable of a structured setting that is not JSON
        field = next((f for f in Settings.model_fields if f'"{f}"' in str(exc)), "?")
        lines.append(f'{ENV_PREFIX}{field.upper()}: not valid JSON; give a JSON value, e.g. \'{{"key": "value"}}\'')
    if lines:
        raise SettingsError("invalid service settings:\n  " + "\n  ".join(lines)) from None
    return settings


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def settings_table() -> str:
    """docs/service.md's settings table, made from the fields' descriptions, so the two cannot drift
    (tests/test_service_settings.py checks the docs hold it; `python -m service.settings` prints it)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = extra.get("docs_default") or _shown(field.default)
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_table())
