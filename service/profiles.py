"""User profiles in Redis: raw values in, encoded profiles out.

Key layout (both keys of a user share the hash tag ``{<user_id>}``, so they live in one Redis
Cluster slot and a pipeline or script may touch both):

    <prefix>:{<user_id>}:u   hash: feature name -> RAW value (categorical value as text,
                             numeric as a decimal string)
    <prefix>:{<user_id>}:h   sorted set of behaviours, score = timestamp (unix s), member
                             "<timestamp>|<action>|<event id>|<item_id>" (item id last, so it may
                             contain '|'); capped to the last N behaviours
    <prefix>:profiles        string, no TTL: the load marker, JSON {"generation", "loaded_at", "source",
                             "users", "behaviours"}, written when `psad profiles load` (bulk_load)
                             completes or by `psad profiles mark` (stores fed only by /events). A
                             store that answers without it has lost its data (an empty restart, a
                             FLUSHALL): the service flags its answers `profiles_missing`
    <prefix>:{shadow}:...    the shadow stream and the consumer's keys (export/contract/shadow.py)
    <prefix>:i:<item_id>     hash: an item's content, feature name -> RAW value (as the user hash;
                             export/contract/content.py encodes it), plus the field "@loaded_at"
                             (unix s), so an item loaded with every feature missing still exists;
                             written by `psad items load`, read only for sid bundles and only for
                             items the bundle's vocabulary does not hold
    <prefix>:items           string, no TTL: the item load marker, JSON {"generation", "loaded_at",
                             "source", "items"}, written when `psad items load` completes

Raw values (item ids, action names, categorical values) are stored rather than indices, so a new
model version with new vocabularies reads the same profiles: encoding happens at read time with
the serving bundle's vocabularies. One pipelined round trip reads a whole profile. An append is one
Lua script (ZADD + trim + EXPIRE), atomic with no read-modify-write race; members sort by
timestamp, so late events land in place. A member carries an event id: an event whose id is
already in the user's history is not stored again, whatever its timestamp.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis
import redis.asyncio as aredis
import redis.cluster
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from export.contract.inputs import EncodedProfile
from export.contract.schema import OOV, FeatureSchema, Vocabularies
from service.resp import Command, within

# What an unreachable or failing profile store raises: redis-py's errors, Redis Cluster's own
# (RedisClusterException is no RedisError: cluster down, slot not covered), and socket errors.
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
# An error in a command's place that says the store was not reached, rather than that the keys are bad.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

# KEYS[1] = history, KEYS[2] = user hash; ARGV = cap, ttl, then (score, member) pairs. An event
# whose id (a member's third field) is already in the history is skipped: a retry stores nothing,
# even when its timestamp differs (the service stamps events sent without one on each attempt).
APPEND_LUA = """
local function event_id(m) return string.match(m, '^[^|]*|[^|]*|([^|]*)|') end
local seen = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local id = event_id(m)
  if id then seen[id] = true end
end
for i = 3, #ARGV, 2 do
  local id = event_id(ARGV[i + 1])
  if not seen[id] then
    redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
    seen[id] = true
  end
end
local cap = tonumber(ARGV[1])
if cap > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -cap - 1) end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return redis.call('ZCARD', KEYS[1])
"""


class AppendFailed(Exception):
    """Some users' appends failed inside Redis (a key of another type, out of memory); the other
    users' events are stored. failed: user id -> Redis's error."""

    def __init__(self, failed: dict[str, str], stored_users: int):
        super().__init__(f"{len(failed)} user(s) not stored")
        self.failed = failed
        self.stored_users = stored_users


def user_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:{{{user_id}}}:u"


def history_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:{{{user_id}}}:h"


def member(timestamp: int, action: str, event_id: str, item_id: str) -> str:
    return f"{timestamp}|{action}|{event_id}|{item_id}"


def item_key(prefix: str, item_id: str) -> str:
    """An item's content hash (no hash tag: with Redis Cluster items spread over the slots by id)."""
    return f"{prefix}:i:{item_id}"


def items_marker_key(prefix: str) -> str:
    return f"{prefix}:items"


ITEM_LOADED_FIELD = "@loaded_at"  # in every item hash: not a feature, so content readers drop it


def member_item(member: str) -> str:
    """The item id of a history member ("" for a malformed one, which encode_profile skips)."""
    parts = member.split("|", 3)
    return parts[3] if len(parts) == 4 else ""


def marker_key(prefix: str) -> str:
    """The load marker's key (no hash tag: with Redis Cluster it lives on one node)."""
    return f"{prefix}:profiles"


def write_marker(
    client: redis.Redis | redis.cluster.RedisCluster,
    prefix: str,
    source: str,
    users: int | None = None,
    behaviours: int | None = None,
) -> dict[str, Any]:
    """Mark the store as loaded: a new generation id, replacing any earlier marker, with no TTL
    (SET clears one). Returns what was written."""
    marker = {
        "generation": uuid.uuid4().hex,
        "loaded_at": int(time.time()),
        "source": source,
        "users": users,
        "behaviours": behaviours,
    }
    client.set(marker_key(prefix), json.dumps(marker))
    return marker


def mark_loaded(redis_url: str, prefix: str = "psad", cluster: bool = False) -> dict[str, Any]:
    """`psad profiles mark`: write the marker without loading data, for a store fed only by /events."""
    client = redis.cluster.RedisCluster.from_url(redis_url) if cluster else redis.Redis.from_url(redis_url)
    try:
        return write_marker(client, prefix, "psad profiles mark")
    finally:
        client.close()


@dataclass
class RawProfile:
    """A profile as stored: user feature values and history members, oldest first."""

    user: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    error: str | None = None  # Redis refused this user's read (a key of another type): unusable


def encode_profile(raw: RawProfile, schema: FeatureSchema, vocabs: Vocabularies) -> tuple[EncodedProfile, int]:
    """Encode with the serving bundle's vocabularies; returns the profile and the number of corrupt
    entries skipped (unparseable numbers or history members). Unknown values encode as OOV."""
    corrupt = 0
    user = raw.user
    user_cat = np.zeros(len(schema.user_categorical), dtype=np.int64)
    for j, f in enumerate(schema.user_categorical):
        value = user.get(f.name)
        if value is not None:
            user_cat[j] = vocabs.user_categorical[f.name].index(value)
    user_num = np.zeros(len(schema.user_numeric), dtype=np.float32)
    for j, numeric in enumerate(schema.user_numeric):
        value = user.get(numeric.name)
        if value is None:
            continue
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if math.isfinite(x):
            user_num[j] = x
        else:
            corrupt += 1
    # History members "<ts>|<action>|<event id>|<item_id>": split once, convert column by column.
    parts = [m.split("|", 3) for m in raw.history]
    good = [p for p in parts if len(p) == 4 and p[3] and p[0].isascii() and p[0].isdigit()]  # int() takes these
    corrupt += len(parts) - len(good)
    if not good:
        empty = np.zeros(0, np.int64)
        return EncodedProfile(user_cat, user_num, empty, empty, empty), corrupt
    stamps, names, _, item_ids = zip(*good, strict=True)
    codes = schema.action_codes
    ts = np.array(list(map(int, stamps)), dtype=np.int64)
    actions = np.array([codes.get(a, OOV) for a in names], dtype=np.int64)
    items = np.array(vocabs.items.indices(item_ids), dtype=np.int64)
    if len(ts) > 1 and (ts[1:] < ts[:-1]).any():  # members sort by score; keep the contract explicit
        order = np.argsort(ts, kind="stable")
        ts, actions, items = ts[order], actions[order], items[order]
    return EncodedProfile(user_cat, user_num, items, ts, actions), corrupt


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fields(reply: dict | list) -> dict[str, str]:
    """An HGETALL reply as text: a dict (redis-py) or a flat [field, value, ...] list (raw RESP)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    if reply and isinstance(reply[0], str):
        return dict(zip(reply[0::2], reply[1::2], strict=True))
    return dict(zip(map(_text, reply[0::2]), map(_text, reply[1::2]), strict=True))


def _members(reply: list) -> list[str]:
    """A ZRANGE ... REV reply (newest first) as text, oldest first."""
    reply = reply[::-1]
    return reply if not reply or isinstance(reply[0], str) else [_text(m) for m in reply]


def _profile(user: Any, history: Any) -> RawProfile | None:
    if any(isinstance(r, UNREACHABLE) for r in (user, history)):
        return None  # its node did not answer (Redis Cluster): a failed read, not a bad profile
    errors = [str(r) for r in (user, history) if isinstance(r, Exception)]
    return RawProfile(error="; ".join(errors)) if errors else RawProfile(_fields(user), _members(history))


@dataclass
class StoredContent:
    """An item's content as stored: feature -> raw text (the load marker field dropped)."""

    fields: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # Redis refused the read (a key of another type): unusable


def _contents(item_ids: Sequence[str], replies: Sequence[Any]) -> dict[str, StoredContent]:
    """The items found: an empty hash is an item never loaded, an unreachable node one not read."""
    out: dict[str, StoredContent] = {}
    for item_id, reply in zip(item_ids, replies, strict=True):
        if isinstance(reply, UNREACHABLE):
            continue
        if isinstance(reply, Exception):
            out[item_id] = StoredContent(error=str(reply))
        elif reply:
            fields = _fields(reply)
            fields.pop(ITEM_LOADED_FIELD, None)
            out[item_id] = StoredContent(fields)
    return out


class ProfileReader(Protocol):
    """How a ProfileStore reads: its commands sent in one round trip, their replies in order, with
    raise_on_error=False an error reply in its command's place. service.resp.RespClient is the
    request path's reader on one node, service.resp_cluster.ClusterReader on Redis Cluster;
    RedisPyReader is the reference, and the one wherever neither applies."""

    async def execute(
        self, commands: Sequence[Command], timeout_s: float | None = None, raise_on_error: bool = True
    ) -> list[Any]: ...

    def close(self) -> None: ...


class RedisPyReader:
    """The reference ProfileReader: a redis-py pipeline over the store's client (on Redis Cluster a
    ClusterPipeline, routing each command to its node), TLS coming with the client."""

    def __init__(self, client: aredis.Redis | RedisCluster):
        self.client = client

    async def execute(
        self, commands: Sequence[Command], timeout_s: float | None = None, raise_on_error: bool = True
    ) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:  # released however it ends
            for command in commands:
                pipe.execute_command(*command)
            return await within(pipe.execute(raise_on_error=raise_on_error), timeout_s)

    def close(self) -> None:
        """Nothing of its own: the connections are the client's, which the store closes."""


class ProfileStore:
    """Async reads (one pipelined round trip per request or batch) and atomic appends.

    Reads go through `reader` (a ProfileReader; default: RedisPyReader over `client`). The redis-py
    `client` always does the appends, PING and EXISTS.
    """

    def __init__(
        self, client: aredis.Redis | RedisCluster, prefix: str, ttl_s: int, reader: ProfileReader | None = None
    ):
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.reader = reader if reader is not None else RedisPyReader(client)
        self.cluster = isinstance(client, RedisCluster)
        self._append = None if self.cluster else client.register_script(APPEND_LUA)

    def read_commands(self, user_ids: Sequence[str], now: Sequence[float], max_history: int) -> list[tuple]:
        """HGETALL + ZRANGE (the last max_history behaviours strictly before `now`, newest first) per user."""
        commands: list[tuple] = []
        for uid, t in zip(user_ids, now, strict=True):
            commands.append(("HGETALL", user_key(self.prefix, uid)))
            since = f"({float(t)!r}"
            commands.append(
                ("ZRANGE", history_key(self.prefix, uid), since, "-inf", "BYSCORE", "REV", "LIMIT", 0, max_history)
            )
        return commands

    async def read(
        self, user_ids: Sequence[str], now: Sequence[float], max_history: int, timeout_s: float | None = None
    ) -> list[RawProfile | None]:
        """Each user's features and their last max_history behaviours strictly before `now`;
        asyncio.TimeoutError past timeout_s (None: no limit). A user whose keys Redis cannot read
        as a profile gets a RawProfile with `error` set, one whose cluster node is unreachable gets
        None; the other users are read as usual."""
        commands = self.read_commands(user_ids, now, max_history)
        replies = await self.reader.execute(commands, timeout_s, raise_on_error=False)
        return [_profile(u, h) for u, h in zip(replies[0::2], replies[1::2], strict=True)]

    async def read_with_items(
        self,
        user_ids: Sequence[str],
        now: Sequence[float],
        max_history: int,
        item_ids: Sequence[str],
        timeout_s: float | None = None,
    ) -> tuple[list[RawProfile | None], dict[str, StoredContent]]:
        """`read`, plus the stored content of `item_ids` in the same round trip (one HGETALL each):
        item id -> StoredContent for the items found."""
        commands = self.read_commands(user_ids, now, max_history)
        commands += [("HGETALL", item_key(self.prefix, i)) for i in item_ids]
        replies = await self.reader.execute(commands, timeout_s, raise_on_error=False)
        n = 2 * len(user_ids)
        profiles = [_profile(u, h) for u, h in zip(replies[0:n:2], replies[1:n:2], strict=True)]
        return profiles, _contents(item_ids, replies[n:])

    async def read_items(self, item_ids: Sequence[str], timeout_s: float | None = None) -> dict[str, StoredContent]:
        """The stored content of `item_ids` (one round trip): item id -> StoredContent for those found."""
        return (await self.read_with_items((), (), 0, item_ids, timeout_s))[1]

    async def append(self, events: Sequence[tuple[str, str, str, int, str | None]], cap: int) -> None:
        """events: (user_id, item_id, action, timestamp, event_id or None); one script call per user,
        all in one pipelined round trip (with Redis Cluster: one per node, concurrently).
        AppendFailed when some users' scripts fail in Redis (the others' events are stored)."""
        by_user: dict[str, list] = {}
        for uid, item, action, ts, event_id in events:
            by_user.setdefault(uid, []).extend([ts, member(ts, action, event_id or uuid.uuid4().hex[:16], item)])
        # `async with` releases the pipeline's connection however execute() ends: redis-py's
        # execute() checks the scripts (SCRIPT EXISTS) before its own cleanup starts, so a failure or
        # a timeout there would otherwise keep the connection out of the pool for good.
        async with self.client.pipeline(transaction=False) as pipe:
            for uid, args in by_user.items():
                keys = [history_key(self.prefix, uid), user_key(self.prefix, uid)]
                if self._append is None:  # a cluster: EVAL, routed by its keys; no node need cache the script
                    pipe.eval(APPEND_LUA, 2, *keys, cap, self.ttl_s, *args)
                else:  # a single node's pipeline, which redis-py's Script accepts as its client
                    await self._append(keys=keys, args=[cap, self.ttl_s, *args], client=pipe)  # type: ignore[arg-type]
            results = await pipe.execute(raise_on_error=False)
        failed = {uid: str(r) for uid, r in zip(by_user, results, strict=True) if isinstance(r, Exception)}
        if failed:
            raise AppendFailed(failed, len(by_user) - len(failed))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def marked(self) -> bool:
        """Whether the load marker is there (one EXISTS)."""
        return bool(await self.client.exists(marker_key(self.prefix)))

    async def aclose(self) -> None:
        self.reader.close()
        await self.client.aclose()


def connect(url: str, pool_size: int, timeout_s: float, cluster: bool = False) -> aredis.Redis | RedisCluster:
    """An async redis-py client (hiredis parses replies): over a bounded pool for one node, or a
    Redis Cluster client that discovers the nodes from `url` (pool_size connections per node).

    One node: a command that meets a connection error is retried once, at once, on a fresh
    connection, so the pooled connections a Redis restart closed reconnect instead of failing a
    call each. Appends are idempotent by event id (ids are fixed before the pipeline is sent),
    so a retried pipeline stores nothing twice."""
    if cluster:
        return RedisCluster.from_url(
            url, max_connections=pool_size, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    )
    return aredis.Redis(connection_pool=pool)
