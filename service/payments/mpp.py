"""The IETF "Payment" HTTP authentication scheme (draft-httpauth-payment-01, "MPP") as one more way to pay:
its challenge rides in every 402 next to 21's headers and x402's body, its credential carries our BitTransfer.

- Challenge: `WWW-Authenticate: Payment id, realm, method="bittransfer", intent="charge", request, expires,
  [digest], header="Payment-Authorization"`; `request` is base64url(JCS({"amount", "currency": "sat",
  "recipient": <payee username>, "methodDetails": {"address", "invoice", "network"}})). The id is a stateless
  HMAC (service/payment_auth.py) under a key derived from the invoice secret; the invoice in `methodDetails`
  binds the challenge to this request (its hash), price, address and expiry, as for every other method.
- `bittransfer` is a private-use method name (the draft allows unregistered names; none is registered for a
  ledger transfer): the payload is x402's `{"transfer": <two1 BitTransfer JSON string>, "signature": <base64>}`.
- Credential: `Payment-Authorization: Payment <base64url JSON>` (we advertise the draft's `header` parameter,
  as pympp's requires_auth mode does: `Authorization` carries MT-Sig and Token), or `Authorization: Payment …`.
- Single use: the payment's ledger id is the BitTransfer's (sha256 of its JSON), so a credential settles at most
  once through the same replay records as every BitTransfer; failures are 402s with a fresh challenge and a
  problem type (malformed-credential, invalid-challenge, payment-expired, verification-failed).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from .. import payment_auth as W
from .. import protocol as P
from ..config import Settings
from ..deployment import absolute_url
from ..auth import authenticate
from ..errors import ApiError, BadRequest, Forbidden, PaymentRequired, ServiceUnavailable
from ..invoices import Invoice, Invoices
from ..pricing import Quote
from . import Offer, Payment
from .bittransfer import BitTransfer

if TYPE_CHECKING:
    from ..challenge import Challenge

__all__ = ["PaymentScheme", "www_authenticate", "challenge_key", "payment_info", "service_info"]

_OTHER_CREDENTIALS = (P.BITCOIN_TRANSFER, P.PAYMENT_SIGNATURE, P.BITCOIN_TRANSACTION)


def challenge_key(invoices: Invoices) -> str:
    """The HMAC key of challenge ids, derived from the invoice secret (one secret, separate uses)."""
    if invoices.secret is None:
        raise ServiceUnavailable("ledger_unavailable", "the service is starting; retry shortly",
                                 headers={"Retry-After": "1"})
    return hmac.new(invoices.secret, b"payment-auth challenge id", hashlib.sha256).hexdigest()


def _realm(settings: Settings, request: web.Request) -> str:
    return urlsplit(absolute_url(settings, request)).netloc


def _payment_request(settings: Settings, amount: int, address: str, invoice_id: str) -> dict[str, Any]:
    return {"amount": str(amount), "currency": "sat", "recipient": settings.payee_username,
            "methodDetails": {"address": address, "invoice": invoice_id, "network": settings.caip2}}


def www_authenticate(challenge: "Challenge") -> list[tuple[str, str]]:
    """This scheme's header family (service/challenge.HEADER_FAMILIES): `WWW-Authenticate: Payment …` from
    the Payment scheme's offer, bound to the realm, the invoice and the request body's digest."""
    offer = next((o for o in challenge.offers if o.method == PaymentScheme.name), None)
    if offer is None:  # not offered here, or a 402 with nothing to pay (render_refusal)
        return []
    params = {"realm": urlsplit(challenge.url).netloc, "method": W.METHOD, "intent": W.INTENT,
              "request": offer.params["request"], "expires": offer.params["expires"]}
    if challenge.digest:
        params["digest"] = challenge.digest
    params["header"] = W.CREDENTIAL_HEADER
    cid = W.challenge_id(offer.params["key"], realm=params["realm"], method=W.METHOD, intent=W.INTENT,
                         request_b64=params["request"], expires=params["expires"], digest=params.get("digest", ""),
                         header=params["header"])
    return [("WWW-Authenticate", W.format_challenge({"id": cid, **params}))]


class PaymentScheme:
    """The Payment scheme as a payment method: no x402 `accepts` entry, its own header family instead."""

    name = "payment-auth"

    def __init__(self, settings: Settings, invoices: Invoices, bittransfer: BitTransfer) -> None:
        self.settings = settings
        self.invoices = invoices
        self.bittransfer = bittransfer

    def present(self, request: web.Request) -> bool:
        return _scheme_of(request.headers.get(W.CREDENTIAL_HEADER, "")) or \
            _scheme_of(request.headers.get(P.AUTHORIZATION, ""))

    async def challenge(self, quote: Quote, invoice: Invoice) -> Offer:
        """No x402 `accepts` entry: what its header family (www_authenticate) needs to write the challenge."""
        request = W.canonical_b64url(_payment_request(self.settings, invoice.amount, invoice.address, invoice.id))
        return Offer(self.name, params={"key": challenge_key(self.invoices), "request": request,
                                        "expires": W.rfc3339(invoice.expires_at)})

    def offer_template(self, amount: int) -> dict[str, Any] | None:
        return None

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        credential = self._credential(request)
        signer = None
        if request.headers.get(P.AUTHORIZATION, "").startswith(P.SIG_SCHEME + " ") and self.bittransfer.ledger:
            # ordinary authentication first (the draft: 401 before 402); the signer must be the payer
            signer = await authenticate(request, self.bittransfer.ledger, self.settings.auth_window)
        echo, payload = credential["challenge"], credential["payload"]
        invoice = self._check_challenge(request, quote, echo, await request.read() if request.body_exists else b"")
        transfer, signature = payload.get("transfer"), payload.get("signature")
        if not isinstance(transfer, str) or not isinstance(signature, str):
            raise PaymentRequired("malformed_credential", "payload needs string fields 'transfer' (the BitTransfer "
                                                          "JSON) and 'signature' (base64)")
        try:
            payment = await self.bittransfer.verify_transfer(request, quote, transfer, signature)
        except ApiError as exc:  # any refusal of the payload is the draft's verification-failed
            raise PaymentRequired("verification_failed", {"reason": exc.code, "detail": exc.detail}) from None
        if json.loads(transfer).get("invoice") not in (None, invoice):
            raise PaymentRequired("verification_failed", "the transfer names another invoice than the challenge")
        if signer is not None and signer != payment.payer:
            raise Forbidden("payer_mismatch", f"the request is signed by {signer}, the transfer paid by {payment.payer}")
        return payment

    def _credential(self, request: web.Request) -> dict[str, Any]:
        """The one Payment credential of the request: two credentials (or another payment) are a 400."""
        values = [request.headers.get(W.CREDENTIAL_HEADER, ""), request.headers.get(P.AUTHORIZATION, "")]
        found = [v for v in values if _scheme_of(v)]
        others = [h for h in _OTHER_CREDENTIALS if h in request.headers]
        if request.headers.get(P.AUTHORIZATION, "").startswith(P.TOKEN_SCHEME + " "):
            others.append(f"{P.AUTHORIZATION}: {P.TOKEN_SCHEME}")
        if len(found) > 1 or others or len(request.headers.getall(W.CREDENTIAL_HEADER, [])) > 1:
            raise BadRequest("multiple_credentials", "send one payment per request: a Payment credential and "
                                                     f"{others or 'another Payment credential'} were both sent")
        try:
            return W.parse_credential(found[0])
        except ValueError as exc:
            raise PaymentRequired("malformed_credential", str(exc)) from None

    def _check_challenge(self, request: web.Request, quote: Quote, echo: dict[str, Any], body: bytes) -> str:
        """The echoed challenge is one we issued (its id), for this route and request, unexpired; returns
        the invoice it names."""
        fields = ("id", "realm", "method", "intent", "request", "expires", "digest", "header", "opaque")
        if any(not isinstance(echo.get(name, ""), str) for name in fields):
            raise PaymentRequired("malformed_credential", "challenge parameters are strings")
        get = lambda name: echo.get(name) or ""  # noqa: E731
        expected = W.challenge_id(challenge_key(self.invoices), realm=get("realm"), method=get("method"),
                                  intent=get("intent"), request_b64=get("request"), expires=get("expires"),
                                  digest=get("digest"), header=get("header"), opaque_b64=get("opaque"))
        if not hmac.compare_digest(expected.encode(), get("id").encode("utf-8", "surrogateescape")):
            raise PaymentRequired("invalid_challenge", "the challenge was not issued by this server")
        if (get("realm"), get("method"), get("intent")) != (_realm(self.settings, request), W.METHOD, W.INTENT):
            raise PaymentRequired("invalid_challenge", "the challenge is for another realm, method or intent")
        try:
            expires = W.parse_rfc3339(get("expires"))
            details = json.loads(W.unb64url(get("request"))).get("methodDetails", {})
            invoice, address = str(details["invoice"]), str(details["address"])
        except (ValueError, KeyError, AttributeError, TypeError):
            raise PaymentRequired("invalid_challenge", "the challenge names no expiry or invoice") from None
        if expires <= time.time():
            raise PaymentRequired("payment_expired", "the challenge has expired; pay the fresh one")
        if get("digest") != (W.body_digest(body) if body else ""):
            raise PaymentRequired("invalid_challenge", "the challenge's digest is not this request's body")
        reason = self.invoices.check(invoice, quote, address)
        if reason or get("request") != W.canonical_b64url(_payment_request(self.settings, quote.amount, address,
                                                                             invoice)):
            raise PaymentRequired("invalid_challenge", f"the challenge was issued for another request or price "
                                                       f"({reason or 'request_mismatch'})")
        return invoice


def _scheme_of(value: str) -> bool:
    return value[:8].lower() == "payment "


def payment_info(price: dict[str, Any]) -> dict[str, Any]:
    """An operation's `x-payment-info` (MPP discovery, multi-offer form) from its `x-price`: the amount when it
    is fixed, else null (per document, per QA suite, set by an expert) with the formula as description."""
    fixed = price.get("formula") == "fixed"
    if fixed:
        note = "fixed price"
    elif "variants" in price:
        note = "by variant: " + "; ".join(f"{name}: {v['formula']}" for name, v in price["variants"].items())
    else:
        note = price["formula"] + (f" ({price['counts']})" if price.get("counts") else "")
    return {"offers": [{"intent": W.INTENT, "method": W.METHOD, "amount": str(price["amount"]) if fixed else None,
                        "currency": "sat", "description": f"{note}; the 402 challenge is authoritative"}]}


def service_info(base: str) -> dict[str, Any]:
    """The document's `x-service-info` (MPP discovery)."""
    return {"categories": ["developer-tools"],
            "docs": {"apiReference": f"{base}/openapi.json", "homepage": f"{base}/v1/catalog"}}
