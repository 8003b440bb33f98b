"""Where an account's earnings go (keep | charity:<id> | address:<bitcoin address> above a minimum),
and withdrawals: the amount is held (a pending transfer to the chain account) and queued for the
operator's offline signer; the hold is posted when the batch is broadcast, voided if cancelled."""
from __future__ import annotations

import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from .bitcoin import DUST_LIMIT, valid_address
from .errors import Conflict, NotFound, PaymentRequired, Unprocessable
from .ledger import BITCOIN, Hold, Ledger, Outcome, user_account

__all__ = ["Payouts", "charity_account"]


def charity_account(charity_id: str) -> str:
    return f"charity:{charity_id}"


class Payouts:
    """Owns the `{prefix}:payout:*` and `{prefix}:wd:*` keys."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, *, network: str,
                 hold_days: int = 14, minimum_withdrawal: int = 10_000) -> None:
        self.redis, self.ledger, self.network = redis, ledger, network
        self.tag = "{" + prefix + "}"
        self.hold_seconds = hold_days * 86400
        self.minimum_withdrawal = minimum_withdrawal

    def _k(self, *parts: str) -> str:
        return ":".join([self.tag, *parts])

    # preference ------------------------------------------------------------------------------------
    async def preference(self, username: str) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("payout", username))
        return {"mode": raw.get("mode", "keep"), "minimum": int(raw.get("minimum", self.minimum_withdrawal))}

    async def set_preference(self, username: str, mode: str, minimum: int | None = None) -> dict[str, Any]:
        if mode.startswith("charity:") and not await self.ledger.balance(charity_account(mode[8:])):
            raise Unprocessable("validation_error", {"payout": [f"unknown charity {mode[8:]!r}; see GET /v1/charities"]})
        if mode.startswith("address:") and not valid_address(mode[8:], self.network):
            raise Unprocessable("validation_error", {"payout": [f"not a valid {self.network} bitcoin address"]})
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
    async def withdraw(self, username: str, amount: int, address: str) -> dict[str, Any]:
        """Hold `amount` for the operator's next signed batch; nothing moves if the balance is short."""
        if not valid_address(address, self.network):
            raise Unprocessable("validation_error", {"address": [f"not a valid {self.network} bitcoin address"]})
        if amount < max(self.minimum_withdrawal, DUST_LIMIT):
            raise Unprocessable("validation_error", {"amount": [f"at least {max(self.minimum_withdrawal, DUST_LIMIT)} sat"]})
        wd_id = f"wd_{secrets.token_hex(8)}"
        result = await self.ledger.hold(wd_id, user_account(username), BITCOIN, amount, timeout=self.hold_seconds,
                                        reason=f"withdrawal to {address}")
        if result.outcome is Outcome.INSUFFICIENT:
            raise PaymentRequired("insufficient_funds", "the amount exceeds your available balance")
        if not result.ok:
            raise Conflict(result.outcome.value, "the withdrawal could not be held")
        record = {"id": wd_id, "user": username, "amount": amount, "address": address, "state": "queued",
                  "created": int(time.time())}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("wd", wd_id), mapping=record)
            pipe.zadd(self._k("wd", "queue"), {wd_id: record["created"]})
            pipe.zadd(self._k("wd", "of", username), {wd_id: record["created"]})
            await pipe.execute()
        return await self.get(wd_id, username)

    async def get(self, wd_id: str, username: str | None = None) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("wd", wd_id))
        if not raw or (username is not None and raw["user"] != username):
            raise NotFound("unknown_withdrawal", "no withdrawal with this id for this account")
        return {**raw, "amount": int(raw["amount"]), "created": int(raw["created"])}

    async def of(self, username: str) -> list[dict[str, Any]]:
        return [await self.get(i) for i in await self.redis.zrevrange(self._k("wd", "of", username), 0, 49)]

    async def queued(self) -> list[dict[str, Any]]:
        return [await self.get(i) for i in await self.redis.zrange(self._k("wd", "queue"), 0, -1)]

    async def requeue(self, txid: str) -> None:
        """Forget an unbroadcast batch: its withdrawals go back to the queue for the next one."""
        for wd_id in await self.batch(txid):
            await self.redis.hset(self._k("wd", wd_id), "state", "queued")

    async def mark_batched(self, ids: list[str], txid: str) -> None:
        """Remember which withdrawals a batch transaction pays (its txid survives signing: segwit)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("wd", "batch", txid))
            pipe.rpush(self._k("wd", "batch", txid), *ids)
            for wd_id in ids:
                pipe.hset(self._k("wd", wd_id), mapping={"state": "batched", "batch": txid})
            await pipe.execute()

    async def batch(self, txid: str) -> list[str]:
        return await self.redis.lrange(self._k("wd", "batch", txid), 0, -1)

    async def settle(self, wd_id: str, txid: str) -> dict[str, Any]:
        """The batch paying it was broadcast: post the hold (idempotent)."""
        wd = await self.get(wd_id)
        await self.ledger.capture(Hold(wd_id, user_account(wd["user"]), BITCOIN, wd["amount"]))
        await self.redis.hset(self._k("wd", wd_id), mapping={"state": "sent", "txid": txid})
        await self.redis.zrem(self._k("wd", "queue"), wd_id)
        return await self.get(wd_id)

    async def cancel(self, wd_id: str, reason: str) -> dict[str, Any]:
        wd = await self.get(wd_id)
        await self.ledger.void(Hold(wd_id, user_account(wd["user"]), BITCOIN, wd["amount"]), reason)
        await self.redis.hset(self._k("wd", wd_id), mapping={"state": "cancelled", "reason": reason})
        await self.redis.zrem(self._k("wd", "queue"), wd_id)
        return await self.get(wd_id)

    async def auto_withdraw(self) -> int:
        """For accounts paid out to an address: queue a withdrawal once the balance reaches their minimum."""
        queued = 0
        for username in await self.redis.smembers(self._k("payout", "auto")):
            pref = await self.preference(username)
            balance = await self.ledger.balance(user_account(username))
            if pref["mode"].startswith("address:") and balance and balance.available >= pref["minimum"]:
                await self.withdraw(username, balance.available, pref["mode"][8:])
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
