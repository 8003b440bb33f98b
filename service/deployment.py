"""A deployment's identity: its public origin (`PUBLIC_URL`), never the request's `Host` header.

Absolute URLs (the 402's `resource.url`, discovery) are built from it, and a BitTransfer must name it in
its `description`, so a transfer signed for one deployment cannot pay another. Without `PUBLIC_URL`
(local runs) the origin is `http://<HOST>:<the port the request arrived on>`, and any loopback name for
that port is accepted; production sets `PUBLIC_URL` (required on mainnet).
"""
from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from aiohttp import web

from . import protocol as P
from .config import ConfigError, Settings, public_origin

__all__ = ["origin", "absolute_url", "names_this_deployment", "deployment_id", "signing_origins"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_WILDCARD = {"", "0.0.0.0", "::"}


def _local_port(request: web.Request, settings: Settings) -> int:
    """The port the request arrived on (from the socket, not from anything the client wrote)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2 and isinstance(sockname[1], int):
        return sockname[1]
    return settings.port


def origin(settings: Settings, request: web.Request) -> str:
    """scheme://host[:port] of this deployment, as clients should address it."""
    if settings.public_url:
        return settings.public_url
    host = "127.0.0.1" if settings.host in _WILDCARD else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{_local_port(request, settings)}"


def absolute_url(settings: Settings, request: web.Request, path_qs: str | None = None) -> str:
    return origin(settings, request) + (request.path_qs if path_qs is None else path_qs)


def names_this_deployment(settings: Settings, request: web.Request, url: str) -> bool:
    """Is `url`'s origin this deployment's?"""
    parts = _origin_parts(url)
    if parts is None:
        return False
    theirs, scheme, hostname, port = parts
    if settings.public_url:
        return theirs == settings.public_url
    hosts = _LOOPBACK | ({settings.host} - _WILDCARD)
    return scheme == "http" and hostname in hosts and port == _local_port(request, settings)


@lru_cache(maxsize=4096)
def _origin_parts(url: str) -> tuple[str | None, str, str, int | None] | None:
    """(canonical origin, scheme, hostname, port) of `url`, None if it has none; cached: every paid call
    of a route names the same URL (a bounded cache, so odd URLs cost only their own parse)."""
    try:
        parts = urlsplit(url)
        theirs = public_origin(f"{parts.scheme}://{parts.netloc}")
        canonical = urlsplit(theirs or "")
        return theirs, canonical.scheme, canonical.hostname or "", canonical.port
    except (ValueError, ConfigError):
        return None


def deployment_id(settings: Settings) -> str:
    """What invoices are bound to (with the invoice secret): an invoice of one deployment pays no other."""
    return f"{settings.public_url or f'local:{settings.host}:{settings.port}'}|{settings.redis_prefix}"


def signing_origins(settings: Settings, request: web.Request) -> list[str]:
    """The origins a signature for this deployment may name (MT-Sig, registration): PUBLIC_URL only; on a
    local run, each loopback name (and HOST) with the port the request arrived on, as for BitTransfers."""
    if settings.public_url:
        return [settings.public_url]
    port = _local_port(request, settings)
    first = "127.0.0.1" if settings.host in _WILDCARD else settings.host
    hosts = [first] + sorted((_LOOPBACK | ({settings.host} - _WILDCARD)) - {first})
    return [P.origin_of(f"http://{f'[{h}]' if ':' in h else h}:{port}") for h in hosts]
