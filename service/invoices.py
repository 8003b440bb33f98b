"""Stateless invoices: an HMAC-signed id binds amount, payee, request hash and expiry, so issuing a 402
writes nothing to Redis (anonymous 402 traffic cannot fill memory) and any server process can check it.
The secret is INVOICE_SECRET, or one random secret shared by all processes through Redis (SET NX).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from .errors import ServiceUnavailable
from .inputs import ascii_int
from .keys import Keys
from .pricing import Quote

__all__ = ["Invoice", "Invoices", "load_secret"]


@dataclass(frozen=True)
class Invoice:
    id: str
    amount: int
    payee: str
    address: str
    resource: str
    request_hash: str
    expires_at: int
    fiat: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id, "amount": self.amount, "currency": "sat", "payee": self.payee,
            "resource": self.resource, "request_hash": self.request_hash,
            "expires_at": self.expires_at, "address": self.address,
        }
        if self.fiat:
            out["fiat"] = self.fiat
        return out


class Invoices:
    def __init__(self, secret: bytes | None, *, ttl: int, payee: str, address: str, deployment: str = "") -> None:
        self.secret = secret  # None until loaded from Redis (the health monitor does that)
        self.deployment = deployment  # bound into every MAC: an invoice of one deployment pays no other
        self.ttl = ttl
        self.payee = payee
        self.address = address

    def _mac(self, expires: int, nonce: str, amount: int, address: str, request_hash: str) -> str:
        msg = f"{self.deployment}|{expires}|{nonce}|{amount}|{self.payee}|{address}|{request_hash}".encode()
        if self.secret is None:
            raise ServiceUnavailable("ledger_unavailable", "the service is starting; retry shortly",
                                     headers={"Retry-After": "1"})
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def issue(self, quote: Quote, address: str | None = None, now: float | None = None) -> Invoice:
        """`address`: the invoice's own receiving address (derived from the xpub), else the static one."""
        expires = int((now or time.time()) + self.ttl)
        nonce = secrets.token_hex(6)
        address = address or self.address
        invoice_id = f"inv_{expires}_{nonce}_{self._mac(expires, nonce, quote.amount, address, quote.request_hash)}"
        return Invoice(invoice_id, int(quote.amount), self.payee, address, quote.resource, quote.request_hash, expires,
                       quote.fiat)

    def check(self, invoice_id: str, quote: Quote, address: str, now: float | None = None) -> str | None:
        """None if `invoice_id` was issued by us for this very request, amount and address and is
        unexpired; otherwise the reason code."""
        parts = invoice_id.split("_")
        expires = ascii_int(parts[1], 12) if len(parts) == 4 and parts[0] == "inv" else None
        if expires is None:
            return "invoice_invalid"
        nonce, mac = parts[2], parts[3]
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"),
                                   self._mac(expires, nonce, quote.amount, address, quote.request_hash).encode()):
            return "invoice_mismatch"
        if expires < (now or time.time()):
            return "invoice_expired"
        return None


async def load_secret(redis: aioredis.Redis, prefix: str, configured: str | None) -> bytes:
    """The configured secret, else one shared by every process on this Redis (created once, SET NX)."""
    if configured:
        return configured.encode()
    key = Keys(prefix).invoice_secret
    await redis.set(key, secrets.token_hex(32), nx=True)
    value = await redis.get(key)
    return value.encode() if isinstance(value, str) else value
