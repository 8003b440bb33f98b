"""Redis plumbing: one way to open Redis, whatever REDIS_URL names (a single server, the master of a
Sentinel group followed across failovers, or a Redis Cluster), and the auto-pipelining script batcher.
Every money key shares the `{prefix}` hash tag, so each Lua script and MULTI/EXEC touches one slot and
runs unchanged on a cluster.

    redis://[:password@]host:6379/0, rediss://..., unix:///path/redis.sock
    redis+sentinel://[:password@]host1:26379,host2:26379/<master name>[/db]
    redis+cluster://[:password@]host1:7000[,host2:7001]
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (ConnectionError as RedisConnectionError, NoScriptError, ResponseError,
                              TimeoutError as RedisTimeoutError)

try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency; redis-py's own packer then
    hiredis = None

__all__ = ["connect", "safe_url", "ScriptBatcher"]


def _hosts(netloc: str, default_port: int) -> tuple[str | None, list[tuple[str, int]]]:
    password, _, hosts = netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().partition(":")
        nodes.append((host or "127.0.0.1", int(port or default_port)))
    secret = unquote(password.split(":", 1)[-1]) if password else None
    return secret or None, nodes


def connect(url: str, *, timeout: float | None = None, max_connections: int = 256, **kwargs: Any) -> Any:
    """A redis.asyncio client (decode_responses) for `url`; raises ValueError on a malformed URL."""
    common: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": timeout, **kwargs}
    scheme = url.split("://", 1)[0]
    if scheme != "redis+cluster":  # a cluster client retries on its own (and follows the slot map)
        # After a Redis restart every pooled connection is stale: its first command fails with "Connection
        # closed by server"; that command never reached the new server, so it is sent again once on a fresh
        # connection. Only ConnectionError is retried, never a timeout (that command may still be running).
        # In the rare case that a connection breaks after the server ran a command but before its reply,
        # the command runs twice: safe for the money, since every ledger script is idempotent by its
        # transfer id and records are written with SET/HSET of the same values; only plain counters
        # (rate limits, expert stats, the active-runs count) could count one extra.
        common.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))
        common.setdefault("retry_on_error", [RedisConnectionError])
    if scheme == "redis+sentinel":
        parts = urlsplit(url)
        password, nodes = _hosts(parts.netloc, 26379)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// URLs name the master: redis+sentinel://host:26379/mymaster[/db]")
        sentinel = Sentinel(nodes, sentinel_kwargs={"password": password, "socket_connect_timeout": timeout},
                            password=password, db=int(path[1]) if len(path) > 1 else 0, **common)
        return _hiredis_packing(sentinel.master_for(path[0], max_connections=max_connections))
    if scheme == "redis+cluster":
        password, nodes = _hosts(urlsplit(url).netloc, 6379)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], password=password,
                            max_connections=max_connections, **common)
    return _hiredis_packing(aioredis.Redis.from_url(url, max_connections=max_connections, **common))


def _hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """redis-py's asyncio connections parse replies with hiredis but pack commands in Python (~38 us for a
    hold's EVALSHA here); hiredis packs the same bytes in ~5 us. Anything hiredis refuses (a bool, None)
    goes to redis-py's packer, which raises its usual error."""
    pool = client.connection_pool
    if hiredis is not None:
        pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return client


@functools.cache
def _packed_by_hiredis(cls: type) -> type:
    def pack_command(self: Any, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " not in args[0]:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return cls.pack_command(self, *args)

    return type(f"Hiredis{cls.__name__}", (cls,), {"pack_command": pack_command})


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    return url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)


_Batch = list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]]  # script, keys, args, the caller's future


class ScriptBatcher:
    """Auto-pipelining: script calls that arrive while a round trip is in flight are sent together in
    the next one (one pipeline per round trip, one round trip in flight per process).

    Each EVALSHA stays atomic on its own; batching only saves round trips and per-command overhead
    when many requests settle at once. Scripts missing from the server (after a Redis restart) are
    loaded and retried: a NOSCRIPT reply means that call did not run.
    """

    def __init__(self, redis: aioredis.Redis, timeout: float) -> None:
        self.redis = redis
        self.timeout = timeout
        # redis-py refuses EVALSHA inside a cluster pipeline: there, the batch goes out as concurrent calls
        self.cluster = isinstance(redis, RedisCluster)
        self.queue: _Batch = []
        self.drainer: asyncio.Task | None = None

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((script, keys, args, future))
        if self.drainer is None:
            self.drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the callers of this loop iteration queue up
            while self.queue:
                batch, self.queue = self.queue, []
                await self._run(batch)
        finally:
            self.drainer = None

    async def _run(self, batch: _Batch) -> None:
        if self.cluster:
            await self._run_concurrently(batch)
            return
        try:
            async with asyncio.timeout(self.timeout):
                results = await self._round_trip(batch)
            for (script, keys, args, _), i in zip(batch, range(len(results))):
                if isinstance(results[i], NoScriptError):
                    try:
                        results[i] = await script(keys=keys, args=args)  # loads it, then runs it once
                    except ResponseError as exc:  # that caller's own error reply
                        results[i] = exc
        except Exception as exc:  # the connection failed: every caller learns it
            if isinstance(exc, TimeoutError):  # our deadline, not redis-py's: still a Redis error (503)
                exc = RedisTimeoutError(f"no reply from Redis within {self.timeout} s")
            results = [exc] * len(batch)
        _settle(batch, results)

    async def _round_trip(self, batch: _Batch) -> list[Any]:
        """Every EVALSHA of the batch written at once on one pooled connection, then each reply read (an
        error reply is that caller's); ~half the client CPU of a redis-py pipeline. A connection that fails
        (or is abandoned mid-batch by the timeout) is closed, never reused out of step. A ConnectionError is
        retried once on a fresh connection, as the client's own Retry does (see connect())."""
        pool = self.redis.connection_pool
        commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch]
        for attempt in (1, 2):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                results: list[Any] = []
                for _ in commands:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
                return results
            except RedisConnectionError:
                await conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _run_concurrently(self, batch: _Batch) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(*(script(keys=keys, args=args) for script, keys, args, _ in batch),
                                               return_exceptions=True)
        except TimeoutError:
            results = [RedisTimeoutError(f"no reply from Redis within {self.timeout} s")] * len(batch)
        _settle(batch, results)


def _settle(batch: _Batch, results: list[Any]) -> None:
    """Each caller gets its own reply, or its own error (a failed script fails only its caller)."""
    for (*_, future), result in zip(batch, results):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
