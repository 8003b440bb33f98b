"""Spending tokens: `Authorization: Token <id>.<secret>`, issued by an account owner for CI jobs.

The token pays from its owner's account within its caveats (max total, max per call, expiry, route
prefixes, revocation); the ledger checks them and counts the spend in the same script as the hold.
Only sha256(secret) is stored. With an `Idempotency-Key` header a retried call pays once; with
`Payment-Amount` the call is refused (402) unless the price is exactly what the client agreed to; where a third
party sets the price (an expert, a list) `Payment-Amount` is required, so a price raised after the client
read it is never charged.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from aiohttp import web

from ..inputs import IDEMPOTENCY_KEY_RE
from .. import protocol as P
from ..config import Settings
from ..errors import BadRequest, PaymentRequired, Unauthorized
from ..invoices import Invoice
from ..keys import username_of
from ..ledger import Ledger, TokenSpend
from ..pricing import Quote
from . import Payment

__all__ = ["TokenPayment", "new_token", "secret_hash", "TOKEN_RE"]

TOKEN_RE = re.compile(r"\A(tk_[0-9a-f]{16})\.([A-Za-z0-9_-]{20,64})\Z")


def new_token() -> tuple[str, str]:
    """(token id, secret)."""
    return f"tk_{secrets.token_hex(8)}", secrets.token_urlsafe(24)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenPayment:
    name = P.METHOD_TOKEN

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self._known: dict[str, tuple[str, str]] = {}  # token id -> (owner, secret hash): immutable once issued

    def present(self, request: web.Request) -> bool:
        return request.headers.get(P.AUTHORIZATION, "").startswith(P.TOKEN_SCHEME + " ")

    async def challenge(self, quote: Quote, invoice: Invoice) -> None:
        """Nothing to offer: a token is issued to an account beforehand, never bought from a 402."""
        return None

    def offer_template(self, amount: int) -> None:
        return None

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        match = TOKEN_RE.match(request.headers[P.AUTHORIZATION][len(P.TOKEN_SCHEME) + 1:].strip())
        if not match:
            raise BadRequest("malformed_token", "expected Authorization: Token tk_<16 hex>.<secret>")
        token_id, secret = match.groups()
        agreed = request.headers.get(P.PAYMENT_AMOUNT)
        if agreed is None and quote.rule.set_by:  # a third party sets this price and may change it at any time
            raise PaymentRequired("amount_required", f"the price of this request is set by {quote.rule.set_by}: "
                                                     f"a token payment must name it with {P.PAYMENT_AMOUNT}: "
                                                     f"{quote.amount}")
        if agreed is not None and agreed != str(quote.amount):
            raise PaymentRequired("wrong_amount", f"the price of this request is {quote.amount} sat, "
                                                  f"{P.PAYMENT_AMOUNT} says {agreed}")
        key = request.headers.get(P.IDEMPOTENCY_KEY)
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise BadRequest("malformed_idempotency_key", "Idempotency-Key: 1-128 printable ASCII characters")
        owner = await self._owner(token_id, secret)
        # the receipt is opaque: token ids must not leak through receipts printed in CI logs
        transfer_id = "tok_" + (hashlib.sha256(f"{token_id}|{key}".encode()).hexdigest()[:40] if key
                                else secrets.token_hex(20))
        return Payment(method=self.name, transfer_id=transfer_id, payer=username_of(owner),
                       amount=quote.amount, token=TokenSpend(token_id, secret_hash(secret), request.path))

    async def _owner(self, token_id: str, secret: str) -> str:
        """The token's owner once its secret is verified (constant time): a wrong secret must never be
        charged to the owner (rate limit) nor tell anything about the token."""
        known = self._known.get(token_id)
        if known is None:
            record = await self.ledger.token(token_id)
            if record is not None:
                known = self._known.setdefault(token_id, (record["owner"], record["secret_hash"]))
        if known is None or not hmac.compare_digest(known[1], secret_hash(secret)):
            raise Unauthorized("token_invalid", "unknown token, or wrong secret")
        return known[0]
