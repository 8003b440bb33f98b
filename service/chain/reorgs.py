"""Deep reorgs (run by `chainwatch` after each crediting pass): every deposit credited to a user is
re-checked until it is REORG_SAFE_DEPTH blocks deep. One that disappears (unknown to the node, or back
in the mempool) is reversed in the open: a ledger transfer `reorg:<txid>:<vout>` takes the coins back
from the account to `sys:bitcoin`, as much as the account has available (a user account never goes
below zero); what it lacks is recorded as a debt and collected from later credits. The account's
withdrawals go on hold (refused, kept out of batches) until the operator releases them, an error line
is logged and `microtasks_deposits_reorged_total` counts it. If the transaction confirms again, what
was taken is given back (`reorg-restore:<txid>:<vout>`) and the debt is forgiven.

Credited deposits are found in the ledger's journal (every `coin:*` post from `sys:bitcoin` to a
user), read from a cursor, so no credit escapes the re-check, whichever process booked it.

On-chain call payments (coins booked into `onchain:<txid>` at zero confirmations, or strays) are
re-checked the same way until REORG_SAFE_DEPTH deep: one whose transaction the node no longer knows
(double-spent, dropped, reorged out) is reversed in the open: `reorg:<txid>:<vout>` takes back what the
payment account still holds, `reorg:<txid>:<vout>:+<n>` the rest from revenue (the price already
earned: the operator's loss, shown), an error line `onchain_payment_vanished` is logged and
`microtasks_onchain_payments_vanished_total` counts it. If it confirms again, both are given back."""
from __future__ import annotations

import json
import secrets
from typing import Any

import redis.asyncio as aioredis
import structlog

from ..keys import BITCOIN, REVENUE, Keys, is_onchain_account, is_user_account
from ..ledger import Ledger, Outcome
from ..metrics import ONCHAIN_VANISHED, REORGS
from ..payouts import Payouts
from ..scripts import lua
from .backends import ChainBackend, ChainError

__all__ = ["recheck_deposits", "reversed_deposits"]

log = structlog.get_logger("chainwatch")


def _k(prefix: str, *parts: str) -> str:
    return Keys(prefix).of("reorg", *parts)


async def reversed_deposits(redis: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    """Deposits a reorg took away and that have not confirmed again (for the operator and /metrics)."""
    out = []
    for outpoint, raw in (await redis.hgetall(_k(prefix, "watch"))).items():
        rec = json.loads(raw)
        if rec["state"] == "reversed":
            out.append({"outpoint": outpoint, **rec})
    return sorted(out, key=lambda r: r["outpoint"])


async def recheck_deposits(ledger: Ledger, backend: ChainBackend, payouts: Payouts, *, confirmations: int,
                           safe_depth: int) -> dict[str, int]:
    """One pass (one process at a time: a short Redis lock): watch new credits, reverse the vanished,
    restore the reconfirmed, collect debts, forget what is safe_depth deep."""
    redis, prefix = ledger.redis, ledger.keys.prefix
    token = secrets.token_hex(8)
    if not await redis.set(_k(prefix, "lock"), token, nx=True, ex=120):
        return {"skipped": 1}
    try:
        return await _pass(ledger, backend, payouts, prefix, confirmations, safe_depth)
    finally:
        await redis.eval(lua("reorg_unlock"), 1, _k(prefix, "lock"), token)


async def _discover(ledger: Ledger, prefix: str) -> int:
    """Add every user credit of a coin journaled since the cursor to the watch list."""
    redis, found = ledger.redis, 0
    cursor = await redis.get(_k(prefix, "cursor")) or "0-0"
    while True:
        entries = await redis.xrange(ledger.journal_key, f"({cursor}", "+", count=1000)
        if not entries:
            return found
        for entry_id, e in entries:
            if (e.get("op") == "post" and e.get("id", "").startswith("coin:") and e.get("debit") == BITCOIN
                    and is_user_account(e.get("credit", ""))):
                _, txid, vout = e["id"].split(":")
                rec = {"account": e["credit"], "amount": int(e["amount"]), "state": "credited", "gen": 0,
                       "taken": 0, "debt": 0}
                found += await redis.hsetnx(_k(prefix, "watch"), f"{txid}:{vout}", json.dumps(rec))
            elif (e.get("op") == "post" and e.get("id", "").startswith("coin:") and e.get("debit") == BITCOIN
                    and is_onchain_account(e.get("credit", ""))):
                _, txid, vout = e["id"].split(":")
                rec = {"account": e["credit"], "amount": int(e["amount"]), "state": "booked", "from_account": 0,
                       "from_revenue": 0}
                found += await redis.hsetnx(_k(prefix, "payments"), f"{txid}:{vout}", json.dumps(rec))
            cursor = entry_id
        await redis.set(_k(prefix, "cursor"), cursor)


async def _pass(ledger: Ledger, backend: ChainBackend, payouts: Payouts, prefix: str, confirmations: int,
                safe_depth: int) -> dict[str, int]:
    redis = ledger.redis
    stats = {"watching": 0, "reversed": 0, "restored": 0, "final": 0, "collected": 0,
             "new": await _discover(ledger, prefix)}
    seen: dict[str, int | None] = {}
    for outpoint, raw in (await redis.hgetall(_k(prefix, "watch"))).items():
        rec = json.loads(raw)
        txid, vout = outpoint.split(":")
        if txid not in seen:
            try:
                seen[txid] = await backend.tx_confirmations(txid)
            except ChainError as exc:  # the node cannot say: nothing is decided on silence
                log.warning("reorg_check_failed", txid=txid, error=exc.reason)
                continue
        conf = seen[txid]
        if rec["state"] == "credited":
            if not conf:
                rec.update(state="reversed", gen=rec["gen"] + 1, taken=0, debt=rec["amount"])
                username = rec["account"][2:]
                await payouts.freeze(username, f"deposit {txid}:{vout} was reversed by a chain reorganisation")
                REORGS.inc()
                log.error("deposit_reorged", account=rec["account"], txid=txid, vout=int(vout), amount=rec["amount"],
                          confirmations=conf, withdrawals="on hold")
                stats["reversed"] += 1
            elif conf >= safe_depth:
                await redis.hdel(_k(prefix, "watch"), outpoint)
                stats["final"] += 1
                continue
        elif conf is not None and conf >= confirmations:  # reversed, and confirmed again
            if rec["taken"]:
                result = await ledger.post(_id("reorg-restore", txid, vout, rec["gen"]), BITCOIN, rec["account"],
                                           rec["taken"], reason=f"deposit {txid}:{vout} confirmed again")
                if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
                    log.error("reorg_restore_failed", txid=txid, vout=int(vout), outcome=result.outcome.value)
                    continue
            log.warning("deposit_restored", account=rec["account"], txid=txid, vout=int(vout), amount=rec["amount"],
                        given_back=rec["taken"], debt_forgiven=rec["debt"])
            rec.update(state="credited", taken=0, debt=0)
            stats["restored"] += 1
        if rec["state"] == "reversed" and rec["debt"] > 0:
            stats["collected"] += await _collect(ledger, txid, vout, rec)
        await redis.hset(_k(prefix, "watch"), outpoint, json.dumps(rec))
        stats["watching"] += 1
    stats.update(await _recheck_payments(ledger, backend, prefix, confirmations, safe_depth, seen))
    return stats


async def _recheck_payments(ledger: Ledger, backend: ChainBackend, prefix: str, confirmations: int, safe_depth: int,
                            seen: dict[str, int | None]) -> dict[str, int]:
    """Booked call payments: reverse the vanished (account first, then revenue), restore the reconfirmed,
    forget what is safe_depth deep."""
    redis, key = ledger.redis, _k(prefix, "payments")
    stats = {"payments_watching": 0, "payments_vanished": 0, "payments_restored": 0}
    for outpoint, raw in (await redis.hgetall(key)).items():
        rec = json.loads(raw)
        txid, vout = outpoint.split(":")
        if txid not in seen:
            try:
                seen[txid] = await backend.tx_confirmations(txid)
            except ChainError as exc:
                log.warning("reorg_check_failed", txid=txid, error=exc.reason)
                continue
        conf = seen[txid]
        if rec["state"] == "booked" and conf is not None and conf >= safe_depth:
            await redis.hdel(key, outpoint)
            continue
        if rec["state"] == "booked" and conf is None:
            balance = await ledger.balance(rec["account"])
            if balance is not None and balance.pending_debits:
                continue  # its call is still running: decide on the next pass
            rec["gen"] = rec.get("gen", 0) + 1
            if not await _reverse_payment(ledger, txid, vout, rec):
                continue
            rec["state"] = "reversed"
            ONCHAIN_VANISHED.inc()
            log.error("onchain_payment_vanished", txid=txid, vout=int(vout), account=rec["account"],
                      amount=rec["amount"], from_account=rec["from_account"], from_revenue=rec["from_revenue"],
                      lost=rec["amount"] - rec["from_account"] - rec["from_revenue"])
            stats["payments_vanished"] += 1
        elif rec["state"] == "reversed" and conf is not None and conf >= confirmations:
            if not await _restore_payment(ledger, txid, vout, rec):
                continue
            log.warning("onchain_payment_restored", txid=txid, vout=int(vout), amount=rec["amount"])
            rec.update(state="booked", from_account=0, from_revenue=0)
            stats["payments_restored"] += 1
        await redis.hset(key, outpoint, json.dumps(rec))
        stats["payments_watching"] += 1
    return stats


async def _reverse_payment(ledger: Ledger, txid: str, vout: str, rec: dict[str, Any]) -> bool:
    """Take the coin back to the chain account: what the payment account holds, then the rest from revenue
    (as far as it reaches: a user account that was paid the rest is not touched; the gap is logged)."""
    for source, field, part in ((rec["account"], "from_account", 0), (REVENUE, "from_revenue", 1)):
        transfer_id = _id("reorg", txid, vout, rec["gen"], part and rec["from_account"] + 1)
        done = await ledger.transfer(transfer_id)  # a pass that stopped half-way: what it took stands
        if done:
            rec[field] = int(done["amount"])
            continue
        balance = await ledger.balance(source)
        take = min(rec["amount"] - rec["from_account"] - rec["from_revenue"], balance.available if balance else 0)
        if take <= 0:
            continue
        result = await ledger.post(transfer_id, source, BITCOIN,
                                   take, reason=f"on-chain payment {txid}:{vout} vanished from the chain")
        if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
            log.error("onchain_reversal_failed", txid=txid, vout=int(vout), outcome=result.outcome.value)
            return False
        rec[field] = int(result.transfer["amount"])
    return True


async def _restore_payment(ledger: Ledger, txid: str, vout: str, rec: dict[str, Any]) -> bool:
    """The vanished payment confirmed after all: give back what was taken, to where it was taken from."""
    for target, field, part in ((rec["account"], "from_account", 0), (REVENUE, "from_revenue", 1)):
        if rec[field]:
            restore_id = _id("reorg-restore", txid, vout, rec["gen"], part and rec["from_account"] + 1)
            result = await ledger.post(restore_id, BITCOIN, target, rec[field],
                                       reason=f"on-chain payment {txid}:{vout} confirmed again")
            if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
                log.error("onchain_restore_failed", txid=txid, vout=int(vout), outcome=result.outcome.value)
                return False
    return True


def _id(kind: str, txid: str, vout: str, gen: int, part: int = 0) -> str:
    """reorg:<txid>:<vout> for the first reversal; :<gen> for a later one, :+<taken so far> for a later part."""
    return f"{kind}:{txid}:{vout}" + (f":{gen}" if gen > 1 else "") + (f":+{part}" if part else "")


async def _collect(ledger: Ledger, txid: str, vout: str, rec: dict[str, Any]) -> int:
    """Take back as much of the reversed deposit as the account has available (ids derived from what was
    taken so far, so a retried pass replays instead of taking twice)."""
    collected = 0
    for _ in range(5):  # the balance may move under us: a few tries per pass
        balance = await ledger.balance(rec["account"])
        take = min(rec["debt"], balance.available if balance else 0)
        if take <= 0:
            break
        result = await ledger.post(_id("reorg", txid, vout, rec["gen"], rec["taken"]), rec["account"], BITCOIN, take,
                                   reason=f"deposit {txid}:{vout} reversed by a chain reorganisation")
        if result.outcome is Outcome.INSUFFICIENT:
            continue
        if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
            log.error("reorg_reversal_failed", txid=txid, vout=int(vout), outcome=result.outcome.value)
            break
        amount = int(result.transfer["amount"])
        rec["taken"] += amount
        rec["debt"] -= amount
        collected += amount
        if rec["debt"] <= 0:
            break
    if rec["debt"] > 0:
        log.error("reorg_debt_open", account=rec["account"], txid=txid, vout=int(vout), debt=rec["debt"])
    return collected
