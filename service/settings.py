"""Service settings: every knob is a `PSAD_*` environment variable, validated at startup.

docs/service.md lists each variable with its default. A bad value stops the service before it
binds a port, with a message naming the variable and the allowed values.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from export.contract.bundle import NAME_PATTERN

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
    model_repo: Path = Path("models")
    model_name: str = Field("psad", pattern=NAME_PATTERN)  # what `psad export --name` accepts
    model_version: str = "latest"  # "latest" or a version number; "latest" also follows new versions
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1)  # ONNX Runtime intra-op threads per model call
    processes: int = Field(1, ge=1)  # server processes on this host; `psad serve --workers N` sets it
    inference_workers: int | None = Field(None, ge=1)  # threads running assembly + model; None: CPU share
    microbatch_max_size: int = Field(8, ge=0)  # 0 or 1 = off; else requests merged into one model call
    microbatch_max_wait_us: int = Field(0, ge=0)  # 0: batch only what is already queued, never wait
    poll_interval_s: float = Field(0.0, ge=0)  # 0 = no polling; reload through /admin/reload only
    fleet_dir: Path | None = None  # set by `psad serve --workers N`: where its workers agree on one version
    admin_token: SecretStr | None = None  # unset = /admin/* disabled (403)

    # Redis profile store.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False  # true: redis_url is one node of a Redis Cluster (the client finds the rest)
    redis_budget_ms: float = Field(5.0, gt=0)  # time budget of the profile read per request
    redis_pool_size: int = Field(64, ge=1)
    events_timeout_ms: float = Field(1000.0, gt=0)  # time limit of an /events write
    redis_health_interval_s: float = Field(2.0, gt=0)  # PING period behind the psad_redis_up gauge
    profile_ttl_s: int = Field(30 * 86_400, ge=0)  # 0 = profiles never expire
    key_prefix: str = Field("psad", min_length=1, max_length=64)
    history_len: int = Field(0, ge=0)  # behaviours kept per user; 0 = the bundle schema's max_history

    # Request limits.
    max_candidates: int = Field(1000, ge=1)
    max_id_length: int = Field(128, ge=1)
    max_batch_requests: int = Field(64, ge=1)
    max_events: int = Field(1000, ge=1)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # larger bodies: 413 before any parsing
    max_future_s: int = Field(3600, ge=0)  # event and request timestamps at most this far ahead of now
    # Connections (service.http): a longer request head is answered 431 as it arrives; a head or a
    # body not complete in time, 408 and closed; an idle keep-alive connection, closed.
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    header_timeout_s: float = Field(10.0, gt=0)  # from connect (or a request's first byte) to its full head
    body_timeout_s: float = Field(30.0, gt=0)  # from the full head to the body's last byte
    keepalive_timeout_s: float = Field(5.0, gt=0)  # idle time after a response (uvicorn's timeout_keep_alive)

    enable_floor_endpoint: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("model_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v != "latest" and not (v.isdigit() and int(v) >= 1):
            raise ValueError("must be 'latest' or a version number >= 1")
        return v

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
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


def load_settings(**overrides: object) -> Settings:
    """Read PSAD_* variables (keyword overrides win); raise SettingsError naming each bad or
    unknown variable."""
    lines = unknown_variables(os.environ)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{ENV_PREFIX}{field.upper()}={err.get('input')!r}: {err['msg']}")
    if lines:
        raise SettingsError("invalid service settings:\n  " + "\n  ".join(lines)) from None
    return settings
