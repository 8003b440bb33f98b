"""Payment methods behind one small interface; `PaymentMethods` picks the one a request uses and merges
every method's offer into the 402 (like aperture's MultiAuthenticator)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from ..invoices import Invoice
from ..ledger import TokenSpend
from ..pricing import Quote

__all__ = ["Payment", "PaymentMethod", "PaymentMethods", "KeepsFailedPayments", "PaidBefore"]


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
    debit: str = ""            # the account paying ("" = the payer's user account; on-chain: the chain account)
    settle_data: dict[str, str] = field(default_factory=dict)  # method-specific facts (txid, amount paid)
    replay_until: float = 0.0  # unix s after which this payment is refused anyway (0: it may always come back)


@runtime_checkable
class PaymentMethod(Protocol):
    name: str

    def present(self, request: web.Request) -> bool:
        """Does this request carry this method's payment headers?"""

    def offer(self, quote: Quote, invoice: Invoice) -> dict[str, Any] | None:
        """This method's entry in the 402's x402 `accepts` list (None: not for this price)."""

    def offer_template(self, amount: int) -> dict[str, Any]:
        """The same entry without an invoice, for discovery documents."""

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


class PaymentMethods:
    def __init__(self, *methods: PaymentMethod) -> None:
        self.methods = methods

    def select(self, request: web.Request) -> PaymentMethod | None:
        for method in self.methods:
            if method.present(request):
                return method
        return None

    def offers(self, quote: Quote, invoice: Invoice) -> list[dict[str, Any]]:
        """Every method's offer; a method returns None when it cannot take this price (on-chain limits)."""
        return [offer for method in self.methods if (offer := method.offer(quote, invoice)) is not None]
