"""The profile read on Redis Cluster: RespClient's multiplexed connections, one per node, routed by
redis-py's view of the cluster.

Why: on a cluster the read would otherwise go through redis-py's ClusterPipeline, whose per-call
cost (a connection checkout per node, command objects, locks) is what RespClient removes on a
single node. `python -m loadtest.resp_bench --mode cluster` measures the two on a real three-node
cluster (figures in docs/benchmarks.md).

What is whose: the topology (which node owns a slot, discovery, CLUSTER SLOTS refreshes) is the
store's redis-py RedisCluster's nodes manager, and the slot of a key is redis.crc.key_slot; this
module only groups commands by node, sends each node's group in one write on that node's
RespClient, all groups concurrently, and puts the replies back in the caller's order. A command's
key is its first argument (true of every command the profile store and the shadow writer send).

Redirections: a MOVED or ASK reply is retried at the node it names (ASK preceded by ASKING), at
most `max_redirects` times per command, after which the redirection stays in place as the
command's error; a MOVED also starts a topology refresh, so later reads route right at once. A
node that cannot be reached (ConnectionError) gives its commands a ConnectionError in their
places (raise_on_error=False; raised otherwise) while the other nodes' replies are returned, and
starts a refresh (a failover moves its slots to a replica); its RespClient reconnects by itself on
a later read once the node is back. Refreshes run in the background, one at a time and at most
one per REFRESH_INTERVAL_S, so an outage does not turn every read into a CLUSTER SLOTS.

TLS and credentials: each node's RespClient is made from the cluster's URL with the node's host
and port in it, so the SSL context (RespClient's rule: redis-py's from the same URL), the user and
the password are the same for every node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import RedisCluster
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from service.resp import Command, RespClient, within

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3  # a slot moved while a read was under way needs one; more means the topology is in flux
# At most one topology refresh per this many seconds: a failover is seen within it, while a node
# that stays down does not cost a CLUSTER SLOTS per read.
REFRESH_INTERVAL_S = 0.5
ASKING: Command = ("ASKING",)

# (node name "host:port", indices into the caller's commands, indices that go after an ASKING)
Group = tuple[str, list[int], set[int]]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _slot(command: Command) -> int:
    key = command[1]
    return key_slot(key.encode() if isinstance(key, str) else key)  # type: ignore[arg-type]  # keys are str or bytes


def _redirect(reply: ResponseError) -> tuple[str, str] | None:
    """("MOVED" or "ASK", "host:port") for a redirection, else None."""
    kind, _, rest = str(reply).partition(" ")
    return (kind, rest.rpartition(" ")[2]) if kind in ("MOVED", "ASK") else None


class ClusterReader:
    """A service.profiles.ProfileReader for Redis Cluster, over the store's RedisCluster client."""

    def __init__(
        self,
        cluster: RedisCluster,
        url: str,
        connect_timeout_s: float = 1.0,
        stale_s: float = 1.0,
        max_redirects: int = MAX_REDIRECTS,
    ):
        self.cluster = cluster
        self.nodes = cluster.nodes_manager
        self.url = urlsplit(url)
        self.connect_timeout_s = connect_timeout_s
        self.stale_s = stale_s
        self.max_redirects = max_redirects
        self.clients: dict[str, RespClient] = {}  # node name "host:port" -> its connection
        self._refresh: asyncio.Task | None = None
        self._refreshed_at = -math.inf  # monotonic time of the last refresh started

    async def connect(self) -> None:
        """Discover the cluster and open a connection to each primary now (else reads do, in their budget)."""
        await self.cluster.initialize()
        await asyncio.gather(*(self.client(n.name).connect() for n in self.nodes.get_nodes_by_server_type(PRIMARY)))

    def client(self, name: str) -> RespClient:
        """The RespClient of node `name` ("host:port"), made on first use."""
        client = self.clients.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            auth, at, _ = self.url.netloc.rpartition("@")
            netloc = f"{auth}{at}{f'[{host}]' if ':' in host else host}:{port}"
            node_url = urlunsplit(self.url._replace(netloc=netloc, path=""))
            client = RespClient(node_url, connect_timeout_s=self.connect_timeout_s, stale_s=self.stale_s)
            self.clients[name] = client
        return client

    async def execute(
        self, commands: Sequence[Command], timeout_s: float | None = None, raise_on_error: bool = True
    ) -> list[Any]:
        """RespClient.execute's contract over the cluster: replies in the caller's order, an error
        reply (or an unreachable node's ConnectionError) raised, or with raise_on_error=False in its
        command's place; asyncio.TimeoutError past timeout_s, one budget for every node and retry."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self.nodes.slots_cache:  # never discovered (the cluster was down at startup)
            await within(self.cluster.initialize(), timeout_s)
        by_node: dict[str, list[int]] = {}
        for i, command in enumerate(commands):
            by_node.setdefault(self.nodes.get_node_from_slot(_slot(command)).name, []).append(i)
        replies: list[Any] = [None] * len(commands)
        groups: list[Group] = [(name, idx, set()) for name, idx in by_node.items()]
        for _ in range(self.max_redirects + 1):
            groups = await self._round(commands, groups, replies, deadline)
            if not groups:
                break
        if raise_on_error:
            for r in replies:
                if isinstance(r, Exception):
                    raise r
        return replies

    async def _round(
        self, commands: Sequence[Command], groups: list[Group], replies: list[Any], deadline: float | None
    ) -> list[Group]:
        """Send each group to its node, concurrently; store the replies; return the redirected commands'
        groups for the next round."""
        left = _left(deadline)
        sends = [
            self._send(name, commands if len(idx) == len(commands) else [commands[i] for i in idx], asking, idx, left)
            for name, idx, asking in groups
        ]
        results = [await sends[0]] if len(sends) == 1 else await asyncio.gather(*sends)
        redirected: dict[str, Group] = {}
        for (_, idx, _), result in zip(groups, results, strict=True):
            if isinstance(result, Exception):
                self._refresh_soon()
                for i in idx:
                    replies[i] = result
                continue
            for i, reply in zip(idx, result, strict=True):
                replies[i] = reply
                if isinstance(reply, ResponseError) and (where := _redirect(reply)) is not None:
                    kind, name = where
                    group = redirected.setdefault(f"{kind} {name}", (name, [], set()))
                    group[1].append(i)
                    if kind == "ASK":
                        group[2].add(i)
                    else:
                        self._refresh_soon()
        return list(redirected.values())

    async def _send(
        self, name: str, commands: Sequence[Command], asking: set[int], idx: list[int], timeout_s: float | None
    ) -> list[Any] | RedisConnectionError:
        """One node's replies, or the ConnectionError that says it cannot be reached."""
        batch: Sequence[Command] = commands
        if asking:  # ASKING lets the next command through on a node importing its slot
            batch = [
                c
                for i, command in zip(idx, commands, strict=True)
                for c in ((ASKING, command) if i in asking else (command,))
            ]
        try:
            out = await self.client(name).execute(batch, timeout_s, raise_on_error=False)
        except RedisConnectionError as exc:
            return exc
        return [r for r, command in zip(out, batch, strict=True) if command is not ASKING] if asking else out

    def _refresh_soon(self) -> None:
        """Start a topology refresh unless one is under way or one started less than REFRESH_INTERVAL_S ago."""
        now = time.monotonic()
        if self._refresh is None and now - self._refreshed_at >= REFRESH_INTERVAL_S:
            self._refreshed_at = now
            self._refresh = asyncio.ensure_future(self._reload())

    async def _reload(self) -> None:
        try:
            await self.nodes.initialize()
        except Exception as exc:  # no node answered: the next failure tries again
            log.warning("redis cluster topology refresh failed", extra={"error": repr(exc)})
        else:
            for name in self.clients.keys() - self.nodes.nodes_cache.keys():  # nodes that left the cluster
                self.clients.pop(name).close()
        finally:
            self._refresh = None

    def close(self) -> None:
        """Close every node's connection; the RedisCluster client is the store's to close."""
        if self._refresh is not None:
            self._refresh.cancel()
        for client in self.clients.values():
            client.close()
        self.clients.clear()
