"""USD → satoshi conversion for prices declared in dollars. Rate sources behind one interface: a fixed
configured rate (the offline default) and a live HTTP source (URL + JSON path) cached for a max age.
A stale or failing source raises RateUnavailable (503 with the reason), never a wrong price. All
arithmetic is on integers (cents, satoshis): sats = ceil(cents × 10^8 / cents_per_btc)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Protocol

import aiohttp

from .errors import ServiceUnavailable

__all__ = ["Rate", "RateSource", "FixedRate", "HttpRate", "FiatAmount", "usd_to_sats", "parse_usd"]

SATS_PER_BTC = 100_000_000


@dataclass(frozen=True)
class Rate:
    usd_per_btc: Decimal
    source: str
    fetched_at: float


class FiatAmount(int):
    """A price in satoshis that was converted from dollars; carries how, for the invoice."""

    usd: str
    rate: Rate

    def __new__(cls, sats: int, usd: str, rate: Rate) -> "FiatAmount":
        obj = super().__new__(cls, sats)
        obj.usd, obj.rate = usd, rate
        return obj

    def describe(self) -> dict[str, Any]:
        return {"currency": "USD", "amount": self.usd, "usd_per_btc": str(self.rate.usd_per_btc),
                "rate_source": self.rate.source, "rate_time": int(self.rate.fetched_at)}


def parse_usd(text: str) -> Decimal:
    """'$0.05', '0.05', '12' → Decimal; at most cents."""
    try:
        value = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise ValueError(f"not a dollar amount: {text!r}") from None
    if value <= 0 or value != value.quantize(Decimal("0.01")):
        raise ValueError(f"dollar amounts are positive with at most cents: {text!r}")
    return value


def usd_to_sats(usd: Decimal, rate: Rate) -> int:
    """Rounded up: the payee never receives less than the dollar price."""
    return int((usd * SATS_PER_BTC / rate.usd_per_btc).to_integral_value(rounding=ROUND_CEILING))


class RateSource(Protocol):
    async def current(self) -> Rate:
        """The rate to price with now; ServiceUnavailable when there is no fresh one."""


class FixedRate:
    def __init__(self, usd_per_btc: str) -> None:
        self.rate = Rate(Decimal(usd_per_btc), "fixed (USD_RATE)", time.time())

    async def current(self) -> Rate:
        return self.rate


class HttpRate:
    """GET `url`, read the number at the dotted `path` (e.g. `bitcoin.usd`), cache it for `max_age` s."""

    def __init__(self, url: str, path: str, max_age: float = 60, timeout: float = 5) -> None:
        self.url, self.path, self.max_age, self.timeout = url, path.split("."), max_age, timeout
        self._cached: Rate | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> Rate:
        if self._cached and time.time() - self._cached.fetched_at <= self.max_age:
            return self._cached
        async with self._lock:
            if self._cached and time.time() - self._cached.fetched_at <= self.max_age:
                return self._cached
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as s:
                    async with s.get(self.url) as r:
                        r.raise_for_status()
                        value: Any = await r.json(content_type=None)
                for key in self.path:
                    value = value[int(key)] if isinstance(value, list) else value[key]
                rate = Rate(Decimal(str(value)), self.url, time.time())
                if rate.usd_per_btc <= 0:
                    raise ValueError("non-positive rate")
            except Exception as exc:  # noqa: BLE001 - any failure means no fresh rate
                raise ServiceUnavailable("rate_unavailable", f"no fresh USD rate ({type(exc).__name__}); USD-priced "
                                         "routes are unavailable rather than priced wrong",
                                         headers={"Retry-After": "10"}) from None
            self._cached = rate
            return rate
