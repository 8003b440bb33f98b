"""The one place that renders a 402: 21's headers, the x402 v2 PaymentRequired body, our invoice."""
from __future__ import annotations

import base64
import json
from typing import Any

from aiohttp import web

from . import protocol as P
from .invoices import Invoice
from .payment_auth import problem
from .pricing import Quote

__all__ = ["payment_required_body", "render_402"]


def payment_required_body(url: str, quote: Quote, invoice: Invoice, accepts: list[dict[str, Any]],
                          error: str = "payment_required", detail: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "x402Version": P.X402_VERSION,
        "error": error,
        "resource": {"url": url, "description": quote.rule.description, "mimeType": "application/json"},
        "accepts": accepts,
        "invoice": invoice.to_json(),
        "detail": detail if detail is not None else f"pay {quote.amount} sat to call {quote.resource}",
    }
    # --- hook: the IETF "Payment" scheme's problem type (RFC 9457 members next to x402's; payments/mpp.py) ---
    body.update(problem(error))
    return body


def render_402(url: str, quote: Quote, invoice: Invoice, accepts: list[dict[str, Any]],
               error: str = "payment_required", detail: Any = None,
               www_authenticate: dict[str, str] | None = None) -> web.Response:
    """`url` is the resource's absolute URL on this deployment (deployment.absolute_url: PUBLIC_URL, never Host);
    `www_authenticate`: the IETF "Payment" scheme's header family (payments/mpp.www_authenticate)."""
    body = payment_required_body(url, quote, invoice, accepts, error, detail)
    text = json.dumps(body, separators=(",", ":"))
    headers = {
        P.PRICE: str(quote.amount),
        P.BITCOIN_ADDRESS: invoice.address,
        P.USERNAME: invoice.payee,
        P.PAYMENT_REQUIRED: base64.b64encode(text.encode()).decode(),
        "Cache-Control": "no-store",
        **(www_authenticate or {}),  # --- hook: the IETF "Payment" scheme's challenge ---
    }
    return web.Response(status=402, text=text, content_type="application/json", headers=headers)
