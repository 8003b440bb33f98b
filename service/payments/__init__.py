"""Payment methods split as aperture does: each is a challenger (what it asks for in a 402: an `Offer`)
and a verifier (does this request pay?), with optional abilities (settle after the handler, keep failed
payments). `PaymentMethods` picks the verifier a request uses and gathers every challenger's offer;
service/challenge.py merges them into the one 402."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from .. import protocol as P
from ..errors import BadRequest
from ..invoices import Invoice
from ..ledger import TokenSpend
from ..pricing import Quote

__all__ = ["x402_payload", "x402_scheme", "Payment", "Offer", "PaymentMethod", "PaymentMethods", "KeepsFailedPayments",
           "Settles", "PaidBefore"]


_PAYLOAD = web.RequestKey("x402_payload", dict)


def x402_payload(request: web.Request) -> dict[str, Any]:
    """PAYMENT-SIGNATURE decoded once per request: a v2 PaymentPayload with dicts `accepted` and
    `payload`; BadRequest `malformed_payment` otherwise."""
    cached = request.get(_PAYLOAD)
    if cached is not None:
        return cached
    try:
        data = json.loads(base64.b64decode(request.headers[P.PAYMENT_SIGNATURE], validate=True))
    except (binascii.Error, ValueError):
        raise BadRequest("malformed_payment", "PAYMENT-SIGNATURE is not base64 of a JSON object") from None
    if (not isinstance(data, dict) or data.get("x402Version") != P.X402_VERSION
            or not isinstance(data.get("accepted"), dict) or not isinstance(data.get("payload"), dict)):
        raise BadRequest("malformed_payment", "PAYMENT-SIGNATURE must be an x402 v2 PaymentPayload "
                                              "({x402Version: 2, accepted: {...}, payload: {...}})")
    request[_PAYLOAD] = data
    return data


def x402_scheme(request: web.Request) -> str:
    """The scheme a PAYMENT-SIGNATURE names ("" when there is none or it does not decode): picks the verifier."""
    if P.PAYMENT_SIGNATURE not in request.headers:
        return ""
    try:
        scheme = x402_payload(request)["accepted"].get("scheme")
    except BadRequest:
        return ""
    return scheme if isinstance(scheme, str) else ""


@dataclass(frozen=True)
class Offer:
    """One method's part of a 402: its x402 `accepts` entry (None: not offered to x402 clients) and the
    headers of its own dialect (21's Price/Bitcoin-Address/Username), merged by service/challenge.py."""

    method: str
    accepts: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # what a header family of its own reads (payments/mpp.py)


@dataclass(frozen=True)
class Payment:
    """A verified payment, ready to be held on the ledger under `transfer_id` (its idempotency key)."""

    method: str
    transfer_id: str
    payer: str                 # username
    amount: int
    payer_pubkey: str = ""     # hex; the ledger checks it is the payer's registered key, atomically
    x402: bool = False         # paid through PAYMENT-SIGNATURE: answer with PAYMENT-RESPONSE
    payer_id: str = ""         # x402 SettleResponse.payer: the payer's address or key (the username goes aside)
    token: TokenSpend | None = None  # paid with a spending token: its caveats are checked in the hold
    debit: str = ""            # the account paying ("" = the payer's user account; on-chain: the chain account)
    settle_data: dict[str, str] = field(default_factory=dict)  # method-specific facts (txid, amount paid)
    replay_until: float = 0.0  # unix s after which this payment is refused anyway (0: it may always come back)


@runtime_checkable
class PaymentMethod(Protocol):
    name: str

    def present(self, request: web.Request) -> bool:
        """Does this request carry this method's payment headers?"""

    async def challenge(self, quote: Quote, invoice: Invoice) -> Offer | None:
        """What this method asks for in the 402 of `quote` (None: it cannot take this price)."""

    def offer_template(self, amount: int) -> dict[str, Any] | None:
        """Its x402 `accepts` entry without an invoice, for discovery documents (None: not an x402 scheme)."""

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        """Check the payment against the quote without touching money; raise an ApiError with the reason."""


class PaidBefore(Exception):
    """Raised by `verify` for a retry of a payment whose ledger transfer exists already: the paywall
    answers from what became of the first request (its kept response, or why there is none)."""

    def __init__(self, transfer_id: str) -> None:
        super().__init__(transfer_id)
        self.transfer_id = transfer_id


@runtime_checkable
class KeepsFailedPayments(Protocol):
    """A method whose money cannot simply go back when the call fails (coins already on chain): it
    books it somewhere for a refund instead."""

    async def on_void(self, ledger: Any, payment: Payment) -> None: ...


@runtime_checkable
class Settles(Protocol):
    """A method whose money moves only once the call succeeded (x402 exact-BTC broadcasts then): called
    after the handler's 2xx, before the capture; raising refuses the response (fail closed, not charged)."""

    async def settle(self, ledger: Any, payment: Payment) -> None: ...


class PaymentMethods:
    def __init__(self, *methods: PaymentMethod) -> None:
        self.methods = methods

    def select(self, request: web.Request) -> PaymentMethod | None:
        for method in self.methods:
            if method.present(request):
                return method
        return None

    async def challenge(self, quote: Quote, invoice: Invoice) -> list[Offer]:
        """Every method's offer; a method returns None when it cannot take this price (on-chain limits)."""
        offers = await asyncio.gather(*[method.challenge(quote, invoice) for method in self.methods])
        return [offer for offer in offers if offer is not None]
