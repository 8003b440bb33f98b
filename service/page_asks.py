"""Asking an expert from a web page, without an account: paid on chain, delivered once the coins confirm.

An unconfirmed payment never funds an escrow (payments/onchain.py: `zeroconf_not_accepted`), so the page
uses the path the server already trusts for escrows: a deposit. Each page ask gets its own ledger account
(`u:~ask-<id>`, a name no one can register and without a key, so nobody can spend from it by signing)
and that account's deposit address; chainwatch credits the coins after DEPOSIT_CONFIRMATIONS exactly as
for any deposit. `advance` then moves the price from that account into the question's escrow (one
idempotent ledger transfer) and delivers the question through the same Experts functions as the API.
The asker holds an unguessable capability (the private link); only its SHA-256 is stored. A refund
(expired or withdrawn question) returns to the ask's account, and the capability holder withdraws it
to a bitcoin address through the ordinary withdrawal queue.
"""
from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import redis.asyncio as aioredis
import structlog

from .chain.addresses import AddressBook
from .errors import Conflict, NotFound, ServiceUnavailable
from .experts import Experts
from .keys import Keys, question_escrow, user_account
from .ledger import AccountKind, Ledger, Outcome
from .payouts import Payouts

__all__ = ["PageAsks", "asker_name"]

log = structlog.get_logger("page_asks")
ASKER_PREFIX = "~ask-"  # '~' is outside USERNAME_RE: no one can register (or sign as) this account


def asker_name(ask_id: str) -> str:
    return ASKER_PREFIX + ask_id


def _digest(capability: str) -> str:
    return hashlib.sha256(capability.encode()).hexdigest()


class PageAsks:
    """Owns the `{prefix}:pa:*` keys; money moves only through the ledger, questions only through Experts."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, experts: Experts, payouts: Payouts,
                 book: AddressBook | None, *, confirmations: int, hours_to_pay: int = 72) -> None:
        self.redis, self.ledger, self.experts, self.payouts, self.book = redis, ledger, experts, payouts, book
        self.confirmations, self.hours_to_pay = confirmations, hours_to_pay
        self.keys = Keys(prefix)

    def _k(self, *parts: str) -> str:
        return self.keys.of("pa", *parts)

    async def create(self, expert: str, text: str, issue: str | None, price: int) -> str:
        """Record the ask and its payment address; returns the capability (shown once, in the redirect)."""
        if self.book is None:
            raise ServiceUnavailable("onchain_unavailable", "this server takes no on-chain payments (no PAYEE_XPUB); "
                                     "ask with the microtasks CLI and pay from a ledger balance")
        ask_id = secrets.token_hex(8)
        capability = secrets.token_urlsafe(32)
        asker = asker_name(ask_id)
        await self.ledger.open_account(user_account(asker), AccountKind.USER, display_name="web ask")
        address = await self.book.deposit_address(asker)
        now = int(time.time())
        await self.redis.hset(self._k("ask", _digest(capability)), mapping={
            "id": ask_id, "asker": asker, "expert": expert, "text": text, "issue": issue or "", "price": price,
            "address": address, "created": now, "pay_by": now + self.hours_to_pay * 3600})
        await self.redis.zadd(self._k("waiting"), {_digest(capability): now})
        return capability

    async def _record(self, capability: str) -> tuple[str, dict[str, str]]:
        digest = _digest(capability)
        record = await self.redis.hgetall(self._k("ask", digest))
        if not record:
            raise NotFound("unknown_ask", "no ask behind this link")
        return digest, record

    async def view(self, capability: str) -> dict[str, Any]:
        """What the private link shows: payment, then the question's status, reply or refund."""
        digest, record = await self._record(capability)
        if not record.get("question"):
            record = await self._advance(digest, record)
        balance = await self.ledger.balance(user_account(record["asker"]))
        out: dict[str, Any] = {
            "id": record["id"], "expert": record["expert"], "text": record["text"], "issue": record["issue"] or None,
            "price": int(record["price"]), "address": record["address"], "confirmations": self.confirmations,
            "pay_by": int(record["pay_by"]), "credited": balance.posted if balance else 0,
            "refundable": balance.available if balance and record.get("question") else 0,
            "question": None, "withdrawals": await self.payouts.of(record["asker"]),
        }
        if record.get("question"):
            out["question"] = await self.experts.question(record["question"], record["asker"])
            out["status"] = out["question"]["status"]
        else:
            out["status"] = "awaiting_payment" if int(record["pay_by"]) > time.time() else "payment_window_closed"
        return out

    async def _advance(self, digest: str, record: dict[str, str]) -> dict[str, str]:
        """Once the deposit is credited: fund the escrow from the ask's account and deliver the question.
        Every step is idempotent (fixed question id, fixed transfer id), so the sweeper and a page view
        may both run it."""
        asker, price = record["asker"], int(record["price"])
        qid, fund_id = f"q_web{record['id']}", f"pa:{record['id']}:fund"
        if not await self.ledger.transfer(fund_id):  # not funded yet (a retry after funding goes on to deliver)
            balance = await self.ledger.balance(user_account(asker))
            if balance is None or balance.available < price:
                return record
            if not await self.experts.has_question(qid):  # recorded once: a retry keeps its deadline
                profile = await self.experts.profile(record["expert"])
                await self.experts.prepare_question(qid, asker, kind="expert", target=record["expert"],
                                                    text=record["text"], price_each=price, shares=1,
                                                    hours=profile["reply_hours"], recipients=[record["expert"]],
                                                    form=None, issue=record["issue"] or None)
            result = await self.ledger.post_all([(fund_id, user_account(asker), question_escrow(qid), price,
                                                  {"reason": f"web ask {record['id']} paid on chain"})],
                                                open_credit=AccountKind.ESCROW)
            if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
                log.warning("page_ask_not_funded", ask=record["id"], outcome=result.outcome.value)
                return record
        await self.experts.publish_question(qid, asker)
        await self.redis.hset(self._k("ask", digest), "question", qid)
        await self.redis.zrem(self._k("waiting"), digest)
        log.info("page_ask_delivered", ask=record["id"], question=qid)
        return {**record, "question": qid}

    async def advance_all(self) -> int:
        """The sweeper: deliver every web ask whose deposit was credited since the last pass."""
        delivered = 0
        for digest in await self.redis.zrange(self._k("waiting"), 0, 199):
            record = await self.redis.hgetall(self._k("ask", digest))
            if not record or int(record["pay_by"]) + 30 * 86_400 < time.time():
                await self.redis.zrem(self._k("waiting"), digest)  # long unpaid: stop looking
                continue
            delivered += bool((await self._advance(digest, record)).get("question"))
        return delivered

    async def withdraw_refund(self, capability: str, address: str) -> dict[str, Any]:
        """The capability holder takes back what the ask's account holds (a refund, an overpayment)."""
        _, record = await self._record(capability)
        if not record.get("question"):
            raise Conflict("not_delivered", "nothing to refund before the payment is confirmed")
        balance = await self.ledger.balance(user_account(record["asker"]))
        if balance is None or balance.available <= 0:
            raise Conflict("nothing_to_refund", "this ask's account holds nothing")
        return await self.payouts.withdraw(record["asker"], balance.available, address)
