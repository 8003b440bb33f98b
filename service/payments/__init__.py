"""Payment methods behind one small interface; `PaymentMethods` picks the one a request uses and merges
every method's offer into the 402 (like aperture's MultiAuthenticator)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from ..invoices import Invoice
from ..ledger import TokenSpend
from ..pricing import Quote

__all__ = ["Payment", "PaymentMethod", "PaymentMethods"]


@dataclass(frozen=True)
class Payment:
    """A verified payment, ready to be held on the ledger under `transfer_id` (its idempotency key)."""

    method: str
    transfer_id: str
    payer: str                 # username
    amount: int
    payer_pubkey: str = ""     # hex; the ledger checks it is the payer's registered key, atomically
    x402: bool = False         # paid through PAYMENT-SIGNATURE: answer with PAYMENT-RESPONSE
    token: TokenSpend | None = None  # paid with a spending token: its caveats are checked in the hold


@runtime_checkable
class PaymentMethod(Protocol):
    name: str

    def present(self, request: web.Request) -> bool:
        """Does this request carry this method's payment headers?"""

    def offer(self, quote: Quote, invoice: Invoice) -> dict[str, Any]:
        """This method's entry in the 402's x402 `accepts` list."""

    def offer_template(self, amount: int) -> dict[str, Any]:
        """The same entry without an invoice, for discovery documents."""

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        """Check the payment against the quote without touching money; raise an ApiError with the reason."""


class PaymentMethods:
    def __init__(self, *methods: PaymentMethod) -> None:
        self.methods = methods

    def select(self, request: web.Request) -> PaymentMethod | None:
        for method in self.methods:
            if method.present(request):
                return method
        return None

    def offers(self, quote: Quote, invoice: Invoice) -> list[dict[str, Any]]:
        return [method.offer(quote, invoice) for method in self.methods]
