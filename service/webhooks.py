"""Outgoing webhooks, one way for every event: a JSON body signed with HMAC-SHA256 under the receiver's
secret (`X-Microtasks-Signature: sha256=<hex>`), three tries with backoff, never blocking the request or
run that caused it, and never logging the secret or the signature.

A webhook is a request the server makes on a user's behalf, so its target is checked twice (SSRF): when
it is saved (`check_target`: https, a host that resolves only to public addresses) and when it is sent
(`GuardedResolver`: the connection goes to the address that was resolved and checked, so a DNS answer
that changes in between — rebinding — gains nothing; redirects are not followed). Loopback, private,
link-local (cloud metadata), multicast, unspecified and reserved ranges are refused, IPv4 and IPv6,
including IPv4 embedded in IPv6. The operator may allow http and some networks or hosts
(WEBHOOK_ALLOW_HTTP, WEBHOOK_ALLOW), for tests and private deployments.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Iterable

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

__all__ = ["SIGNATURE_HEADER", "Policy", "TargetRefused", "configure", "policy", "policy_for", "check_url", "check_target",
           "deliver", "sign", "forbidden_address"]

SIGNATURE_HEADER = "X-Microtasks-Signature"
log = structlog.get_logger("webhooks")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class TargetRefused(ValueError):
    """A webhook target the server will not call; the message says why (shown to the user as a 422)."""


@dataclass(frozen=True)
class Policy:
    """Where webhooks may go: https to public addresses, plus what the operator allows."""

    allow_http: bool = False
    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, allow_http: bool, entries: Iterable[str]) -> "Policy":
        """`entries`: networks (10.0.0.0/8, ::1) or host names (hooks.internal); ValueError on anything else."""
        networks, hosts = [], set()
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if not _hostname(entry):
                    raise ValueError(f"WEBHOOK_ALLOW: {raw!r} is neither a network nor a host name") from None
                hosts.add(entry.rstrip("."))
        return cls(allow_http, tuple(networks), frozenset(hosts))

    def address_ok(self, address: IPAddress) -> bool:
        return any(address in n for n in self.networks if n.version == address.version) or not forbidden_address(address)

    def host_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts


_POLICY = Policy()


def configure(allow_http: bool, allow: Iterable[str]) -> Policy:
    """Set the process's webhook policy (at startup, from WEBHOOK_ALLOW_HTTP and WEBHOOK_ALLOW)."""
    global _POLICY
    _POLICY = Policy.parse(allow_http, allow)
    return _POLICY


def policy() -> Policy:
    return _POLICY


@functools.lru_cache(maxsize=16)
def policy_for(allow_http: bool, allow: tuple[str, ...]) -> Policy:
    """The policy of one app's settings (several apps may share a process: tests)."""
    return Policy.parse(allow_http, allow)


def forbidden_address(address: IPAddress) -> bool:
    """Anything but a public unicast address; IPv4 inside IPv6 (mapped, 6to4, Teredo, NAT64) is judged as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return True if address.teredo or address.sixtofour else forbidden_address(embedded)
        if address.is_site_local:
            return True
    return (not address.is_global or address.is_multicast or address.is_private or address.is_loopback
            or address.is_link_local or address.is_reserved or address.is_unspecified)


def _hostname(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    last = labels[-1]
    if last.isdigit() or (last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])):
        return False  # a numeric "name" is an address in disguise (2130706433, 0x7f.1, 127.1)
    return 0 < len(host) <= 253 and all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii() for label in labels)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_url(url: str, pol: Policy | None = None) -> URL:
    """What can be said without DNS: scheme, no credentials, a host, and a literal address's range."""
    pol = pol or _POLICY
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise TargetRefused("not a valid URL") from None
    schemes = ("https", "http") if pol.allow_http else ("https",)
    if parsed.scheme not in schemes:
        raise TargetRefused("must be an https:// URL" if not pol.allow_http else "must be an http(s):// URL")
    if parsed.user is not None or parsed.password is not None:
        raise TargetRefused("must not carry credentials")
    host = (parsed.raw_host or "").lower()
    if not host:
        raise TargetRefused("must name a host")
    address = _literal(host)
    if address is not None:
        if not pol.address_ok(address):
            raise TargetRefused(f"{address} is not a public address")
    elif not _hostname(host):  # legacy numeric forms (2130706433, 0x7f.1, 127.1) and odd bytes
        raise TargetRefused("the host must be a DNS name or a canonical IP address")
    return parsed


async def check_target(url: str, pol: Policy | None = None) -> None:
    """Save-time check: check_url, then every address the host resolves to must be allowed."""
    pol = pol or _POLICY
    parsed = check_url(url, pol)
    host = parsed.raw_host or ""
    if _literal(host) is not None or pol.host_allowed(host):
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise TargetRefused(f"{host} does not resolve") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not pol.address_ok(address):
            raise TargetRefused(f"{host} resolves to {address}, which is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp, then keeps only allowed addresses: the connector connects to what was checked."""

    def __init__(self, pol: Policy) -> None:
        self.policy = pol
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.policy.host_allowed(host):
            return results
        allowed = [r for r in results if self.policy.address_ok(ipaddress.ip_address(r["host"].split("%")[0]))]
        if not allowed:
            raise OSError(f"webhook host {host} resolves to no public address")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def sign(secret: str, body: bytes) -> str:
    """What a receiver recomputes (and compares in constant time) to know the call came from us."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def deliver(url: str, secret: str, payload: dict[str, Any], *, tries: int = 3, backoff: float = 0.5,
                  pol: Policy | None = None) -> bool:
    """POST the payload; True once the receiver answered below 300 or a 4xx (never a redirect target)."""
    pol = pol or _POLICY
    try:
        check_url(url, pol)  # literal addresses bypass the resolver: checked here, again at send time
    except TargetRefused as exc:
        log.warning("webhook_refused", kind=payload.get("event"), reason=str(exc))
        return False
    body = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
    for attempt in range(tries):
        try:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(pol), use_dns_cache=False)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), connector=connector,
                                             trust_env=False) as s:
                async with s.post(url, data=body, headers=headers, allow_redirects=False) as r:
                    if r.status < 300 or 400 <= r.status < 500:
                        return True
                    log.info("webhook_failed", kind=payload.get("event"), attempt=attempt, status=r.status)
                    if r.status < 400:  # a redirect is not followed, nor retried
                        return False
        except Exception as exc:  # noqa: BLE001 - retried, then dropped (a cancel is a BaseException)
            log.info("webhook_failed", kind=payload.get("event"), attempt=attempt, error=type(exc).__name__)
        await asyncio.sleep(backoff * 2 ** attempt)
    return False
