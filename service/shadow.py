"""The shadow writer: sampled lists and their clicks go to the shadow stream, and no request waits.

`offer` only appends to a bounded queue and wakes one flusher task. For a list it takes
references (a ScoredList: the request, the student's scores, the batch's assembled inputs and
the list's row of them, the served order), not a record: building and encoding records
(export.contract.shadow, the one record format) is the flusher's work, off the answer's path.
Referencing the batch's inputs rather than copying the row leaves the request path no copy at
all, and the flusher's encode is then the only one. Memory stays bounded all the same: the queue
holds at most PSAD_SHADOW_QUEUE_SIZE entries, and each keeps alive its request and at most one
batch's inputs and scores (a batch is at most PSAD_MICROBATCH_MAX_SIZE lists, or one
/rerank/batch's, each at most PSAD_MAX_CANDIDATES wide and the schema's max_history long); the
lists of one batch share theirs.

The flusher sends what is queued in one pipelined round trip of XADDs over a connection of its
own, so a slow or dead shadow Redis costs requests nothing and never touches the profile reads'
connection. Back-pressure drops new records, counted, instead of queueing without bound; a failed
write is counted and not retried (the stream is a sample, not a log). Failures are logged once
when they start and once when writing works again, and the flusher pauses briefly after a failed
write, so an outage neither floods the log nor spins on reconnects; the next write after Redis is
back reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from export.contract.shadow import ClickRecord, ListRecord, encode, sampled, xadd_command
from service import metrics
from service.api import RerankRequest
from service.profiles import ProfileReader, RedisPyReader, connect
from service.resp import RespClient
from service.settings import Settings

log = logging.getLogger("psad.service")

# What sends the XADDs: a ProfileReader runs any commands in one round trip, reads or writes.
Sender = ProfileReader


@dataclass(slots=True)  # not frozen: a frozen __init__ sets each field through object.__setattr__
class ScoredList:
    """A list the model scored, as the request path hands it over: references only."""

    request: RerankRequest
    request_id: str
    time: float  # when answered, unix s
    model: str
    version: int
    scores: np.ndarray  # the student's, [L], request order
    reasons: Sequence[str]  # degraded reasons
    inputs: dict[str, np.ndarray]  # the batch's assembled inputs, shared by its lists
    row: int  # this list's row of them
    served: Sequence[int]  # candidate indices in the answer's order

    def record(self) -> ListRecord:
        """The list's record: this row of the inputs (padding included), as views."""
        row = self.row
        return ListRecord(
            request_id=self.request_id,
            time=self.time,
            model=self.model,
            version=self.version,
            user_id=self.request.user_id,
            items=[c.item_id for c in self.request.candidates],
            scores=self.scores.tolist(),
            served=list(self.served),
            degraded_reasons=[str(r) for r in self.reasons],
            inputs={name: array[row : row + 1] for name, array in self.inputs.items()},
        )


Entry = ScoredList | ClickRecord
BATCH_RECORDS = 32  # XADDs per round trip: enough to keep up, short enough to encode between requests
# After the first record of a batch arrives the flusher waits this long for more, so that under load one
# round trip (one write, one read, one wake-up of this task) carries several records, not one each.
LINGER_S = 0.005
RETRY_AFTER_S = 0.5  # pause after a failed write: an outage costs one attempt per pause, not one per batch
CLOSE_GRACE_S = 1.0  # at shutdown, how long what is queued may take to be written
POOL_SIZE = 2  # redis-py connections (TLS, cluster): the flusher sends one batch at a time


class ShadowWriter:
    """A bounded queue of records and the task that writes them to `<prefix>:{shadow}:records`."""

    def __init__(self, settings: Settings):
        self.rate = settings.shadow_sample_rate
        self.prefix = settings.key_prefix
        self.maxlen = settings.shadow_stream_maxlen
        self.capacity = settings.shadow_queue_size
        self.timeout_s = settings.shadow_timeout_ms / 1000
        url = settings.shadow_url
        self._client: aredis.Redis | RedisCluster | None = None
        # A shadow Redis of its own is one node, as the consumer reads it; only the profile store's
        # URL (PSAD_SHADOW_REDIS_URL unset) is a cluster's when PSAD_REDIS_CLUSTER says so.
        cluster = settings.redis_cluster and settings.shadow_redis_url is None
        self.sender: Sender  # its own connection: never the profile reads'
        if not cluster and RespClient.supports(url):
            self.sender = RespClient(url, connect_timeout_s=self.timeout_s, stale_s=self.timeout_s)
        else:
            self._client = connect(url, POOL_SIZE, self.timeout_s, cluster=cluster)
            self.sender = RedisPyReader(self._client)
        self.queue: deque[Entry] = deque()
        self.in_flight = 0  # records of the write under way
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()  # set after each write, for close() to wait on
        self._task: asyncio.Task | None = None
        self._closing = False
        self._failing = False  # the last write failed: log again only once it works

    def samples(self, request_id: str) -> bool:
        """Whether this request's list (and so its clicks) is recorded."""
        return sampled(request_id, self.rate)

    def offer(self, entry: Entry) -> None:
        """Queue a record to build and write: O(1), never blocks, never raises; when full, drop and count."""
        if self._closing or len(self.queue) >= self.capacity:
            metrics.SHADOW.dropped.inc()
            return
        self.queue.append(entry)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush())

    async def close(self, grace_s: float = CLOSE_GRACE_S) -> None:
        """Write what is queued within `grace_s`, then stop: what is left is counted (queued ones
        dropped, a write under way failed) and the connection closed."""
        self._closing = True
        unfinished = 0
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained(), grace_s)
            unfinished = self.in_flight  # before the cancel: the write's own bookkeeping ends with it
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        metrics.SHADOW.dropped.inc(len(self.queue))
        metrics.SHADOW.failed.inc(unfinished)
        self.queue.clear()
        self.sender.close()
        if self._client is not None:
            await self._client.aclose()

    async def _drained(self) -> None:
        while self.queue or self.in_flight:
            self._sent.clear()
            await self._sent.wait()

    async def _flush(self) -> None:
        while True:
            while not self.queue:
                self._wake.clear()
                await self._wake.wait()
            if len(self.queue) < BATCH_RECORDS and not self._closing:
                await asyncio.sleep(LINGER_S)
            batch = [self.queue.popleft() for _ in range(min(len(self.queue), BATCH_RECORDS))]
            written = await self._write(batch)
            self._sent.set()
            if written < len(batch) and not self._closing:
                await asyncio.sleep(RETRY_AFTER_S)

    async def _write(self, batch: list[Entry]) -> int:
        """One round trip of XADDs; counts each record written or failed; returns how many were written."""
        self.in_flight = len(batch)
        error: str | None = None
        try:
            commands = [xadd_command(self.prefix, encode(as_record(e)), self.maxlen) for e in batch]
            replies = await self.sender.execute(commands, self.timeout_s, raise_on_error=False)
            refused = [r for r in replies if isinstance(r, Exception)]
            written = len(batch) - len(refused)
            if refused:
                error = f"Redis refused {len(refused)} of {len(batch)}: {refused[0]}"
        except Exception as exc:  # Redis down, timed out, or a record that cannot be encoded
            written, error = 0, repr(exc)
        finally:
            self.in_flight = 0
        metrics.SHADOW.written.inc(written)
        metrics.SHADOW.failed.inc(len(batch) - written)
        if error is not None and not self._failing:
            log.warning("shadow records not written; counting failures until a write succeeds", extra={"error": error})
        elif error is None and self._failing:
            log.info("shadow records written again")
        self._failing = error is not None
        return written


def as_record(entry: Entry) -> ListRecord | ClickRecord:
    return entry.record() if isinstance(entry, ScoredList) else entry
