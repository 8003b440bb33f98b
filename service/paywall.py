"""The paywall middleware: quote → 402 or verify → hold → handler → capture on 2xx, void otherwise.

The payer is never charged for a response they did not get as a success: the hold is voided when the
handler raises or answers non-2xx, and a hold that nobody resolves (server killed) is voided by the
sweeper when it times out.
"""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from . import protocol as P
from .challenge import render_402
from .config import Settings
from .deployment import absolute_url
from .errors import Conflict, Forbidden, PaymentRequired, ServiceUnavailable, Unauthorized
from . import metrics
from .ledger import REVENUE, AccountKind, Hold, Ledger, Outcome, user_account
from .payments import KeepsFailedPayments, Payment
from .pricing import Quote, quote_request, route_rule
from .state import ADDRESSES, HEALTH, INVOICES, LIMITER, LEDGER, METHODS, PRICES, SETTINGS

__all__ = ["paywall_middleware", "PAYMENT", "HOLD"]

PAYMENT = web.RequestKey("payment", Payment)  # the verified Payment, for handlers that need the payer
HOLD = web.RequestKey("hold", Hold)  # the hold the paywall will capture if the handler succeeds
log = structlog.get_logger("paywall")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HOLD_ERRORS: dict[Outcome, tuple[type, str, str]] = {
    Outcome.NO_DEBIT_ACCOUNT: (Unauthorized, "unknown_payer", "no account is registered under this payer name"),
    Outcome.PUBKEY_MISMATCH: (Unauthorized, "pubkey_mismatch", "payer_pubkey is not the key registered for this payer"),
    Outcome.REPLAYED: (Conflict, "payment_replayed", "this signed transfer was already used; sign a new one"),
    Outcome.INSUFFICIENT: (PaymentRequired, "insufficient_funds", "the payer's available balance is below the price"),
    Outcome.TOKEN_INVALID: (Unauthorized, "token_invalid", "unknown token, or wrong secret"),
    Outcome.TOKEN_REVOKED: (Unauthorized, "token_revoked", "this token was revoked by its owner"),
    Outcome.TOKEN_EXPIRED: (Unauthorized, "token_expired", "this token has expired"),
    Outcome.TOKEN_MAX_PER_CALL: (Forbidden, "token_max_per_call", "the price exceeds this token's max_per_call"),
    Outcome.TOKEN_ROUTE: (Forbidden, "token_route", "this token may not pay for this route"),
    Outcome.TOKEN_MAX_TOTAL: (Forbidden, "token_max_total", "this token's max_total would be exceeded"),
}


async def _challenge(request: web.Request, quote: Quote, error: str = "payment_required",
                     detail: Any = None) -> web.Response:
    book = request.app.get(ADDRESSES)
    settings = request.app[SETTINGS]
    onchain = book is not None and quote.amount <= settings.onchain_max_zeroconf  # else no address is leased
    address = await book.for_invoice(settings.invoice_ttl) if onchain else None
    invoice = request.app[INVOICES].issue(quote, address)
    if book and address:  # the lease names its invoice: a two1 client pays the address without naming it
        await book.bind(address, invoice.id)
    metrics.CHALLENGES.labels(metrics.route_of(request), error).inc()
    return render_402(absolute_url(request.app[SETTINGS], request), quote, invoice, request.app[METHODS].offers(quote, invoice), error, detail)


def paywall_middleware() -> Callable:
    """Reads the ledger, methods and prices from app state at request time (they exist after startup)."""

    @web.middleware
    async def paywall(request: web.Request, handler: Handler) -> web.StreamResponse:
        marker = route_rule(request.match_info.handler)
        if marker is None:
            return await handler(request)
        app = request.app
        if not app[HEALTH].ok:
            raise ServiceUnavailable("ledger_unavailable", "the ledger cannot be reached; nothing was charged",
                                     headers={"Retry-After": "1"})
        settings, ledger = app[SETTINGS], app[LEDGER]
        quote = await quote_request(request, marker, app[PRICES])
        method = app[METHODS].select(request)
        if method is None:
            return await _challenge(request, quote)
        try:
            payment = await method.verify(request, quote)
            if payment.payer:
                await app[LIMITER].check("account", payment.payer, settings.rate_limit_account)
            hold = await _hold(ledger, payment, quote, settings)
        except PaymentRequired as exc:
            log.info("payment_refused", reason=exc.code, method=method.name)
            return await _challenge(request, quote, exc.code, exc.detail)
        keeps = isinstance(method, KeepsFailedPayments)
        request[PAYMENT] = payment
        request[HOLD] = hold
        try:
            response = await handler(request)
        except BaseException as exc:  # priced handlers return their success; anything raised is a failure
            await _void(ledger, hold, payment.method, f"handler raised {type(exc).__name__}")
            if keeps:
                await method.on_void(ledger, payment)
            raise
        if not 200 <= response.status < 300:
            await _void(ledger, hold, payment.method, f"status {response.status}")
            if keeps:
                await method.on_void(ledger, payment)
            return response
        try:
            result = await ledger.capture(hold)
        except RedisError as exc:  # Redis gone after the handler ran: the sweeper voids the hold later
            log.error("capture_failed", transfer=hold.id, error=str(exc))
            raise ServiceUnavailable("ledger_unavailable", "the payment could not be settled; you were not charged") from None
        if result.outcome is not Outcome.APPLIED:
            log.warning("capture_refused", transfer=hold.id, outcome=result.outcome.value)
            raise ServiceUnavailable("hold_expired", "the request outlived its payment hold; you were not charged")
        metrics.PAYMENTS.labels(payment.method, "captured").inc()
        metrics.SATS.labels("captured").inc(hold.amount)
        response.headers[P.PAYMENT_RECEIPT] = hold.id
        if payment.x402:
            receipt = {"success": True, "transaction": hold.id, "network": settings.caip2, "payer": payment.payer}
            response.headers[P.PAYMENT_RESPONSE] = base64.b64encode(json.dumps(receipt).encode()).decode()
        log.info("payment_captured", transfer=hold.id, payer=payment.payer, amount=hold.amount, method=payment.method)
        return response

    return paywall


async def _hold(ledger: Ledger, payment: Payment, quote: Quote, settings: Settings) -> Hold:
    token_id = payment.token.token_id if payment.token else ""
    debit = payment.debit or user_account(payment.payer)
    hold = Hold(payment.transfer_id, debit, quote.credit or REVENUE, int(quote.amount), token_id)
    result = await ledger.hold(
        hold.id, hold.debit, hold.credit, hold.amount, timeout=settings.hold_timeout,
        require_pubkey=payment.payer_pubkey, token=payment.token, resource=quote.resource, payer=payment.payer,
        open_credit=AccountKind.ESCROW if hold.credit.startswith("escrow:") else None,
        method=payment.method, request_hash=quote.request_hash,
    )
    if result.outcome is Outcome.APPLIED:
        return hold
    error_type, code, detail = _HOLD_ERRORS.get(
        result.outcome, (Unauthorized, result.outcome.value, "the payment was refused"))
    raise error_type(code, detail)


async def _void(ledger: Ledger, hold: Hold, method: str, reason: str) -> None:
    try:
        result = await asyncio.shield(ledger.void(hold, reason))
    except RedisError as exc:  # the sweeper voids it on timeout
        log.error("void_failed", transfer=hold.id, error=str(exc))
        return
    if result.ok:
        metrics.PAYMENTS.labels(method, "voided").inc()
        metrics.SATS.labels("voided").inc(hold.amount)
