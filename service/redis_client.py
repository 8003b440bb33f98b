"""One way to open Redis, whatever REDIS_URL names: a single server, the master of a Sentinel group
(followed across failovers), or a Redis Cluster. Every money key shares the `{prefix}` hash tag, so each
Lua script and MULTI/EXEC touches one slot and runs unchanged on a cluster.

    redis://[:password@]host:6379/0, rediss://..., unix:///path/redis.sock
    redis+sentinel://[:password@]host1:26379,host2:26379/<master name>[/db]
    redis+cluster://[:password@]host1:7000[,host2:7001]
"""
from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

__all__ = ["connect", "safe_url"]


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
    if scheme == "redis+sentinel":
        parts = urlsplit(url)
        password, nodes = _hosts(parts.netloc, 26379)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("redis+sentinel:// URLs name the master: redis+sentinel://host:26379/mymaster[/db]")
        sentinel = Sentinel(nodes, sentinel_kwargs={"password": password, "socket_connect_timeout": timeout},
                            password=password, db=int(path[1]) if len(path) > 1 else 0, **common)
        return sentinel.master_for(path[0], max_connections=max_connections)
    if scheme == "redis+cluster":
        password, nodes = _hosts(urlsplit(url).netloc, 6379)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], password=password,
                            max_connections=max_connections, **common)
    return aioredis.Redis.from_url(url, max_connections=max_connections, **common)


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None and "@" not in parts.netloc:
        return url
    return url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
