"""Where an account's earnings go (keep | charity:<id> | address:<bitcoin address> above a minimum),
and withdrawals: the amount is held (a pending transfer to the chain account) and queued for the
operator's offline signer; batching locks the hold (it can no longer expire or be cancelled), the
hold is posted when the batch is broadcast, voided if cancelled or expired before batching."""
from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .bitcoin import DUST_LIMIT, valid_address
from .errors import Conflict, NotFound, PaymentRequired, ServiceUnavailable, Unprocessable
from .keys import BITCOIN, Keys, charity_account, user_account
from .ledger import Hold, Ledger, Outcome, Result

__all__ = ["Payouts", "charity_account"]


def _batch_owner(txid: str) -> str:
    return f"batch:{txid}"


class Payouts:
    """Owns the `{prefix}:payout:*` and `{prefix}:wd:*` keys."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, *, network: str,
                 hold_days: int = 14, minimum_withdrawal: int = 10_000,
                 owns: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.redis, self.ledger, self.network = redis, ledger, network
        self.owns = owns  # is this address the service's own (AddressBook.owns)?
        self.keys = Keys(prefix)
        self.hold_seconds = hold_days * 86400
        self.minimum_withdrawal = minimum_withdrawal
        self._orphans: set[asyncio.Future] = set()  # background releases of holds without a withdrawal

    def _k(self, *parts: str) -> str:
        return self.keys.of(*parts)

    # preference ------------------------------------------------------------------------------------
    async def preference(self, username: str) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("payout", username))
        return {"mode": raw.get("mode", "keep"), "minimum": int(raw.get("minimum", self.minimum_withdrawal))}

    async def set_preference(self, username: str, mode: str, minimum: int | None = None) -> dict[str, Any]:
        if mode.startswith("charity:") and not await self.ledger.balance(charity_account(mode[8:])):
            raise Unprocessable("validation_error", {"payout": [f"unknown charity {mode[8:]!r}; see GET /v1/charities"]})
        if mode.startswith("address:") and not valid_address(mode[8:], self.network):
            raise Unprocessable("validation_error", {"payout": [f"not a valid {self.network} bitcoin address"]})
        if mode.startswith("address:") and await self.is_ours(mode[8:]):
            raise Unprocessable("validation_error", {"payout": ["an address of this service cannot be a payout address"]})
        minimum = max(minimum or self.minimum_withdrawal, self.minimum_withdrawal)
        await self.redis.hset(self._k("payout", username), mapping={"mode": mode, "minimum": minimum,
                                                                     "updated": int(time.time())})
        if mode.startswith("address:"):
            await self.redis.sadd(self._k("payout", "auto"), username)
        else:
            await self.redis.srem(self._k("payout", "auto"), username)
        return await self.preference(username)

    async def earnings_account(self, username: str) -> str:
        """The account a payment earned by `username` is credited to (their charity, or themselves)."""
        mode = (await self.preference(username))["mode"]
        return charity_account(mode[8:]) if mode.startswith("charity:") else user_account(username)

    # withdrawals -----------------------------------------------------------------------------------
    # States: queued (hold pending) → batched (hold locked by the batch: cannot expire or be cancelled)
    # → sent (hold captured); queued → cancelled | expired (hold voided). The ledger hold decides: a
    # withdrawal whose hold is not pending is never put in a batch.
    async def withdraw(self, username: str, amount: int, address: str) -> dict[str, Any]:
        """Hold `amount` for the operator's next signed batch; nothing moves if the balance is short."""
        if not valid_address(address, self.network):
            raise Unprocessable("validation_error", {"address": [f"not a valid {self.network} bitcoin address"]})
        if await self.is_ours(address):
            raise Unprocessable("validation_error", {"address": ["an address of this service (invoice, deposit or "
                                                                 "change) cannot receive a withdrawal"]})
        if amount < max(self.minimum_withdrawal, DUST_LIMIT):
            raise Unprocessable("validation_error", {"amount": [f"at least {max(self.minimum_withdrawal, DUST_LIMIT)} sat"]})
        await self.refuse_if_frozen(username)
        wd_id = f"wd_{secrets.token_hex(8)}"
        hold = Hold(wd_id, user_account(username), BITCOIN, amount)
        try:
            result = await self.ledger.hold(wd_id, hold.debit, BITCOIN, amount, timeout=self.hold_seconds,
                                            reason=f"withdrawal to {address}")
        except RedisError:  # the hold may still apply: go on only if the ledger says it did
            state = await self.ledger.state_after_doubt(wd_id)
            if state != "pending":
                raise self._not_withdrawn(hold, state) from None
            result = Result(Outcome.APPLIED)
        if result.outcome is Outcome.INSUFFICIENT:
            raise PaymentRequired("insufficient_funds", "the amount exceeds your available balance")
        if not result.ok:
            raise Conflict(result.outcome.value, "the withdrawal could not be held")
        record = {"id": wd_id, "user": username, "amount": amount, "address": address, "state": "queued",
                  "created": int(time.time())}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._k("wd", wd_id), mapping=record)
                pipe.zadd(self._k("wd", "queue"), {wd_id: record["created"]})
                pipe.zadd(self._k("wd", "of", username), {wd_id: record["created"]})
                await pipe.execute()
        except RedisError:  # queued or not: the background check keeps it, or releases the hold
            raise self._not_withdrawn(hold, "unknown") from None
        return await self.get(wd_id, username)

    def _not_withdrawn(self, hold: Hold, state: str) -> ServiceUnavailable:
        """A withdrawal the ledger did not confirm: nothing is sent unless it was queued; a hold taken
        without a queued withdrawal is released in the background as soon as the ledger answers."""
        if state == "absent":
            return ServiceUnavailable("ledger_unavailable", "the ledger did not answer; nothing was held or "
                                      "withdrawn; retry", headers={"Retry-After": "1"})
        self._orphans.add(asyncio.ensure_future(self._release_orphan(hold)))
        return ServiceUnavailable(
            "withdrawal_outcome_unknown",
            f"the ledger did not confirm withdrawal {hold.id}; if GET /v1/accounts/me lists it, it is queued; "
            f"otherwise nothing is sent and any amount held for it is released as soon as the ledger answers",
            headers={"Retry-After": "1"})

    async def _release_orphan(self, hold: Hold, tries: int = 120) -> None:
        """Void a withdrawal hold that has no queued withdrawal record (the request failed midway)."""
        try:
            for _ in range(tries):
                try:
                    if await self.redis.exists(self._k("wd", hold.id)):
                        return  # it was queued after all: a real withdrawal
                    await self.ledger.void(hold, "withdrawal not queued")
                    return  # voided, or nothing to void (never held, or resolved already)
                except RedisError:
                    await asyncio.sleep(1)
        finally:
            self._orphans.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def is_ours(self, address: str) -> bool:
        """Paying our own invoice, deposit or change address would come back as a deposit: the batch fee
        of every round trip would drain the operator."""
        return bool(self.owns is not None and await self.owns(address))

    async def get(self, wd_id: str, username: str | None = None) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("wd", wd_id))
        if not raw or (username is not None and raw["user"] != username):
            raise NotFound("unknown_withdrawal", "no withdrawal with this id for this account")
        out: dict[str, Any] = {**raw, "amount": int(raw["amount"]), "created": int(raw["created"])}
        for key in ("fee", "sent"):
            if key in out:
                out[key] = int(out[key])
        return out

    async def of(self, username: str) -> list[dict[str, Any]]:
        return [await self.get(i) for i in await self.redis.zrevrange(self._k("wd", "of", username), 0, 49)]

    async def queued(self) -> list[dict[str, Any]]:
        return [await self.get(i) for i in await self.redis.zrange(self._k("wd", "queue"), 0, -1)]

    async def refresh(self) -> int:
        """Take withdrawals whose hold was voided (expired, or cancelled) out of the queue for good."""
        return len((await self._scan())[1])

    async def _scan(self) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], list[str]]:
        """One pass over the queue: (queued withdrawals with their live hold, ids taken out because their
        hold was voided or is missing)."""
        live, gone = [], []
        for wd in await self.queued():
            if wd["state"] != "queued":
                continue
            hold = await self.ledger.transfer(wd["id"])
            if hold is not None and hold["state"] != "voided":
                live.append((wd, hold))
                continue
            state = "expired" if hold is None or hold.get("reason") == "expired" else "cancelled"
            await self._finish(wd["id"], state, reason=(hold or {}).get("reason", "hold missing"))
            gone.append(wd["id"])
        return live, gone

    async def _finish(self, wd_id: str, state: str, **fields: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("wd", wd_id), mapping={"state": state, **fields})
            pipe.zrem(self._k("wd", "queue"), wd_id)
            await pipe.execute()

    async def batchable(self) -> list[dict[str, Any]]:
        """Queued withdrawals whose hold is pending and unlocked, of accounts whose withdrawals are not on hold."""
        out = []
        for wd, hold in (await self._scan())[0]:  # one read of the queue and of each hold
            if (hold["state"] == "pending" and not hold.get("locked") and int(hold.get("expires") or 0) > time.time() * 1000
                    and not await self.is_ours(wd["address"]) and not await self.frozen(wd["user"])):
                out.append(wd)
        return out

    async def lock_for_batch(self, ids: list[str], txid: str) -> list[str]:
        """Lock each hold for batch `txid` (no expiry, no cancel); the ids that could not be locked."""
        failed = []
        for wd_id in ids:
            result = await self.ledger.lock(wd_id, _batch_owner(txid))
            if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
                failed.append(wd_id)
        return failed

    async def unlock(self, ids: list[str], txid: str) -> None:
        for wd_id in ids:
            await self.ledger.unlock(wd_id, _batch_owner(txid), self.hold_seconds)

    async def mark_batched(self, shares: dict[str, int], txid: str, fee: int) -> None:
        """Remember which withdrawals a batch transaction pays and the fee share each one bears (its txid
        survives signing: segwit)."""
        amounts = {wd_id: (await self.get(wd_id))["amount"] for wd_id in shares}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("wd", "batch", txid))
            pipe.rpush(self._k("wd", "batch", txid), *shares)
            pipe.hset(self._k("wd", "batchinfo", txid), mapping={"state": "built", "fee": fee,
                                                                "created": int(time.time())})
            pipe.sadd(self._k("wd", "built"), txid)
            for wd_id, share in shares.items():
                pipe.hset(self._k("wd", wd_id), mapping={"state": "batched", "batch": txid, "fee": share,
                                                         "sent": amounts[wd_id] - share})
            await pipe.execute()

    async def batch(self, txid: str) -> list[str]:
        return await self.redis.lrange(self._k("wd", "batch", txid), 0, -1)

    async def batch_info(self, txid: str) -> dict[str, str]:
        return await self.redis.hgetall(self._k("wd", "batchinfo", txid))

    async def sent_batches(self) -> list[str]:
        return sorted(await self.redis.smembers(self._k("wd", "sent")))

    async def built_batches(self) -> list[str]:
        """Batches built and neither broadcast here nor dropped."""
        return sorted(await self.redis.smembers(self._k("wd", "built")))

    async def check_batch(self, txid: str) -> list[str]:
        """Why batch `txid` must not be broadcast (empty: every hold is pending and locked by it)."""
        problems = []
        for wd_id in await self.batch(txid):
            hold = await self.ledger.transfer(wd_id)
            if hold is None or hold["state"] != "pending" or hold.get("locked") != _batch_owner(txid):
                state = "missing" if hold is None else f"{hold['state']}, locked by {hold.get('locked') or 'nobody'}"
                problems.append(f"{wd_id}: hold {state}")
        return problems

    async def record_broadcast(self, txid: str, raw: str) -> None:
        """The network took batch `txid`: keep its raw transaction for the chain audit."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("wd", "batchinfo", txid), mapping={"state": "sent", "raw": raw,
                                                                "broadcast": int(time.time())})
            pipe.sadd(self._k("wd", "sent"), txid)
            pipe.srem(self._k("wd", "built"), txid)
            await pipe.execute()

    async def settle(self, wd_id: str, txid: str) -> dict[str, Any]:
        """The batch paying it was broadcast: post the hold (idempotent). Raises Conflict, loudly, when the
        capture did not apply: coins left on chain that the ledger did not book out."""
        wd = await self.get(wd_id)
        result = await self.ledger.capture(Hold(wd_id, user_account(wd["user"]), BITCOIN, wd["amount"]))
        if not (result.ok or (result.outcome is Outcome.NOT_PENDING and result.transfer.get("state") == "posted")):
            await self._finish(wd_id, "unsettled", txid=txid, reason=f"capture {result.outcome.value}")
            raise Conflict("capture_failed", f"withdrawal {wd_id} was paid on chain by {txid} but its hold could "
                                             f"not be captured ({result.outcome.value}): the ledger did not book it")
        await self._finish(wd_id, "sent", txid=txid)
        return await self.get(wd_id)

    async def cancel(self, wd_id: str, reason: str) -> dict[str, Any]:
        """Void a queued withdrawal's hold. A batched one stays in its batch (drop the batch first); a sent
        one was paid; both answer 409 and change nothing."""
        wd = await self.get(wd_id)
        if wd["state"] == "batched":
            raise Conflict("withdrawal_batched", f"withdrawal {wd_id} is in batch {wd['batch']}, built but not yet "
                                                 f"broadcast; drop that batch first (`withdrawals drop {wd['batch']}`: "
                                                 "its other withdrawals go back to the queue)")
        if wd["state"] in ("sent", "unsettled"):
            raise Conflict("withdrawal_sent", f"withdrawal {wd_id} was already sent on chain in {wd.get('txid')}; "
                                              "it cannot be cancelled")
        if wd["state"] != "queued":
            raise Conflict("withdrawal_closed", f"withdrawal {wd_id} is already {wd['state']}")
        hold = await self.ledger.transfer(wd_id)
        if hold is not None and hold["state"] == "posted":
            raise Conflict("withdrawal_sent", f"withdrawal {wd_id} was already booked out; it cannot be cancelled")
        owner = f"cancel:{wd_id}"
        locked = await self.ledger.lock(wd_id, owner)  # no batch can take it once we hold the lock
        if locked.outcome is Outcome.LOCKED:
            raise Conflict("withdrawal_batched", f"withdrawal {wd_id} is being batched ({locked.transfer['state']})")
        await self.ledger.void(Hold(wd_id, user_account(wd["user"]), BITCOIN, wd["amount"]), reason)
        await self.refresh()
        if (await self.get(wd_id))["state"] == "queued":  # a hold that was never there: nothing to void
            await self._finish(wd_id, "cancelled", reason=reason)
        return await self.get(wd_id)

    async def drop(self, txid: str) -> list[str]:
        """Forget an unbroadcast batch: its holds are unlocked (a fresh deadline) and its withdrawals queued."""
        info = await self.batch_info(txid)
        if not info and not await self.batch(txid):
            raise NotFound("unknown_batch", f"no batch {txid} was built here")
        if info.get("state", "built") != "built":
            raise Conflict("batch_sent", f"batch {txid} was broadcast; it cannot be dropped")
        ids = await self.batch(txid)
        await self.unlock(ids, txid)
        async with self.redis.pipeline(transaction=True) as pipe:
            for wd_id in ids:
                pipe.hset(self._k("wd", wd_id), "state", "queued")
                pipe.hdel(self._k("wd", wd_id), "batch", "fee", "sent")
            pipe.hset(self._k("wd", "batchinfo", txid), "state", "dropped")
            pipe.srem(self._k("wd", "built"), txid)
            await pipe.execute()
        return ids

    # withdrawals on hold (a deposit reversed by a reorg) ---------------------------------------------
    async def freeze(self, username: str, reason: str) -> None:
        await self.redis.hset(self._k("wd", "frozen"), username, reason)

    async def release(self, username: str) -> bool:
        return bool(await self.redis.hdel(self._k("wd", "frozen"), username))

    async def frozen(self, username: str) -> str | None:
        return await self.redis.hget(self._k("wd", "frozen"), username)

    async def refuse_if_frozen(self, username: str) -> None:
        reason = await self.frozen(username)
        if reason:
            raise Conflict("withdrawals_on_hold", f"withdrawals from this account are on hold: {reason}; "
                                                  "ask the operator")

    async def auto_withdraw(self) -> int:
        """For accounts paid out to an address: queue a withdrawal once the balance reaches their minimum,
        one at a time (never another while one is queued or batched)."""
        await self.refresh()
        queued = 0
        for username in await self.redis.smembers(self._k("payout", "auto")):
            pref = await self.preference(username)
            balance = await self.ledger.balance(user_account(username))
            if not (pref["mode"].startswith("address:") and balance and balance.available >= pref["minimum"]):
                continue
            if await self.frozen(username) or await self.is_ours(pref["mode"][8:]):
                continue
            if any(w["state"] in ("queued", "batched") for w in await self.of(username)):
                continue
            try:
                await self.withdraw(username, balance.available, pref["mode"][8:])
            except (PaymentRequired, Conflict):  # spent meanwhile: next round
                continue
            queued += 1
        return queued

    async def earnings(self, username: str) -> dict[str, int]:
        """Credits of the recent journal grouped by where they came from."""
        sources = {"xp:": "questions", "crowd:": "crowd_qa", "credit:": "grants", "refund:": "refunds"}
        out: dict[str, int] = {}
        account = user_account(username)
        for t in await self.ledger.history(account, 1000):
            if t["credit"] == account and t["state"] == "posted":
                source = next((name for prefix, name in sources.items() if t["id"].startswith(prefix)), "other")
                out[source] = out.get(source, 0) + int(t["amount"])
        return out
