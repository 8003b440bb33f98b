"""The one place that renders a 402. Every payment method's challenger returns an `Offer` (its x402
`accepts` entry and its own dialect's headers); this module merges them into one JSON body (x402 v2
`PaymentRequired` plus our invoice) and runs every header family over it. A new dialect is one more
entry in HEADER_FAMILIES (the IETF "Payment" scheme's WWW-Authenticate is one), or one more method's offer."""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

from . import protocol as P
from .invoices import Invoice
from .payment_auth import problem
from .payments import Offer
from .payments.mpp import www_authenticate
from .pricing import Quote

__all__ = ["Challenge", "HEADER_FAMILIES", "bazaar_extension", "payment_required_body", "render_402", "render_refusal", "settle_response"]


@dataclass(frozen=True)
class Challenge:
    """Everything a header family may read: the merged body, the offers, and (for a priced call) the
    quote and invoice; a 402 raised outside the paywall (a balance too low) has neither and no offers."""

    url: str
    body: dict[str, Any]
    offers: list[Offer]
    quote: Quote | None = None
    invoice: Invoice | None = None
    digest: str = ""  # the request body's digest ("" without a body), for a dialect that binds the body


def _methods_own_headers(challenge: Challenge) -> list[tuple[str, str]]:
    """21's Price / Bitcoin-Address / Username, as the methods that speak two1 return them (first wins)."""
    merged: dict[str, str] = {}
    for offer in challenge.offers:
        for name, value in offer.headers.items():
            merged.setdefault(name, value)
    return list(merged.items())


def _x402_header(challenge: Challenge) -> list[tuple[str, str]]:
    """x402 v2 reads the 402 only from this header (padded standard base64 of the body, which v1 reads)."""
    text = json.dumps(challenge.body, separators=(",", ":"))
    return [(P.PAYMENT_REQUIRED, base64.b64encode(text.encode()).decode())]


HeaderFamily = Callable[[Challenge], list[tuple[str, str]]]
HEADER_FAMILIES: list[HeaderFamily] = [_methods_own_headers, www_authenticate, _x402_header]  # the merge point: add dialects here


def bazaar_extension(method: str) -> dict[str, Any]:
    """x402's Bazaar discovery extension (`extensions.bazaar`: info + JSON schema, the shape of the SDK's
    declare_discovery_extension): how to call the resource, so a facilitator can catalog it."""
    if method in ("POST", "PUT", "PATCH"):
        info = {"input": {"type": "http", "method": method, "bodyType": "text", "body": {}}}
        shape = {"type": {"type": "string", "const": "http"}, "method": {"type": "string", "enum": [method]},
                 "bodyType": {"type": "string", "enum": ["json", "form-data", "text"]}, "body": {}}
        required = ["type", "method", "bodyType", "body"]
    else:
        info = {"input": {"type": "http", "method": method, "queryParams": {}}}
        shape = {"type": {"type": "string", "const": "http"}, "method": {"type": "string", "enum": [method]},
                 "queryParams": {"type": "object"}}
        required = ["type", "method"]
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
              "properties": {"input": {"type": "object", "properties": shape, "required": required}},
              "required": ["input"]}
    return {"bazaar": {"info": info, "schema": schema}}


def payment_required_body(url: str, quote: Quote, invoice: Invoice, offers: list[Offer],
                          error: str = "payment_required", detail: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "x402Version": P.X402_VERSION,
        "error": error,
        "resource": {"url": url, "description": quote.rule.description, "mimeType": "application/json"},
        "accepts": [offer.accepts for offer in offers if offer.accepts is not None],
        "invoice": invoice.to_json(),
        "detail": detail if detail is not None else f"pay {quote.amount} sat to call {quote.resource}",
        "extensions": bazaar_extension(quote.resource.split(" ", 1)[0]),
    }
    body.update(problem(error))  # the IETF "Payment" scheme's problem type (RFC 9457 members next to x402's)
    return body


def _render(challenge: Challenge, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(status=402, text=json.dumps(challenge.body, separators=(",", ":")),
                            content_type="application/json", headers={"Cache-Control": "no-store", **(headers or {})})
    for family in HEADER_FAMILIES:
        for name, value in family(challenge):
            response.headers.add(name, value)
    return response


def render_402(url: str, quote: Quote, invoice: Invoice, offers: list[Offer], error: str = "payment_required",
               detail: Any = None, headers: dict[str, str] | None = None, digest: str = "") -> web.Response:
    """`url` is the resource's absolute URL on this deployment (deployment.absolute_url: PUBLIC_URL, never Host);
    `digest`: the request body's (payment_auth.body_digest), which the Payment scheme's challenge binds."""
    body = payment_required_body(url, quote, invoice, offers, error, detail)
    return _render(Challenge(url, body, offers, quote, invoice, digest), headers)


def render_refusal(url: str, code: str, detail: Any, headers: dict[str, str] | None = None) -> web.Response:
    """A 402 raised by a handler (the balance cannot fund an escrow, a stake, a withdrawal): nothing to pay
    at this URL (deposit first), said in the same shape, so every client parses every 402 one way."""
    body = {"x402Version": P.X402_VERSION, "error": code,
            "resource": {"url": url, "description": "", "mimeType": "application/json"},
            "accepts": [], "detail": detail}
    return _render(Challenge(url, body, []), headers)


def settle_response(success: bool, transaction: str, network: str, payer: str = "", username: str = "",
                    error: str = "") -> str:
    """x402's PAYMENT-RESPONSE (a SettleResponse, base64): `payer` is the payer's address or key as the spec
    expects; our account name, when there is one, goes in `extensions.username`."""
    body: dict[str, Any] = {"success": success, "transaction": transaction, "network": network}
    if error:
        body["errorReason"] = error
    if payer:
        body["payer"] = payer
    if username:
        body["extensions"] = {"username": username}
    return base64.b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()
