"""What the service knows of its profile store between requests: is Redis up, and does it hold
the profiles (the load marker of service.profiles)? Checked off the request path, at startup, on a
timer and on each /readyz; the rerank pipeline only reads the result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from service import metrics
from service.api import Degraded
from service.profiles import STORE_ERRORS, ProfileStore

HEALTH_PING_S = 0.25  # a PING slower than this counts as Redis down
log = logging.getLogger("psad.service")


async def _answers(call: Callable[[], Awaitable[bool]]) -> bool | None:
    """The call's answer within HEALTH_PING_S; None when it failed or was late."""
    try:
        return await asyncio.wait_for(call(), HEALTH_PING_S)
    except (TimeoutError, *STORE_ERRORS):
        return None


class StoreHealth:
    """What the latest check of the profile store found: Redis reachable, and the load marker
    ("loaded", "missing", or "unknown" while Redis cannot say). A check is one PING and one
    EXISTS, each within HEALTH_PING_S, run at startup, every PSAD_REDIS_HEALTH_INTERVAL_S and on
    each /readyz, never on the request path: /rerank only reads `missing`. It sets psad_redis_up
    and psad_profiles_missing."""

    def __init__(self, profiles: ProfileStore):
        self.store = profiles
        self.profiles = "unknown"
        self._started = self._applied = 0

    @property
    def missing(self) -> bool:
        """What the rerank pipeline reads: Redis answers, without the load marker."""
        return self.profiles == "missing"

    async def check(self) -> bool:
        """Check now; returns whether Redis answered. Checks may overlap (the watch and /readyz):
        an earlier one finishing last does not overwrite a later one's result."""
        self._started += 1
        n = self._started
        up = bool(await _answers(self.store.ping))
        marked = await _answers(self.store.marked) if up else None
        if n > self._applied:
            self._applied = n
            state = "unknown" if marked is None else "loaded" if marked else "missing"
            if state == "missing" and self.profiles != "missing":
                flag = Degraded.PROFILES_MISSING
                log.warning("no profile load marker in the store: answers flagged %s until it is loaded", flag)
            elif state == "loaded" and self.profiles == "missing":
                log.info("profile load marker found: answers are no longer flagged %s", Degraded.PROFILES_MISSING)
            self.profiles = state
            metrics.REDIS_UP.set(1 if up else 0)
            metrics.PROFILES_MISSING.set(1 if self.missing else 0)
        return up


async def watch_redis(health: StoreHealth, interval_s: float) -> None:
    """Keep psad_redis_up and the marker state current between /readyz probes, so an outage or an
    emptied store alerts without taking the replicas out of the load balancer."""
    while True:
        await asyncio.sleep(interval_s)  # the lifespan ran the first check before serving
        await health.check()
