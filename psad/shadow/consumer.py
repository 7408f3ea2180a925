"""The shadow consumer: reads sampled records from the stream in the consumer group, decodes the teacher
of the same bundle version on the very inputs the student scored, and writes how far they agree.

At least once, nothing lost, nothing counted twice. One batch runs in this order:

 1. claim records left pending past the claim timeout (XAUTOCLAIM: a dead consumer's, or clicks
    held for their list), dead-lettering those delivered more than max_deliveries times, or read
    new ones (XREADGROUP);
 2. decode them; a poison record (undecodable, a bundle version that cannot be loaded, inputs
    that do not fit its schema) goes to the dead-letter stream and is acknowledged, in one script
    that also adds it to the done set, so two consumers racing on it dead-letter it once;
 3. lists: teacher order and agreement; clicks: the ranks of their list (same batch, else the
    ranks key). A click whose list is not found on its first delivery stays pending: the claim
    timeout is its grace, and on the redelivery it is written, matched or not;
 4. write the parquet parts (atomic); if that fails (disk full, volume gone) the batch stays in
    hand, unacknowledged, and is written again with back-off;
 5. one script: add every record's done member to the done set, set the ranks keys of new lists,
    XACK all, and trim the done set; it returns the ids that were new;
 6. count the new ids in the Prometheus metrics.

Killed before 5, the records stay pending: another consumer claims them, writes the same rows
again (results.read keeps one per record) and counts them, since they are not in the done set.
A done member is scored by its record id's milliseconds and dropped once older than the stream's
first entry (less a margin): a record no longer in the stream cannot be redelivered. A click with
an event_id has the member "click:<length of the request id>:<request id>:<event id>", so an
/events retry that produced a second click record is not counted twice.

Each list is decoded alone: its result must not depend on which records shared its batch, so a
redelivered record reproduces its first row exactly.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from export.contract import shadow
from export.contract.bundle import NAME_PATTERN
from export.contract.schema import INPUT_NAMES, ModelInputs
from export.runtime import InputCheck
from psad.shadow import results
from psad.shadow.agreement import agreement, order_by_scores
from service.model_repo import ModelRepo

if TYPE_CHECKING:
    from training.models.reranker import Reranker

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry: id, fields
DEAD_MAXLEN = 10_000  # the dead-letter stream keeps about this many entries
DEAD_FIELDS = (b"v", b"kind", b"meta")  # what a dead letter keeps of its record; of in.*, the byte length
MIN_REDIS = (7, 0)  # XAUTOCLAIM reports (and un-pends) entries trimmed from the stream since 7.0
MODEL_NAME = re.compile(NAME_PATTERN)
CURSOR_START = b"0-0"
TAU_BUCKETS = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
UNIT_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))
RANK_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
RANKS_FIELDS = {  # the ranks key's JSON: what a click needs of its list, and the type of each
    "version": int,
    "user_id": str,
    "items": list,
    "student_order": list,
    "teacher_order": list,
    "served": list,
}

# KEYS: done set, stream, ranks keys. ARGV: group, ranks TTL, trim margin (ms), n, n triples
# (record id, done member, score), then (record id, ranks JSON) for each ranks key. A member's score
# is the newest record id (ms) that maps to it. Returns the record ids whose member was new.
COMMIT_LUA = """
local done, stream = KEYS[1], KEYS[2]
local group, ttl, margin = ARGV[1], ARGV[2], tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local ids, new, fresh = {}, {}, {}
for i = 0, n - 1 do
  local id, member, score = ARGV[5 + 3 * i], ARGV[6 + 3 * i], ARGV[7 + 3 * i]
  ids[#ids + 1] = id
  if not redis.call('ZSCORE', done, member) then
    new[#new + 1] = id
    fresh[id] = true
  end
  redis.call('ZADD', done, 'GT', score, member)
end
for j = 3, #KEYS do
  local at = 5 + 3 * n + 2 * (j - 3)
  if fresh[ARGV[at]] then
    redis.call('SET', KEYS[j], ARGV[at + 1], 'EX', ttl)
  end
end
if n > 0 then
  redis.call('XACK', stream, group, unpack(ids))
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #first > 0 then
  local ms = tonumber(string.match(first[1][1], '^%d+'))
  redis.call('ZREMRANGEBYSCORE', done, '-inf', string.format('(%d', ms - margin))
end
return new
"""

# KEYS: done set, stream, dead-letter stream. ARGV: group, dead MAXLEN, then for each record: its
# id, score, m, and m field/value pairs. Returns the ids this call dead-lettered (new to the done set).
DEAD_LUA = """
local done, stream, dead = KEYS[1], KEYS[2], KEYS[3]
local group, maxlen = ARGV[1], ARGV[2]
local at, new = 3, {}
while at <= #ARGV do
  local id, score, m = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  if redis.call('ZADD', done, 'NX', score, id) == 1 then
    local entry = {dead, 'MAXLEN', '~', maxlen, '*'}
    for f = 1, 2 * m do
      entry[#entry + 1] = ARGV[at + 2 + f]
    end
    redis.call('XADD', unpack(entry))
    new[#new + 1] = id
  end
  redis.call('XACK', stream, group, id)
  at = at + 3 + 2 * m
end
return new
"""


@dataclass(frozen=True)
class Options:
    """What `psad shadow run` sets (its flags say what each means, and take their defaults from DEFAULTS)."""

    consumer: str
    prefix: str = "psad"
    out: Path = Path("shadow")
    window_s: int = 3600
    k: int = 10
    batch: int = 64
    claim_idle_s: float = 60.0
    max_deliveries: int = 5
    join_window_s: int = 3600
    block_ms: int = 1000
    log_interval_s: float = 30.0


DEFAULTS = Options(consumer="")


class Poison(ValueError):
    """A record the consumer cannot use; `reason` is its dead-letter reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class WriteFailed(RuntimeError):
    """The results could not be written (an OSError: disk full, volume gone); the batch stays in hand."""


def require_redis(version: str) -> None:
    """Refuse a Redis older than MIN_REDIS: its XAUTOCLAIM leaves trimmed entries pending forever."""
    parsed = re.match(r"(\d+)\.(\d+)", version)
    if parsed is None or (int(parsed[1]), int(parsed[2])) < MIN_REDIS:
        need = ".".join(map(str, MIN_REDIS))
        raise RuntimeError(
            f"Redis {version} found; `psad shadow run` needs Redis >= {need} (XAUTOCLAIM must report "
            "records trimmed from the stream): upgrade it or point PSAD_SHADOW_REDIS_URL at a newer one"
        )


@dataclass
class Teacher:
    """A bundle's full PyTorch model with the teacher's weights, and its schema's input check."""

    check: InputCheck
    model: Reranker
    served: Any = None  # sid: the item lookup of the recorded tokens (ItemEmbedding.served()); id: None

    @property
    def generator(self) -> bool:
        """Whether it decodes a permutation (registry: generators offer teacher_decode); otherwise
        the scorer itself ranks (a parity check)."""
        return hasattr(type(self.model), "teacher_decode")

    def order(self, inputs: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The teacher's order of the list's n candidates, best first."""
        import torch

        tensors = {name: torch.from_numpy(np.array(inputs[name])) for name in INPUT_NAMES}
        with torch.inference_mode():
            if self.generator:
                perm = self.model.teacher_decode(tensors, served=self.served)  # type: ignore[operator]
                return perm[0, :n].numpy().astype(np.int32)
            scores = self.model.score(ModelInputs.from_batch(tensors), self.served)  # type: ignore[operator]
            return order_by_scores(scores[0, :n].float().numpy())


class Teachers:
    """Teachers by (model, version), the `capacity` most recently used kept loaded. A version that
    failed to load is not retried for `retry_s`, so a flood of its records costs one load. The
    repository is the service's (a directory or a URL downloaded into a cache); a download that
    fails on the way (RepoUnavailable) is raised, not dead-lettered: the batch stays pending and is
    claimed again."""

    def __init__(self, repo: ModelRepo, capacity: int = 4, retry_s: float = 60.0):
        self.repo = repo
        self.capacity = capacity
        self.retry_s = retry_s
        self._loaded: OrderedDict[tuple[str, int], Teacher] = OrderedDict()
        self._failed: dict[tuple[str, int], tuple[float, str]] = {}

    def get(self, model: str, version: int) -> Teacher:
        key = (model, version)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed[0] < self.retry_s:
            raise Poison("version", failed[1])
        try:
            teacher = self._load(model, version)
        except Poison as exc:
            self._failed[key] = (time.monotonic(), str(exc))
            raise
        self._failed.pop(key, None)
        self._loaded[key] = teacher
        if len(self._loaded) > self.capacity:
            self._loaded.popitem(last=False)
        return teacher

    def _load(self, model: str, version: int) -> Teacher:
        from export.contract.bundle import BundleError, verify_bundle
        from export.exporter import load_torch_model
        from training.models.embeddings import ItemEmbedding

        if not MODEL_NAME.fullmatch(model):
            raise Poison("version", f"field meta.model: {model!r} is not a model name")
        try:
            path = self.repo.fetch(model, version)
            _, schema, _ = verify_bundle(path)
            net = load_torch_model(path)
        except BundleError as exc:
            raise Poison("version", f"bundle {model}/{version} cannot be loaded: {exc}") from None
        log.info("loaded the teacher of %s/%s (%s) from %s", model, version, type(net).__name__, path)
        items = next(m for m in net.modules() if isinstance(m, ItemEmbedding))
        return Teacher(InputCheck(schema), net, items.served() if items.sid is not None else None)


class Metrics:
    """The consumer's Prometheus metrics, in a registry of their own (served on --metrics-port)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.lists = Counter(
            "psad_shadow_lists", "Lists compared with the teacher, by version.", ["version"], registry=r
        )
        self.first_agree = Counter(
            "psad_shadow_first_item_agreement",
            "Compared lists whose first item the teacher and the student agree on, by version.",
            ["version"],
            registry=r,
        )
        self.tau = Histogram(
            "psad_shadow_kendall_tau", "Kendall tau, student vs teacher.", ["version"], buckets=TAU_BUCKETS, registry=r
        )
        self.overlap = Histogram(
            "psad_shadow_topk_overlap", "Top-k overlap.", ["version"], buckets=UNIT_BUCKETS, registry=r
        )
        self.ndcg = Histogram(
            "psad_shadow_ndcg",
            "NDCG@k of the student against the teacher.",
            ["version"],
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.clicks = Counter(
            "psad_shadow_clicks",
            "Events (clicks, views, ...) processed, by /events action and whether their list was found.",
            ["action", "matched"],
            registry=r,
        )
        self.click_rank = Histogram(
            "psad_shadow_click_rank",
            "1-based rank of an event's item under the student's, the teacher's and the served order, by action.",
            ["action", "order"],
            buckets=RANK_BUCKETS,
            registry=r,
        )
        self.dead = Counter(
            "psad_shadow_dead_letters", "Records sent to the dead-letter stream, by reason.", ["reason"], registry=r
        )
        self.trimmed = Counter(
            "psad_shadow_trimmed", "Pending records trimmed from the stream before they were processed.", registry=r
        )
        self.claimed = Counter(
            "psad_shadow_claimed",
            "Records claimed after the claim timeout (a dead consumer's, or clicks held for their list).",
            registry=r,
        )
        self.redis_errors = Counter("psad_shadow_redis_errors", "Batches interrupted by a Redis error.", registry=r)
        self.write_errors = Counter(
            "psad_shadow_write_errors",
            "Failed attempts to write a batch's results (disk full, volume gone); the batch is retried.",
            registry=r,
        )
        self.pending = Gauge("psad_shadow_pending", "Records delivered to the group and not acknowledged.", registry=r)
        self.lag = Gauge("psad_shadow_lag", "Records in the stream not yet delivered to the group.", registry=r)
        self.batch_seconds = Histogram("psad_shadow_batch_seconds", "Time to handle one batch.", registry=r)

    def count_list(self, row: Mapping[str, Any]) -> None:
        version = str(row["version"])
        self.lists.labels(version).inc()
        self.first_agree.labels(version).inc(bool(row["first_agree"]))
        self.tau.labels(version).observe(row["kendall_tau"])
        self.overlap.labels(version).observe(row["topk_overlap"])
        self.ndcg.labels(version).observe(row["ndcg"])

    def count_click(self, row: Mapping[str, Any]) -> None:
        action = row["action"]  # bounded: the service accepts only its bundle schema's actions
        self.clicks.labels(action, "true" if row["matched"] else "false").inc()
        for order in ("student", "teacher", "served"):
            if row[f"{order}_rank"] is not None:
                self.click_rank.labels(action, order).observe(row[f"{order}_rank"])


@dataclass
class Batch:
    """What one batch of entries came to."""

    size: int = 0  # entries handled
    started: float = field(default_factory=time.perf_counter)
    lists: list[dict[str, Any]] = field(default_factory=list)
    clicks: list[dict[str, Any]] = field(default_factory=list)
    ranks: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # list record id -> (ranks key, JSON)
    poison: list[tuple[bytes, dict[bytes, bytes], Poison]] = field(default_factory=list)
    held: int = 0  # clicks left pending on their first delivery: their list may still come


def list_row(record_id: str, record: shadow.ListRecord, teacher: Teacher, k: int) -> dict[str, Any]:
    """The lists row of a record, without processed_at and consumer."""
    n = len(record.items)
    try:
        teacher.check(record.inputs)
    except ValueError as exc:
        raise Poison("inputs", f"{exc} (bundle {record.model}/{record.version})") from None
    mask = record.inputs["cand_mask"][0]
    if len(mask) < n or not mask[:n].all() or mask[n:].any():
        raise Poison("inputs", f"field in.cand_mask: expected its first {n} of {len(mask)} slots valid, one per item")
    try:
        teacher_order = teacher.order(record.inputs, n)
    except (RuntimeError, IndexError, ValueError) as exc:  # e.g. an item index outside the bundle's table
        raise Poison("inputs", f"the teacher of {record.model}/{record.version} cannot decode them ({exc})") from None
    student_order = order_by_scores(np.asarray(record.scores))
    a = agreement(student_order, teacher_order, k)
    return {
        "record_id": record_id,
        "request_id": record.request_id,
        "time": record.time,
        "model": record.model,
        "version": record.version,
        "user_id": record.user_id,
        "n": n,
        "k": min(k, n),
        "kendall_tau": a.kendall_tau,
        "topk_overlap": a.topk_overlap,
        "ndcg": a.ndcg,
        "first_agree": a.first_agree,
        "degraded": bool(record.degraded_reasons),
        "degraded_reasons": record.degraded_reasons,
        "items": record.items,
        "student_order": student_order.tolist(),
        "teacher_order": teacher_order.tolist(),
        "served": record.served,
    }


def ranks_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a click needs of its list (the ranks key's JSON)."""
    return {name: row[name] for name in RANKS_FIELDS}


def parse_ranks(raw: bytes | str) -> dict[str, Any] | None:
    """A ranks key's value, or None when it is not one (corrupt, written by something else)."""
    try:
        ranks = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(ranks, dict) or any(not isinstance(ranks.get(k), t) for k, t in RANKS_FIELDS.items()):
        return None
    return ranks


def click_row(record_id: str, click: shadow.ClickRecord, ranks: Mapping[str, Any] | None) -> dict[str, Any]:
    """The clicks row of a record, without processed_at and consumer; ranks: its list's, or None. A
    list of another user is not this click's (a reused request id): unmatched."""
    if ranks is not None and ranks["user_id"] != click.user_id:
        ranks = None
    row: dict[str, Any] = {
        "record_id": record_id,
        "request_id": click.request_id,
        "event_id": click.event_id,
        "time": click.time,
        "user_id": click.user_id,
        "item_id": click.item_id,
        "action": click.action,
        "matched": ranks is not None,
        "version": None if ranks is None else ranks["version"],
        "student_rank": None,
        "teacher_rank": None,
        "served_rank": None,
    }
    if ranks is not None and click.item_id in ranks["items"]:
        index = ranks["items"].index(click.item_id)
        for order, key in (("student", "student_order"), ("teacher", "teacher_order"), ("served", "served")):
            if index in ranks[key]:
                row[f"{order}_rank"] = ranks[key].index(index) + 1
    return row


def done_member(row: Mapping[str, Any]) -> str:
    """A result's member of the done set: its record id, or for a click with an event_id the event
    itself (results.event_key), so that a retried /events call (two click records) is counted once."""
    if row.get("event_id") is not None:
        return results.event_key(row["request_id"], row["event_id"])
    return str(row["record_id"])


def id_ms(record_id: str | bytes) -> int:
    """The milliseconds part of a stream id (the done set's score)."""
    text = record_id.decode() if isinstance(record_id, bytes) else record_id
    return int(text.split("-", 1)[0])


def dead_entry(rid: bytes, fields: Mapping[bytes, bytes], exc: Poison) -> dict[bytes, bytes]:
    """A dead letter: the record's header fields, the byte length of each input, and why."""
    entry = {name: fields[name] for name in DEAD_FIELDS if name in fields}
    prefix = shadow.INPUT_FIELD.encode()
    entry |= {b"len." + name: b"%d" % len(value) for name, value in fields.items() if name.startswith(prefix)}
    return entry | {b"reason": exc.reason.encode(), b"error": str(exc).encode(), b"original_id": rid}


class Consumer:
    """One member of the group; `run` loops until stopped (or, once, until nothing is left)."""

    def __init__(self, client: redis.Redis, options: Options, teachers: Teachers, metrics: Metrics):
        self.client = client
        self.options = options
        self.teachers = teachers
        self.metrics = metrics
        self.stream = shadow.stream_key(options.prefix)
        self.commit_script = client.register_script(COMMIT_LUA)
        self.dead_script = client.register_script(DEAD_LUA)
        self.cursor = CURSOR_START
        self.last_scan = -math.inf
        self.ready = False
        self.in_hand: Batch | None = None  # processed, not yet written and committed
        self.write_failing = False
        self.logged: set[str] = set()
        self.progress = (time.monotonic(), 0)  # since the last progress line: start, records

    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, shadow.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.ready = True

    def run(self, stop: threading.Event, once: bool = False) -> None:
        """Handle batches until `stop` is set (the current batch is finished first). once: exit
        when nothing is left to claim or read; errors then end the run, else they are retried."""
        backoff, block_ms = 0.5, 0 if once else self.options.block_ms
        while not stop.is_set():
            try:
                if not self.ready:
                    self.ensure_group()
                handled = self.finish() if self.in_hand is not None else self.step(block_ms)
                backoff = 0.5
            except (redis.RedisError, WriteFailed) as exc:
                if once:
                    raise
                if isinstance(exc, redis.RedisError):
                    self.in_hand = None  # still pending in the group: claimed again after the claim timeout
                    self.ready = False
                    self.metrics.redis_errors.inc()
                    log.warning("Redis error (%s); retrying in %.1f s", exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if once and handled == 0 and self.cursor == CURSOR_START:
                break
            if time.monotonic() - self.progress[0] >= self.options.log_interval_s:
                self.log_progress()
        if self.in_hand is not None:
            log.warning("stopped with %d records unwritten: they stay pending for another consumer", self.in_hand.size)
        self.log_progress()

    def step(self, block_ms: int) -> int:
        """Claim or read one batch and handle it; returns the entries handled."""
        entries = self.claim() if self._claim_due() else []
        redelivered = bool(entries)
        if not entries:
            entries = self.read(block_ms)
        if entries:
            self.handle(entries, redelivered)
        return len(entries)

    def _claim_due(self) -> bool:
        return self.cursor != CURSOR_START or time.monotonic() - self.last_scan >= self.options.claim_idle_s / 2

    def claim(self) -> list[Entry]:
        """A page of records idle past the claim timeout, from any consumer; those delivered too often
        are dead-lettered here, the rest returned to be handled."""
        if self.cursor == CURSOR_START:
            self.last_scan = time.monotonic()
        idle_ms = int(self.options.claim_idle_s * 1000)
        reply = self.client.xautoclaim(
            self.stream, shadow.GROUP, self.options.consumer, idle_ms, self.cursor, count=self.options.batch
        )
        self.cursor, entries, trimmed = reply[0], reply[1], reply[2]
        if trimmed:
            self.metrics.trimmed.inc(len(trimmed))
            self._log_once(
                "trimmed",
                f"{len(trimmed)} pending records were trimmed from the stream before processing "
                "(further ones are only counted in psad_shadow_trimmed_total)",
            )
        if not entries:
            return []
        self.metrics.claimed.inc(len(entries))
        pipe = self.client.pipeline(transaction=False)
        for rid, _ in entries:
            pipe.xpending_range(self.stream, shadow.GROUP, min=rid, max=rid, count=1)
        deliveries = [info[0]["times_delivered"] if info else 0 for info in pipe.execute()]
        limit = self.options.max_deliveries
        over = [
            (rid, fields, Poison("deliveries", f"delivered {d} times, more than --max-deliveries {limit}"))
            for (rid, fields), d in zip(entries, deliveries, strict=True)
            if d > limit
        ]
        self.dead_letter(over)
        return [e for e, d in zip(entries, deliveries, strict=True) if d <= limit]

    def read(self, block_ms: int) -> list[Entry]:
        reply: Any = self.client.xreadgroup(
            shadow.GROUP,
            self.options.consumer,
            {self.stream: ">"},
            count=self.options.batch,
            block=block_ms or None,
        )
        return [(rid, fields) for _, entries in reply or [] for rid, fields in entries]

    def handle(self, entries: list[Entry], redelivered: bool) -> None:
        """One batch, steps 2 to 6 of the module docstring."""
        batch = self.process(entries, redelivered)
        self.dead_letter(batch.poison)
        self.in_hand = batch
        self.finish()

    def finish(self) -> int:
        """Write the batch in hand, commit and count it; returns its size. WriteFailed leaves it in hand."""
        batch = self.in_hand
        if batch is None:
            return 0
        now = self.write(batch)
        self.in_hand = None
        self.count(batch, self.commit(batch, now))
        self.metrics.batch_seconds.observe(time.perf_counter() - batch.started)
        self.progress = (self.progress[0], self.progress[1] + batch.size)
        return batch.size

    def process(self, entries: Iterable[Entry], redelivered: bool = False) -> Batch:
        """Decode and compare; lists first, so that clicks on a list of the same batch find it.
        redelivered: the entries were claimed, so a click whose list is not found is decided."""
        batch = Batch()
        decoded: list[tuple[str, shadow.ClickRecord]] = []
        joined: dict[str, dict[str, Any] | None] = {}  # request id -> its list's ranks (None: unusable)
        for rid, fields in entries:
            batch.size += 1
            try:
                record = shadow.decode(fields)
                if isinstance(record, shadow.ClickRecord):
                    decoded.append((rid.decode(), record))
                    continue
                teacher = self.teachers.get(record.model, record.version)
                row = list_row(rid.decode(), record, teacher, self.options.k)
            except shadow.RecordError as exc:
                batch.poison.append((rid, fields, Poison("record", str(exc))))
                continue
            except Poison as exc:
                batch.poison.append((rid, fields, exc))
                continue
            batch.lists.append(row)
            ranks = ranks_of(row)
            joined[record.request_id] = ranks
            key = shadow.ranks_key(self.options.prefix, record.request_id)
            batch.ranks[row["record_id"]] = (key, orjson.dumps(ranks))
        joined |= self._stored_ranks(sorted({c.request_id for _, c in decoded} - joined.keys()))
        for record_id, click in decoded:
            if click.request_id not in joined and not redelivered:
                batch.held += 1  # pending: claimed again after the claim timeout, then decided
                continue
            batch.clicks.append(click_row(record_id, click, joined.get(click.request_id)))
        return batch

    def _stored_ranks(self, request_ids: list[str]) -> dict[str, dict[str, Any] | None]:
        """The ranks keys that exist among these request ids'; a corrupt one maps to None (unmatched)."""
        if not request_ids:
            return {}
        found = self.client.mget([shadow.ranks_key(self.options.prefix, r) for r in request_ids])
        out = {r: parse_ranks(raw) for r, raw in zip(request_ids, found, strict=True) if raw is not None}
        for request_id in (r for r, ranks in out.items() if ranks is None):
            self._log_once("ranks", f"the ranks key of request {request_id!r} is corrupt: its clicks are unmatched")
        return out

    def dead_letter(self, poison: list[tuple[bytes, dict[bytes, bytes], Poison]]) -> None:
        """Each record, without its inputs, with its reason and original id into the dead-letter stream,
        added to the done set and acknowledged, in one script; counts those this call dead-lettered."""
        if not poison:
            return
        keys = [shadow.done_key(self.options.prefix), self.stream, shadow.dead_letter_key(self.options.prefix)]
        args: list[Any] = [shadow.GROUP, DEAD_MAXLEN]
        for rid, fields, exc in poison:
            entry = dead_entry(rid, fields, exc)
            args += [rid, id_ms(rid), len(entry), *(part for pair in entry.items() for part in pair)]
        new = set(self.dead_script(keys=keys, args=args))
        for rid, _, exc in poison:
            if rid in new:
                self.metrics.dead.labels(exc.reason).inc()
                self._log_once(
                    exc.reason,
                    f"record {rid.decode()} dead-lettered: {exc} (reason {exc.reason}; further ones are only "
                    "counted in psad_shadow_dead_letters_total)",
                )

    def write(self, batch: Batch) -> float:
        """The batch's parquet parts; returns the processing time stamped on its rows."""
        now = time.time()
        try:
            for kind, rows in (("lists", batch.lists), ("clicks", batch.clicks)):
                for row in rows:
                    row.update(processed_at=now, consumer=self.options.consumer)
                results.write(self.options.out, kind, rows, self.options.consumer, self.options.window_s)
        except OSError as exc:
            self.metrics.write_errors.inc()
            if not self.write_failing:
                self.write_failing = True
                log.warning(
                    "cannot write results under %s (%s): the batch stays pending, retried with back-off "
                    "(psad_shadow_write_errors_total)",
                    self.options.out,
                    exc,
                )
            raise WriteFailed(f"results under {self.options.out}: {exc}") from exc
        if self.write_failing:
            self.write_failing = False
            log.info("results written again under %s", self.options.out)
        return now

    def commit(self, batch: Batch, now: float) -> set[str]:
        """The done set, ranks keys and acknowledgements in one script; returns the ids new to the done set."""
        rows = (*batch.lists, *batch.clicks)
        if not rows:
            return set()
        keys = [shadow.done_key(self.options.prefix), self.stream, *(key for key, _ in batch.ranks.values())]
        args: list[Any] = [shadow.GROUP, self.options.join_window_s, int(self.options.claim_idle_s * 1000), len(rows)]
        for row in rows:
            args += [row["record_id"], done_member(row), id_ms(row["record_id"])]
        for rid, (_, payload) in batch.ranks.items():
            args += [rid, payload]
        new = self.commit_script(keys=keys, args=args)
        return {rid.decode() for rid in new}

    def count(self, batch: Batch, new: set[str]) -> None:
        """Metrics of the records this consumer was the first to commit."""
        for row in batch.lists:
            if row["record_id"] in new:
                self.metrics.count_list(row)
        for row in batch.clicks:
            if row["record_id"] in new:
                self.metrics.count_click(row)

    def log_progress(self) -> None:
        """One line: records/s since the last one, and the group's lag and pending (gauges too)."""
        start, records = self.progress
        elapsed = max(time.monotonic() - start, 1e-9)
        lag: Any = "?"
        try:
            for group in self.client.xinfo_groups(self.stream):
                if group["name"] in (shadow.GROUP, shadow.GROUP.encode()):
                    self.metrics.pending.set(group["pending"])
                    lag = group.get("lag")
                    if lag is not None:
                        self.metrics.lag.set(lag)
        except redis.RedisError as exc:
            lag = f"unknown ({exc})"
        log.info(
            "%s: %d records in %.1f s (%.1f/s), lag %s", self.options.consumer, records, elapsed, records / elapsed, lag
        )
        self.progress = (time.monotonic(), 0)

    def _log_once(self, key: str, message: str) -> None:
        if key not in self.logged:
            self.logged.add(key)
            log.warning(message)
