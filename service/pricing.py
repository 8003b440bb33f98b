"""Prices are declared once per route (`@priced`) and resolved against the operator's price book."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from .config import Settings

__all__ = ["PriceRule", "Quote", "priced", "price_book", "route_rule", "quote_request", "request_hash", "describe"]

UnitCounter = Callable[[web.Request], Awaitable[int]]


@dataclass(frozen=True)
class PriceRule:
    """amount = base + per_unit × units, in integer satoshis."""

    name: str
    base: int
    per_unit: int = 0
    unit: str | None = None
    description: str = ""
    set_by: str = ""   # the price is set per request by someone else (e.g. "the expert's profile price")
    counts: str = ""   # how a unit is counted (published, so a buyer can compute the price before asking)

    def amount(self, units: int = 0) -> int:
        return self.base + self.per_unit * units

    def describe(self) -> dict[str, Any]:
        """The `x-price` extension published in openapi.yaml and the catalog."""
        out: dict[str, Any] = {"rule": self.name, "amount": self.base, "currency": "sat"}
        if self.set_by:
            out["formula"] = f"set by {self.set_by}"
        elif self.per_unit:
            out["per_unit"] = self.per_unit
            out["unit"] = self.unit
            out["formula"] = f"{self.base} + {self.per_unit} * {self.unit}s"
            if self.counts:
                out["counts"] = self.counts
        else:
            out["formula"] = "fixed"
        return out


@dataclass(frozen=True)
class Quote:
    """The price of one concrete request, bound to it by `request_hash`."""

    amount: int
    rule: PriceRule
    units: int
    resource: str          # "POST /v1/qa/validate"
    request_hash: str
    credit: str = ""       # the account paid into ("" = the operator's revenue)
    fiat: dict[str, Any] | None = None  # how a dollar price was converted (rate, source), for the invoice


def price_book(settings: Settings) -> dict[str, PriceRule]:
    """Every price rule of the service, from configuration."""
    from .qa.manifests import DOCUMENT_RULE  # noqa: PLC0415
    from .qa.suites import SUITES  # noqa: PLC0415  (suites register themselves; operators may add more)

    book = {
        "qa.validate": PriceRule(
            "qa.validate", settings.validate_base_price, settings.validate_per_document, "document",
            "Validate Kubernetes manifests against the API schemas of a Kubernetes version", counts=DOCUMENT_RULE,
        ),
    }
    book["experts.question"] = PriceRule("experts.question", 0, description="Ask an expert; paid on reply",
                                         set_by="the expert's profile price (GET /v1/experts/{username})")
    book["experts.hire"] = PriceRule("experts.hire", 0, description="A hire request to an expert; paid on reply",
                                     set_by="the expert's profile price (GET /v1/experts/{username})")
    book["lists.question"] = PriceRule("lists.question", 0, description="Ask a list; each reply is paid one share",
                                       set_by="the list's price per response × max_responses")
    for suite in SUITES.values():
        name = f"qa.run.{suite.id}"
        book[name] = PriceRule(name, suite.base_price, suite.per_document, "document",
                               f"QA run, suite '{suite.id}': {suite.description}", counts=DOCUMENT_RULE)
    return book


VariantPicker = Callable[[web.Request], Awaitable[str]]
AmountPicker = Callable[[web.Request], Awaitable[int]]
CreditPicker = Callable[[web.Request], Awaitable[str]]
PayerCheck = Callable[[web.Request, str], Awaitable[None]]


@dataclass(frozen=True)
class _Priced:
    rule: str
    units: UnitCounter | None
    variant: VariantPicker | None = None
    amount: AmountPicker | None = None
    credit: CreditPicker | None = None
    requires_account: bool = False  # what the call buys is kept for its payer: anonymous payments are refused
    payer_check: PayerCheck | None = None  # refuses a verified payer before any hold (no ledger state on refusal)


def priced(rule: str, *, units: UnitCounter | None = None, variant: VariantPicker | None = None,
           amount: AmountPicker | None = None, credit: CreditPicker | None = None,
           requires_account: bool = False, payer_check: PayerCheck | None = None) -> Callable:
    """Mark a handler as paid: quoted with price_book()[rule] (or [f"{rule}.{await variant(request)}"],
    e.g. one price per QA suite) times `units(request)`, or by `amount(request)` when the price is set by
    someone else (an expert's own price). The money goes to revenue, or to `credit(request)` (an escrow).
    `requires_account`: the result is read later by its payer (a run, a question) or refunded to them, so
    a payment method without an account (anonymous on-chain) must name one (a signed request).
    `payer_check(request, payer)` raises an ApiError for a payer the call cannot serve, before the hold."""

    def mark(handler: Callable) -> Callable:
        handler.__priced__ = _Priced(rule, units, variant, amount, credit, requires_account, payer_check)  # type: ignore[attr-defined]
        return handler

    return mark


def describe(rule: str, book: dict[str, PriceRule]) -> dict[str, Any]:
    """The `x-price` of a route: its rule, or the family of per-variant rules (`qa.run.schema`, ...)."""
    if rule in book:
        return book[rule].describe()
    variants = {name[len(rule) + 1:]: r.describe() for name, r in sorted(book.items()) if name.startswith(rule + ".")}
    return {"rule": rule, "currency": "sat", "formula": "by variant", "variants": variants}


def route_rule(handler: Any) -> _Priced | None:
    return getattr(handler, "__priced__", None)


def request_hash(method: str, path_qs: str, body: bytes) -> str:
    """sha256 over method, path with query, and body: binds an invoice to exactly one request."""
    h = hashlib.sha256(f"{method.upper()}\n{path_qs}\n".encode())
    h.update(body)
    return h.hexdigest()


async def quote_request(request: web.Request, marker: _Priced, book: dict[str, PriceRule]) -> Quote:
    rule = book[f"{marker.rule}.{await marker.variant(request)}" if marker.variant else marker.rule]
    units = await marker.units(request) if marker.units else 0
    amount = await marker.amount(request) if marker.amount else rule.amount(units)  # may be a FiatAmount
    body = await request.read() if request.body_exists else b""
    return Quote(
        amount=amount, rule=rule, units=units,
        resource=f"{request.method} {request.path}",
        request_hash=request_hash(request.method, request.path_qs, body),
        credit=await marker.credit(request) if marker.credit else "",
        fiat=amount.describe() if hasattr(amount, "describe") else None,
    )
