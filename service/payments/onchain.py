"""21's OnChain payment: `Bitcoin-Transaction: <raw tx hex>` paying the address of THIS request's invoice.

Order of checks, cheapest first, nothing written until the payment is known good:
1. the tx obeys the rules that need no chain (btc_rules.check_static) against the address of its own
   invoice: named by `Payment-Invoice: <id>` (or x402 `extra.invoice`), else found from the address
   the tx pays (the address book records which invoice leased it). The invoice is HMAC-bound to
   amount, address and request, and unexpired; an address that is not an invoice's (a deposit address,
   the static payee address) never pays a call;
2. the chain's facts (btc_rules.check_chain): every input exists and is unspent, the fee is sane. A
   transaction the network already knows (mined, or in the mempool) therefore never pays, unless we
   broadcast it ourselves for this invoice: then it is a retry and skips to 4;
3. one atomic claim: "tx T is broadcast by us for invoice I" and "invoice address A is paid by T"
   (a second tx for an address already paid is refused, and T pays one invoice, ever);
4. broadcast; a permanent refusal releases the claim (the same tx may be retried), an unreachable
   backend keeps it (the retry is recognised);
5. the coins enter the ledger: every output paying A is posted from the chain account under
   ledger.coin_id(txid, vout) — the id space deposits share, so no coin is booked twice — into the
   payment's own account `onchain:<txid>`, all in one script. The call's hold then debits the price
   from that account: the rest (an overpayment, or everything when the call fails) stays there,
   owned by the payer if the request was signed (credited by chainwatch once confirmed), otherwise
   listed by `python -m service unclaimed` for the operator.
Zero-confirmation risk is bounded by ONCHAIN_MAX_ZEROCONF: above it the 402 offers no on-chain payment.
It is the operator's own risk only: a route whose price funds an escrow or credits someone else
(quote.credit, e.g. expert questions) takes no on-chain payment at all (402 `zeroconf_not_accepted`,
nothing broadcast or booked), since coins refunded or paid on from it could be withdrawn before a
double-spend of the unconfirmed tx, out of other users' coins. Deposit first and pay from the balance.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from aiohttp import web

from .. import protocol as P
from ..auth import authenticate
from ..chain.addresses import AddressBook
from ..chain.backends import ChainBackend, ChainError, already_known
from ..config import Settings
from ..errors import BadRequest, Conflict, PaymentRequired, ServiceUnavailable, Unauthorized
from ..invoices import Invoice, Invoices
from ..keys import BITCOIN, REVENUE, Keys, onchain_account, user_account
from ..ledger import ALL, AccountKind, Ledger, Outcome, Result, coin_id
from ..pricing import Quote, route_rule
from ..scripts import register
from . import Offer, PaidBefore, Payment
from .bittransfer import two1_headers
from . import btc_rules as R

__all__ = ["OnChain", "Checked", "OnChainRecords", "zeroconf_allowed", "PAYMENT_INVOICE", "book_coins", "book_strays", "settle_payments",
           "unclaimed", "settle_unclaimed"]
log = structlog.get_logger("onchain")
_HEX = re.compile(r"\A[0-9a-fA-F]+\Z")
PAYMENT_INVOICE = P.PAYMENT_INVOICE  # optional: the invoice id of the 402 this tx pays
MAX_INPUTS, MAX_OUTPUTS = 50, 50      # bounds the chain lookups one request can cause


def zeroconf_allowed(quote: Quote) -> bool:
    """Only the operator's revenue may take an unconfirmed payment: the double-spend risk is then the
    operator's alone, never other users' (an escrow refunded or paid on before the tx confirms)."""
    return quote.credit in ("", REVENUE)


class OnChainRecords:
    """Owns the `{prefix}:onchain:*` keys: which tx we broadcast for which invoice, which invoice address
    took which tx, and the payments whose account may still hold coins (for chainwatch and the CLI)."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self._claim = register(redis, "onchain_claim")
        self._release = register(redis, "onchain_release")

    def _k(self, *parts: str) -> str:
        return self.keys.of("onchain", *parts)

    def _keys(self, txid: str, address: str) -> list[str]:
        return [self._k("tx", txid), self._k("paid", address), self._k("open")]

    async def get(self, txid: str) -> dict[str, str]:
        return await self.redis.hgetall(self._k("tx", txid))

    async def claim(self, txid: str, invoice: str, address: str, request_hash: str, payer: str) -> str:
        return await self._claim(keys=self._keys(txid, address),
                                 args=[txid, invoice, address, request_hash, payer, int(time.time() * 1000)])

    async def release(self, txid: str, invoice: str, address: str) -> None:
        await self._release(keys=self._keys(txid, address), args=[txid, invoice])

    async def set_state(self, txid: str, state: str) -> None:
        await self.redis.hset(self._k("tx", txid), "state", state)

    async def open_payments(self) -> list[str]:
        """Txids of call payments whose account may still hold coins, oldest first."""
        return list(await self.redis.zrange(self._k("open"), 0, -1))

    async def close(self, txid: str) -> None:
        await self.redis.zrem(self._k("open"), txid)

    async def add_open(self, txid: str, **fields: str) -> None:
        """A payment account opened by another path (stray coins booked by chainwatch); a call's own
        record (a claim whose booking a crash interrupted) is never overwritten."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in {"txid": txid, **fields}.items():
                pipe.hsetnx(self._k("tx", txid), name, value)
            pipe.zadd(self._k("open"), {txid: int(time.time() * 1000)}, nx=True)
            await pipe.execute()


@dataclass(frozen=True)
class Checked:
    """A transaction that passed every rule and is claimed for its invoice (not yet broadcast)."""

    tx: Any
    address: str
    invoice: str
    payer: str  # the username that signed the request, "" when anonymous


class OnChain:
    name = P.METHOD_ONCHAIN

    def __init__(self, settings: Settings, backend: ChainBackend, book: AddressBook, invoices: Invoices,
                 ledger: Ledger, records: OnChainRecords) -> None:
        self.settings, self.backend, self.book, self.invoices = settings, backend, book, invoices
        self.ledger, self.records = ledger, records
        self.rules = R.Rules(network=settings.network, caip2=settings.caip2)

    def present(self, request: web.Request) -> bool:
        return P.BITCOIN_TRANSACTION in request.headers

    def takes(self, quote: Quote, invoice: Invoice) -> bool:
        """Not above the zero-conf limit, not for an escrow, and only to an invoice address of our own (the
        static payee address never pays a call)."""
        return (quote.amount <= self.settings.onchain_max_zeroconf and invoice.address != self.settings.payee_address
                and zeroconf_allowed(quote))

    async def challenge(self, quote: Quote, invoice: Invoice) -> Offer | None:
        """21's headers only: x402 clients pay on chain through exact-BTC (payments/x402_exact_btc.py)."""
        return Offer(self.name, None, two1_headers(quote, invoice)) if self.takes(quote, invoice) else None

    def offer_template(self, amount: int) -> None:
        return None

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        raw = request.headers[P.BITCOIN_TRANSACTION].strip().lower()
        if len(raw) > 200_000 or len(raw) % 2 or not _HEX.match(raw):
            raise BadRequest("malformed_transaction", "Bitcoin-Transaction must be a raw transaction in hex")
        checked = await self.check(request, quote, raw, request.headers.get(PAYMENT_INVOICE, ""), self.rules)
        tx, address, invoice_id, payer = checked.tx, checked.address, checked.invoice, checked.payer
        await self.broadcast(raw, tx.txid, invoice_id, address)
        paying = R.paid_to(tx, address)
        total = sum(value for _, value in paying)
        await self._book(tx.txid, paying, payer, invoice_id)
        await self.book.mark_paid(address)
        return Payment(method=self.name, transfer_id=f"tx_{tx.txid}", payer=payer, amount=quote.amount,
                       debit=onchain_account(tx.txid), settle_data={"paid": str(total), "txid": tx.txid})

    async def check(self, request: web.Request, quote: Quote, raw: str, named: str, rules: R.Rules) -> Checked:
        """Every rule of btc_rules on `raw` against its own invoice, then the claim of its txid for that
        invoice: the one on-chain path 21's raw transaction and x402's PSBT (decoded) both take."""
        if not zeroconf_allowed(quote):
            raise PaymentRequired("zeroconf_not_accepted", "this route pays its price on to someone else (an escrow), "
                                                           "so an unconfirmed transaction cannot pay it; deposit first "
                                                           "and pay from your balance")
        if quote.amount > self.settings.onchain_max_zeroconf:
            raise PaymentRequired("zeroconf_limit", f"prices above {self.settings.onchain_max_zeroconf} sat are not "
                                                    "taken at zero confirmations; deposit first and pay from your balance")
        try:
            tx = R.parse(raw, self.settings.network)
        except R.Refusal as refusal:
            raise onchain_error(refusal) from None
        if len(tx.inputs) > MAX_INPUTS or len(tx.outputs) > MAX_OUTPUTS:
            raise BadRequest("too_many_parts", f"a payment has at most {MAX_INPUTS} inputs and {MAX_OUTPUTS} outputs")
        payer = await self._payer(request)
        ours = await self.book.infos([o.address for o in tx.outputs if o.address])
        address, invoice_id = self._invoice_of(named.strip()[:200], tx, quote, ours)
        refusal = R.check_static(tx, address, quote.amount, rules)
        if refusal:
            raise onchain_error(refusal)
        record = await self.records.get(tx.txid)
        retry = bool(record) and record.get("invoice") == invoice_id and record.get("payer", "") == payer
        if record and not retry:
            raise onchain_error(R.Refusal(14, "payment_replayed", "this transaction already paid for another request", 409))
        reason = self.invoices.check(invoice_id, quote, address)
        if reason and not (retry and reason == "invoice_expired"):
            raise PaymentRequired(reason, _INVOICE_REASONS.get(reason, "the invoice does not match this request"))
        self._no_foreign_outputs(ours, address)
        if retry:
            await self._answered_already(tx.txid)
        else:
            refusal = R.check_chain(tx, await self._prevouts(tx), rules)
            if refusal:
                raise onchain_error(refusal)
        claim = await self.records.claim(tx.txid, invoice_id, address, quote.request_hash, payer)
        if claim == "used":
            raise onchain_error(R.Refusal(14, "payment_replayed", "this transaction already paid for another request", 409))
        if claim == "address_paid":
            raise PaymentRequired("invoice_paid", "this invoice's address was paid by another transaction already")
        return Checked(tx, address, invoice_id, payer)

    async def _payer(self, request: web.Request) -> str:
        """The account that signed the request (MT-Sig), if any; routes that keep what was bought for
        its owner (runs, questions) refuse an anonymous on-chain payment."""
        if request.headers.get(P.AUTHORIZATION, "").startswith(P.SIG_SCHEME + " "):
            return await authenticate(request, self.ledger, self.settings.auth_window)
        marker = route_rule(request.match_info.handler)
        if marker is not None and getattr(marker, "requires_account", False):
            raise Unauthorized("account_required", "this route keeps what you buy for your account: sign the "
                                                   f"request ({P.AUTHORIZATION}: {P.SIG_SCHEME} ...) when paying on chain")
        return ""

    def _invoice_of(self, named: str, tx: Any, quote: Quote, ours: dict[str, dict[str, str]]) -> tuple[str, str]:
        """(address, invoice id) this payment is for: the named invoice, else the one that leased the
        address an output pays. Only invoice addresses count."""
        mismatch = False
        for address in dict.fromkeys(o.address for o in tx.outputs if o.address):
            info = ours.get(address, {})
            if info.get("purpose") != "invoice":
                continue
            if named and self.invoices.check(named, quote, address) in (None, "invoice_expired"):
                return address, named
            if not named and info.get("invoice"):
                return address, info["invoice"]
            mismatch = True
        if mismatch:
            raise PaymentRequired("invoice_mismatch", _INVOICE_REASONS["invoice_mismatch"])
        raise PaymentRequired("wrong_address", "no output pays the Bitcoin-Address of this request's invoice "
                                               "(deposit addresses and other invoices' addresses never pay a call)")

    @staticmethod
    def _no_foreign_outputs(ours: dict[str, dict[str, str]], address: str) -> None:
        """Coins to another invoice's (or a change) address would enter no account: refuse the tx.
        Deposit outputs are fine: chainwatch credits them as deposits."""
        for other, info in ours.items():
            if other != address:
                purpose = info.get("purpose")
                if purpose and purpose != "deposit":
                    raise PaymentRequired("foreign_outputs", "the transaction also pays another invoice's address; "
                                                             "pay one invoice per transaction")

    async def _prevouts(self, tx: Any) -> dict[tuple[str, int], Any]:
        points = R.outpoints(tx)
        try:
            found = await asyncio.gather(*[self.backend.prevout(t, v) for t, v in dict.fromkeys(points)])
        except ChainError as exc:
            if exc.transient:
                raise ServiceUnavailable("chain_unavailable", f"could not check the inputs: {exc.reason}",
                                         headers={"Retry-After": "5"}) from None
            raise BadRequest("input_lookup_failed", exc.reason) from None
        return dict(zip(dict.fromkeys(points), found))

    async def _answered_already(self, txid: str) -> None:
        """A retry of our own payment whose call already has an outcome: the paywall answers it from there."""
        if await self.ledger.transfer(f"tx_{txid}"):
            raise PaidBefore(f"tx_{txid}")  # the paywall replays the kept response, or says why not

    async def broadcast(self, raw: str, txid: str, invoice_id: str, address: str) -> None:
        try:
            await self.backend.broadcast(raw)
        except ChainError as exc:
            if exc.transient:  # it may have reached the network: keep the claim, a retry is recognised
                raise ServiceUnavailable("chain_unavailable", f"could not broadcast: {exc.reason}",
                                         headers={"Retry-After": "5"}) from None
            if not already_known(exc.reason):  # fine only because we claimed it for this invoice first
                await self.records.release(txid, invoice_id, address)
                raise BadRequest("broadcast_rejected", exc.reason) from None
        await self.records.set_state(txid, "broadcast")

    async def _book(self, txid: str, paying: list[tuple[int, int]], payer: str, invoice_id: str) -> None:
        """Every coin paying the invoice address enters the payment's account, in one script."""
        account = onchain_account(txid)
        result = await book_coins(self.ledger, txid, paying, invoice=invoice_id, payer=payer)
        if result.outcome is Outcome.REPLAYED and result.transfer.get("credit") != account:
            raise Conflict("coins_booked", "these coins were booked already by another path")
        if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
            raise ServiceUnavailable("ledger_refused", f"the coins could not be booked: {result.outcome.value}")
        await self.records.set_state(txid, "booked")


_INVOICE_REASONS = {
    "invoice_invalid": "Payment-Invoice is not an invoice id of this service",
    "invoice_mismatch": "the invoice was issued for another request, amount or address",
    "invoice_expired": "the invoice has expired: request a new one (a fresh 402) and pay its address",
}


def onchain_error(refusal: R.Refusal) -> Exception:
    if refusal.status == 400:
        return BadRequest(refusal.code, refusal.detail)
    if refusal.status == 409:
        return Conflict(refusal.code, refusal.detail)
    return PaymentRequired(refusal.code, refusal.detail)


# --- what is left in payment accounts: the payer's once confirmed, else the operator's to settle -------
async def book_coins(ledger: Ledger, txid: str, paying: list[tuple[int, int]], **meta: str) -> Result:
    """Every output of `txid` paying one of our invoice addresses enters `onchain:<txid>` under its coin
    id, all in one script; the same set whichever path (the call, or chainwatch for stray coins) is first."""
    account = onchain_account(txid)
    return await ledger.post_all(
        [(coin_id(txid, vout), BITCOIN, account, value, {"reason": f"on-chain payment {txid}:{vout}", **meta})
         for vout, value in paying], open_credit=AccountKind.ESCROW)


async def book_strays(book: AddressBook, backend: ChainBackend, ledger: Ledger, records: OnChainRecords,
                      confirmations: int) -> int:
    """chainwatch: coins that reached an invoice address without paying a call (sent late, broadcast by
    their sender, a second payment) enter the books once confirmed, owned by nobody: the operator sees
    them in `unclaimed list`. So the chain account always equals what our addresses received."""
    booked = 0
    for address in await book.addresses("invoice"):
        by_tx: dict[str, list[tuple[int, int]]] = {}
        for r in await backend.received(address):
            if r.confirmations >= confirmations:
                by_tx.setdefault(r.txid, []).append((r.vout, r.value))
        for txid, paying in by_tx.items():
            result = await book_coins(ledger, txid, sorted(paying), stray=address)
            if result.outcome is Outcome.APPLIED:
                await records.add_open(txid, address=address, payer="", state="stray")
                booked += 1
                log.warning("stray_coins_booked", txid=txid, address=address, amount=sum(v for _, v in paying))
    return booked


async def settle_payments(records: OnChainRecords, ledger: Ledger, backend: ChainBackend, confirmations: int) -> int:
    """chainwatch: once a signed payer's transaction has `confirmations`, what its payment account still
    holds (an overpayment, a failed call) is credited to the payer. Anonymous payments wait for the operator."""
    settled = 0
    for txid in await records.open_payments():
        record = await records.get(txid)
        balance = await ledger.balance(onchain_account(txid))
        if balance is None or balance.pending_debits:
            continue  # not booked yet, or its call is still running
        if balance.available == 0:
            await records.close(txid)
            continue
        if not record.get("payer") or await _confirmations(backend, record.get("address", ""), txid) < confirmations:
            continue
        result = await ledger.post(f"settle:{txid}:{balance.posted}", onchain_account(txid),
                                   user_account(record["payer"]), ALL, reason=f"rest of on-chain payment {txid}")
        settled += result.ok
        if result.ok:
            log.info("onchain_rest_credited", txid=txid, payer=record["payer"], amount=result.transfer.get("amount"))
    return settled


async def unclaimed(records: OnChainRecords, ledger: Ledger) -> list[dict[str, Any]]:
    """Payment accounts still holding coins, with whom they belong to (if anyone): `unclaimed list`."""
    out = []
    for txid in await records.open_payments():
        balance = await ledger.balance(onchain_account(txid))
        if balance is None or balance.available + balance.pending_debits == 0:
            continue
        record = await records.get(txid)
        out.append({"txid": txid, "account": onchain_account(txid), "available": balance.available,
                    "held_by_a_call": balance.pending_debits, "payer": record.get("payer") or None,
                    "invoice": record.get("invoice") or None, "address": record.get("address") or None,
                    "state": record.get("state") or None})
    return out


async def settle_unclaimed(records: OnChainRecords, ledger: Ledger, txid: str, to_account: str) -> Result:
    """The operator settles one payment account: everything available goes to `to_account` (a user's
    account after the payer was identified, or the revenue account). Idempotent per balance."""
    balance = await ledger.balance(onchain_account(txid))
    if balance is None:
        return Result(Outcome.NOT_FOUND)
    result = await ledger.post(f"settle:{txid}:{balance.posted}", onchain_account(txid), to_account, ALL,
                               reason=f"on-chain payment {txid} settled by the operator")
    if result.ok and not balance.pending_debits:
        await records.close(txid)
    return result


async def _confirmations(backend: ChainBackend, address: str, txid: str) -> int:
    if not address:
        return 0
    return max((r.confirmations for r in await backend.received(address) if r.txid == txid), default=0)
