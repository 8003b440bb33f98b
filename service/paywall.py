"""The paywall middleware: quote → 402 or verify → hold → handler → capture on 2xx, void otherwise.

The payer is never charged for a response they did not get as a success: the hold is voided when the
handler raises or answers non-2xx, and a hold that nobody resolves (server killed) is voided by the
sweeper when it times out.

Telling the truth about a charge: after an ambiguous ledger reply (a timeout or a lost connection: the
script may still run) the transfer's state is read by its id before answering; "not charged" is said
only when it is known voided, otherwise the answer is the paid response or 503 `payment_outcome_unknown`
naming the receipt to look up. A handler with side effects calls `commit(request)` before them: the hold
is captured first, so a call that is not charged has no effects.

Idempotent retries (Stripe's model): a captured response is kept under its payment's id (the signed
transfer, the on-chain tx, or the token's `Idempotency-Key`) for the hold's lifetime, or IDEMPOTENCY_TTL
when the client sent an `Idempotency-Key` (opt-in, so memory stays bounded under load); the same request
with the same payment gets it again uncharged (`Idempotent-Replayed: true`), a different request 422.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from .inputs import IDEMPOTENCY_KEY_RE
from . import protocol as P
from .challenge import render_402, settle_response
from .config import Settings
from .deployment import absolute_url
from .errors import (ApiError, BadRequest, Conflict, Forbidden, PaymentRequired, ServiceUnavailable,
                     Unauthorized, Unprocessable)
from . import metrics
from .keys import REVENUE, is_escrow, user_account
from .ledger import AccountKind, Hold, Ledger, Outcome, TokenSpend
from .payment_auth import body_digest, encode_receipt
from .payments import KeepsFailedPayments, PaidBefore, Payment, PaymentMethod, Settles
from .pricing import Quote, quote_request, route_rule
from .ratelimit import WINDOW_MS, client_ip, over_limit
from .state import ADDRESSES, HEALTH, INVOICES, LIMITER, LEDGER, METHODS, PRICES, SETTINGS

__all__ = ["paywall_middleware", "commit", "PAYMENT", "HOLD", "REPLAYED_HEADER"]

PAYMENT = web.RequestKey("payment", Payment)  # the verified Payment, for handlers that need the payer
HOLD = web.RequestKey("hold", Hold)  # the hold the paywall will capture if the handler succeeds
REPLAYED_HEADER = "Idempotent-Replayed"
REPLAY_MARGIN = 60  # s a replay record outlives its payment's last valid moment (clock skew between hosts)
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
    Outcome.LIMIT: (Conflict, "counter_limit", "an account's lifetime counter would pass 2^53 - 1 sat; refused"),
}
_KEPT_HEADERS = ("Content-Type", "Location", P.PAYMENT_RECEIPT, P.PAYMENT_RESPONSE)


@dataclass
class Settlement:
    """One paid request's hold and what became of it: held → captured | voided."""

    payment: Payment
    hold: Hold
    method: PaymentMethod
    deadline: float       # unix s; the ledger's own deadline is later (it starts when the hold applies)
    replayable: bool      # the payment id can come again (signed transfer, tx, Idempotency-Key)
    keep_for: int         # seconds its response is kept: IDEMPOTENCY_TTL with Idempotency-Key, else the hold's
    state: str = "held"   # held → captured | voided | unknown (not confirmed) → refunded


SETTLEMENT = web.RequestKey("settlement", Settlement)
_BACKGROUND: set[asyncio.Future] = set()  # settlements finished after the answer (ambiguous commits)


class _Replayed(Exception):
    """The payment's id exists already: answer from what became of the first request."""

    def __init__(self, transfer: dict[str, Any]) -> None:
        super().__init__(transfer.get("id"))
        self.transfer = transfer


async def _challenge(request: web.Request, quote: Quote, error: str = "payment_required",
                     detail: Any = None, headers: dict[str, str] | None = None) -> web.Response:
    book = request.app.get(ADDRESSES)
    settings = request.app[SETTINGS]
    onchain = (book is not None and quote.amount <= settings.onchain_max_zeroconf  # else no address is leased
               and quote.credit in ("", REVENUE))  # an escrow takes no unconfirmed coins (payments/onchain.py)
    address = await book.for_invoice(settings.invoice_ttl, client_ip(request, settings)) if onchain else None
    invoice = request.app[INVOICES].issue(quote, address)
    if book and address:  # the lease names its invoice: a two1 client pays the address without naming it
        await book.bind(address, invoice.id)
    metrics.CHALLENGES.labels(metrics.route_of(request), error).inc()
    offers = await request.app[METHODS].challenge(quote, invoice)
    body = await request.read() if request.body_exists else b""  # the Payment scheme's challenge binds it
    return render_402(absolute_url(settings, request), quote, invoice, offers, error, detail, headers,
                      body_digest(body) if body else "")


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
        if method is None and P.PAYMENT_SIGNATURE in request.headers:  # an x402 scheme no method here takes
            refusal = PaymentRequired("unsupported_scheme", "pay with a scheme this 402 offers in `accepts`")
            return await _challenge(request, quote, refusal.code, refusal.detail, _x402_failure(request, refusal, None))
        if method is None:
            return await _challenge(request, quote)
        payment = None
        try:
            payment = await method.verify(request, quote)
            limit = None
            if payment.payer and marker.payer_check is not None:
                await app[LIMITER].check("account", payment.payer, settings.rate_limit_account)
                # e.g. nobody to answer this payer: refused before the hold
                await marker.payer_check(request, payment.payer)
            elif payment.payer and settings.rate_limit_account > 0:  # counted in the hold's own script
                limit = (app[LIMITER].counter("account", payment.payer), settings.rate_limit_account, WINDOW_MS)
            paid = await _hold(request, method, payment, quote, limit)
        except PaymentRequired as exc:
            log.info("payment_refused", reason=exc.code, method=method.name)
            return await _challenge(request, quote, exc.code, exc.detail, _x402_failure(request, exc, payment))
        except ApiError as exc:  # malformed, unauthorized, replayed: an x402 client reads why in PAYMENT-RESPONSE
            exc.headers.update(_x402_failure(request, exc, payment))
            raise
        except _Replayed as replay:
            return await _replay(ledger, payment.token, quote, replay.transfer)
        except PaidBefore as before:  # the method recognised a retry of its payment (on-chain)
            first = await ledger.transfer(before.transfer_id)
            return await _replay(ledger, None, quote, first or {"id": before.transfer_id})
        try:
            return await _serve(request, handler, paid)
        except PaymentRequired as exc:  # the settlement (a broadcast) refused: nothing served, nothing charged
            return await _challenge(request, quote, exc.code, exc.detail, _x402_failure(request, exc, payment))

    return paywall


def _x402_failure(request: web.Request, exc: ApiError, payment: Payment | None) -> dict[str, str]:
    """PAYMENT-RESPONSE with success false and the reason, for a payment that came as PAYMENT-SIGNATURE."""
    if P.PAYMENT_SIGNATURE not in request.headers:
        return {}
    return {P.PAYMENT_RESPONSE: settle_response(False, "", request.app[SETTINGS].caip2,
                                                payment.payer_id if payment else "",
                                                payment.payer if payment else "", exc.code)}


async def commit(request: web.Request) -> None:
    """Capture this request's payment now, before the handler's side effects (storing, delivering,
    queueing): raises 503 `hold_expired` (not charged; do nothing) or `payment_outcome_unknown`.
    Afterwards the paywall does not capture again. No-op on unpriced or already committed requests."""
    paid = request.get(SETTLEMENT)
    if paid is None or paid.state != "held":
        return
    await _settle(request.app[LEDGER], paid)
    try:
        await _capture(request.app[LEDGER], paid)
    except ServiceUnavailable:
        if paid.state == "unknown":  # nothing will be done: the paywall voids or refunds it later
            raise _unknown(paid.hold.id, done=False) from None
        raise


async def _hold(request: web.Request, method: PaymentMethod, payment: Payment, quote: Quote,
                limit: tuple[str, int, int] | None = None) -> Settlement:
    settings, ledger = request.app[SETTINGS], request.app[LEDGER]
    token_id = payment.token.token_id if payment.token else ""
    debit = payment.debit or user_account(payment.payer)
    hold = Hold(payment.transfer_id, debit, quote.credit or REVENUE, int(quote.amount), token_id)
    deadline = time.time() + settings.hold_timeout
    key = request.headers.get(P.IDEMPOTENCY_KEY)
    if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise BadRequest("malformed_idempotency_key", "Idempotency-Key: 1-128 printable ASCII characters")
    # a signed transfer is its own key; with Idempotency-Key, a re-signed retry finds the first one too
    bind = (payment.payer, key, settings.idempotency_ttl) if key and payment.payer and payment.token is None else None
    # the record outlives every replay of the payment (REPLAY_MARGIN for clocks), and its key's binding
    keep_until = payment.replay_until and max(payment.replay_until + REPLAY_MARGIN,
                                              time.time() + settings.idempotency_ttl if bind else 0)
    try:
        result = await ledger.hold(
            hold.id, hold.debit, hold.credit, hold.amount, timeout=settings.hold_timeout,
            require_pubkey=payment.payer_pubkey, token=payment.token, resource=quote.resource, payer=payment.payer,
            open_credit=AccountKind.ESCROW if is_escrow(hold.credit) else None,
            method=payment.method, request_hash=quote.request_hash, idempotency=bind, keep_until=keep_until, limit=limit,
        )
    except RedisError as exc:  # the hold may still apply, but nothing captures it: the sweeper voids it
        log.error("hold_ambiguous", transfer=hold.id, error=str(exc))
        raise ServiceUnavailable("ledger_unavailable", "the ledger cannot be reached; nothing was charged (a "
                                 "hold, if it was taken, is released at its timeout)", headers={"Retry-After": "1"})
    if result.outcome is Outcome.APPLIED:
        # a token payment without Idempotency-Key has a random id: nobody can retry it
        replayable = payment.token is None or key is not None
        keep_for = settings.idempotency_ttl if key is not None else settings.hold_timeout
        return Settlement(payment, hold, method, deadline, replayable, keep_for)
    if result.outcome is Outcome.RATE_LIMITED:
        raise over_limit("account", limit[1] if limit else 0, result.transfer["retry_ms"])
    if result.outcome is Outcome.REPLAYED:
        raise _Replayed(result.transfer)
    if result.outcome is Outcome.KEY_USED:
        first = await ledger.transfer(result.transfer["id"])
        raise _Replayed(first or result.transfer)
    error_type, code, detail = _HOLD_ERRORS.get(
        result.outcome, (Unauthorized, result.outcome.value, "the payment was refused"))
    raise error_type(code, detail)


async def _serve(request: web.Request, handler: Handler, paid: Settlement) -> web.StreamResponse:
    """Run the handler on a held payment; capture on 2xx (unless it committed already), undo otherwise."""
    settings, ledger = request.app[SETTINGS], request.app[LEDGER]
    request[PAYMENT] = paid.payment
    request[HOLD] = paid.hold
    request[SETTLEMENT] = paid
    try:
        response = await handler(request)
    except BaseException as exc:  # priced handlers return their success; anything raised is a failure
        await _undo(ledger, paid, f"handler raised {type(exc).__name__}", effects_known=isinstance(exc, ApiError))
        raise
    if not 200 <= response.status < 300:
        await _undo(ledger, paid, f"status {response.status}")
        return response
    if paid.state == "held":
        try:
            await _settle(ledger, paid)
        except ApiError:  # fail closed: no broadcast (or nobody knows): not served, not charged
            await _void(ledger, paid, "settlement failed")
            raise
    _receipt_headers(response, paid, settings)
    record = _record(response) if paid.replayable else ""
    if paid.state == "captured":  # the handler committed before its effects: keep the response now
        if record:
            try:
                await ledger.store_response(paid.hold.id, record, paid.keep_for)
            except RedisError as exc:
                log.warning("response_not_kept", transfer=paid.hold.id, error=str(exc))
    else:
        await _capture(ledger, paid, record, paid.keep_for)
    metrics.PAYMENTS.labels(paid.payment.method, "captured").inc()
    metrics.SATS.labels("captured").inc(paid.hold.amount)
    log.info("payment_captured", transfer=paid.hold.id, payer=paid.payment.payer, amount=paid.hold.amount,
             method=paid.payment.method)
    return response


async def _settle(ledger: Ledger, paid: Settlement) -> None:
    """A method that moves its money only after the call succeeded (exact-BTC's broadcast), once."""
    if isinstance(paid.method, Settles) and not paid.payment.settle_data.get("settled"):
        await paid.method.settle(ledger, paid.payment)


def _receipt_headers(response: web.StreamResponse, paid: Settlement, settings: Settings) -> None:
    # the IETF "Payment" scheme's receipt (base64url JSON; `reference` is the transfer id), for every method
    response.headers[P.PAYMENT_RECEIPT] = encode_receipt(paid.payment.method, paid.hold.id, time.time())
    response.headers.setdefault("Cache-Control", "private")
    if paid.payment.x402:
        transaction = paid.payment.settle_data.get("txid") or paid.hold.id
        response.headers[P.PAYMENT_RESPONSE] = settle_response(True, transaction, settings.caip2,
                                                               paid.payment.payer_id, paid.payment.payer)


async def _capture(ledger: Ledger, paid: Settlement, record: str = "", ttl: int = 0) -> None:
    """Post the hold, or raise a truthful 503: `hold_expired` only when the hold is known voided."""
    hold = paid.hold
    if time.time() >= paid.deadline:  # the ledger would void it: do not even start the effects
        await _void(ledger, paid, "expired before capture")
        raise _expired()
    try:
        result = await ledger.capture(hold, record, ttl)
        state = {Outcome.APPLIED: "posted", Outcome.EXPIRED: "voided"}.get(result.outcome,
                                                                          result.transfer.get("state"))
    except RedisError as exc:  # the script may still run: ask the ledger what became of the transfer
        log.error("capture_ambiguous", transfer=hold.id, error=str(exc))
        state = await _state_after_doubt(ledger, hold.id)
    if state == "posted":
        paid.state = "captured"
        return
    if state == "voided":
        log.warning("capture_refused", transfer=hold.id)
        await _void(ledger, paid, "expired")  # books on-chain money for a refund (KeepsFailedPayments)
        raise _expired()
    paid.state = "unknown"
    raise _unknown(hold.id)


async def _state_after_doubt(ledger: Ledger, transfer_id: str) -> str:
    """The transfer's state read by id after an ambiguous reply; 'unknown' when it cannot be read."""
    state = await ledger.state_after_doubt(transfer_id)
    if state == "unknown":
        log.error("state_unreadable", transfer=transfer_id)
    return state


def _expired() -> ServiceUnavailable:
    return ServiceUnavailable("hold_expired", "the request outlived its payment hold; you were not charged "
                                              "and nothing was done", headers={"Retry-After": "1"})


def _unknown(transfer_id: str, done: bool | None = True) -> ServiceUnavailable:
    """done: the call's result is kept with the capture; False: nothing was done (a capture is refunded);
    None: charged, but the handler failed after its effects began (their outcome is unknown)."""
    if done is None:
        detail = (f"the payment was captured (GET /v1/receipts/{transfer_id}) but the request failed after it "
                  f"started its effects; look at the resource before retrying with a new payment")
    elif not done:  # a commit before the handler's effects: nothing was done, so nothing stays charged
        detail = (f"the ledger did not confirm the payment in time and nothing was done; if it was captured it is "
                  f"refunded (refund_{transfer_id}) as soon as the ledger answers: GET /v1/receipts/{transfer_id}")
    else:
        detail = (f"the ledger did not confirm the payment in time; it may have been captured. Look it up with "
                  f"GET /v1/receipts/{transfer_id} (state posted: charged, voided: not charged), or retry with the "
                  f"same payment: a captured call answers with its result and is not charged again")
    return ServiceUnavailable("payment_outcome_unknown", detail, headers={"Retry-After": "1"})


async def _undo(ledger: Ledger, paid: Settlement, reason: str, effects_known: bool = True) -> None:
    """The call failed: void the hold; after a commit, give the money back (when the handler refused
    before any effect) or say truthfully that the payer was charged with an unknown outcome."""
    if paid.state == "held":
        await _void(ledger, paid, reason)
        return
    if paid.state == "unknown":  # a commit the ledger did not confirm, and the handler did nothing
        _settle_later(ledger, paid, reason)
        return
    if paid.state != "captured":
        return
    if not effects_known:
        log.error("failed_after_capture", transfer=paid.hold.id, reason=reason)
        raise _unknown(paid.hold.id, done=None)
    try:
        await _refund(ledger, paid, reason)
    except ServiceUnavailable:  # not confirmed: refunded in the background once the ledger answers
        paid.state = "unknown"
        _settle_later(ledger, paid, reason)
        raise _unknown(paid.hold.id, done=False) from None


def _settle_later(ledger: Ledger, paid: Settlement, reason: str) -> None:
    task = asyncio.ensure_future(_settle_uncommitted(ledger, paid, reason))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def _settle_uncommitted(ledger: Ledger, paid: Settlement, reason: str, tries: int = 240) -> None:
    """Charged only if served: once the ledger answers, void the hold, or refund it if the unconfirmed
    capture did apply (the handler stopped before its effects)."""
    for _ in range(tries):
        state = await ledger.state_after_doubt(paid.hold.id)
        try:
            if state == "pending":  # a capture still in flight may win the race: read again after
                await ledger.void(paid.hold, reason)
                continue
            if state == "posted":
                await _refund(ledger, paid, reason)
                return
            if state in ("voided", "absent"):
                paid.state = "voided"
                await _release_coins(ledger, paid)
                return
        except (RedisError, ApiError) as exc:
            log.warning("settle_retry", transfer=paid.hold.id, error=str(exc))
        await asyncio.sleep(0.5)
    log.error("settle_gave_up", transfer=paid.hold.id)


async def _release_coins(ledger: Ledger, paid: Settlement) -> None:
    """On-chain money of a call that was not charged is booked for its payer (KeepsFailedPayments)."""
    if isinstance(paid.method, KeepsFailedPayments):
        await paid.method.on_void(ledger, paid.payment)


async def _refund(ledger: Ledger, paid: Settlement, reason: str) -> None:
    hold, refund_id = paid.hold, f"refund_{paid.hold.id}"
    try:
        result = await asyncio.shield(ledger.post(refund_id, hold.credit, hold.debit, hold.amount,
                                                  reason=f"refund: {reason}"))
        state = "posted" if result.outcome in (Outcome.APPLIED, Outcome.REPLAYED) else None
    except RedisError as exc:
        log.error("refund_ambiguous", transfer=refund_id, error=str(exc))
        state = await _state_after_doubt(ledger, refund_id)
    if state != "posted":
        log.error("refund_failed", transfer=refund_id, state=state)
        raise _unknown(hold.id)
    paid.state = "refunded"
    await _release_coins(ledger, paid)


async def _void(ledger: Ledger, paid: Settlement, reason: str) -> None:
    hold = paid.hold
    paid.state = "voided"
    try:
        result = await asyncio.shield(ledger.void(hold, reason))
    except RedisError as exc:  # never captured: the sweeper voids it on timeout
        log.error("void_failed", transfer=hold.id, error=str(exc))
        result = None
    if result is not None and result.ok:
        metrics.PAYMENTS.labels(paid.payment.method, "voided").inc()
        metrics.SATS.labels("voided").inc(hold.amount)
    await _release_coins(ledger, paid)


def _record(response: web.StreamResponse) -> str:
    """The response as kept for retries (status, headers that matter, body); '' when not kept (streamed)."""
    body = getattr(response, "body", None)
    if not isinstance(body, (bytes, bytearray)):
        return ""
    headers = {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers}
    return json.dumps({"status": response.status, "headers": headers, "body": base64.b64encode(body).decode()})


async def _replay(ledger: Ledger, token: TokenSpend | None, quote: Quote, transfer: dict[str, Any]) -> web.Response:
    """A payment id that was used before: the first request's response, or why there is none."""
    transfer_id = transfer["id"]
    if token is not None:  # the id names the token; only its secret may read what it bought
        record = await ledger.token(token.token_id)
        if record is None or record["secret_hash"] != token.secret_hash:
            raise Unauthorized("token_invalid", "unknown token, or wrong secret")
    first_hash = transfer.get("meta", {}).get("request_hash")
    if first_hash and first_hash != quote.request_hash:
        raise Unprocessable("idempotency_key_reused", "this payment (or Idempotency-Key) was used for a different "
                                                      "request; pay again, or use a new key, for a new request")
    state = transfer.get("state")
    if state == "pending":
        raise Conflict("request_in_progress", "the first request with this payment is still running; retry later "
                                              "to get its result", headers={"Retry-After": "1"})
    if state == "posted":
        kept = await ledger.response(transfer_id)
        if kept:
            return _from_record(kept)
        raise Conflict("payment_replayed", f"this payment was already captured for this request and its response "
                                           f"is no longer kept; see GET /v1/receipts/{transfer_id}")
    if transfer.get("meta", {}).get("method") == P.METHOD_ONCHAIN:
        raise Conflict("payment_replayed", f"the call this transaction paid for failed and the price was not "
                                           f"taken; its coins are credited or kept for a refund (GET "
                                           f"/v1/receipts/{transfer_id}); pay again with a new transaction")
    raise Conflict("payment_replayed", "this payment was already used and voided (you were not charged); "
                                       "sign a new one (or use a new Idempotency-Key)")


def _from_record(kept: str) -> web.Response:
    record = json.loads(kept)
    headers = {**record["headers"], REPLAYED_HEADER: "true"}
    return web.Response(status=record["status"], body=base64.b64decode(record["body"]), headers=headers)
