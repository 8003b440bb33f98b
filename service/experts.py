"""The expert marketplace: profiles, lists, pay-on-reply questions, surveys, hire requests, charities.

Money: asking pays the price into the question's own escrow account (`escrow:q:<id>`, opened by that
payment, never below zero). Each paid reply is one ledger transfer from the escrow to the replier (or
their charity) that also stores the reply, in the same Lua script, under a claim per replier: a
replier is paid at most once, a list question pays at most `max_responses` shares, and nothing is paid
after the question closed. The deadline sweeper (or the asker's withdrawal) closes the question and
returns whatever is left with one all-of-it transfer that claims `closed`: between a reply and the
sweeper exactly one wins each share. A question is recorded (unpublished, its deadline set) before its
payment is captured and delivered after, so no failure leaves a price in an escrow no path releases.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import secrets
import statistics
import time
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from . import metrics, tasks, webhooks
from .errors import Conflict, Forbidden, NotFound, ServiceUnavailable, Unprocessable
from .inputs import identifier
from .keys import Keys, charity_account, question_escrow, user_account
from .ledger import ALL, AccountKind, Guard, Ledger, Outcome, Result
from .payouts import Payouts

__all__ = ["Experts", "CHARITIES"]

log = structlog.get_logger("experts")
_CHARITY_ID = re.compile(r"[a-z0-9-]{1,64}")

CHARITIES = {
    "coincenter": "Coin Center",
    "black-girls-code": "Black Girls Code",
    "folding-at-home": "Folding@home",
    "code-to-inspire": "Code to Inspire",
}


class Experts:
    """Owns every `{prefix}:xp:*` key; money moves only through the ledger."""

    webhook_policy: webhooks.Policy | None = None  # the app's (None: the process's, webhooks.configure)

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, payouts: Payouts) -> None:
        self.redis, self.ledger, self.payouts = redis, ledger, payouts
        self.keys = Keys(prefix)

    def _k(self, *parts: str) -> str:
        return self.keys.of("xp", *parts)

    async def open_questions(self) -> int:
        return int(await self.redis.zcard(self._k("open")))

    # charities -------------------------------------------------------------------------------------
    async def ensure_charities(self) -> None:
        for cid, name in CHARITIES.items():
            await self.ledger.open_account(charity_account(cid), AccountKind.CHARITY, display_name=name)
            await self.redis.hset(self._k("charities"), cid, name)

    async def add_charity(self, cid: str, name: str) -> dict[str, Any]:
        cid = identifier(cid, _CHARITY_ID, "charity id")  # becomes an account name: whole and canonical
        await self.ledger.open_account(charity_account(cid), AccountKind.CHARITY, display_name=name)
        await self.redis.hset(self._k("charities"), cid, name)
        return {"id": cid, "name": name}

    async def charities(self) -> list[dict[str, Any]]:
        out = []
        for cid, name in sorted((await self.redis.hgetall(self._k("charities"))).items()):
            balance = await self.ledger.balance(charity_account(cid))
            out.append({"id": cid, "name": name, "received": balance.posted if balance else 0})
        return out

    # profiles --------------------------------------------------------------------------------------
    async def put_profile(self, username: str, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("payout"):
            await self.payouts.set_preference(username, data["payout"])
        key = self._k("profile", username)
        old = await self.redis.hgetall(key)
        secret = old.get("webhook_secret") or secrets.token_hex(16)
        record = {
            "username": username, "display_name": data["display_name"], "bio": data["bio"],
            "tags": json.dumps(sorted(set(data["tags"]))), "price": data["price"] or 0,
            "price_usd": data["price_usd"].removeprefix("$") if data["price_usd"] else "", "reply_hours": data["reply_hours"],
            "links": json.dumps(data["links"]), "available_for_hire": int(data["available_for_hire"]),
            "webhook": data["webhook"] or "", "webhook_secret": secret,
            "created": old.get("created") or int(time.time()),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            for tag in json.loads(old.get("tags") or "[]"):
                pipe.srem(self._k("tag", tag), username)
            pipe.hset(key, mapping=record)
            pipe.sadd(self._k("experts"), username)
            for tag in data["tags"]:
                pipe.sadd(self._k("tag", tag), username)
            await pipe.execute()
        profile = await self.profile(username)
        return {**profile, "webhook_secret": secret}  # shown to its owner only

    async def profile(self, username: str) -> dict[str, Any]:
        p = await self.redis.hgetall(self._k("profile", username))
        if not p:
            raise NotFound("unknown_expert", f"{username!r} has no expert profile")
        times = [int(t) for t in await self.redis.lrange(self._k("replytimes", username), 0, -1)]
        return {
            "username": username, "display_name": p["display_name"], "bio": p["bio"], "tags": json.loads(p["tags"]),
            "price": int(p["price"]) or None, "price_usd": p.get("price_usd") or None, "reply_hours": int(p["reply_hours"]),
            "payout": (await self.payouts.preference(username))["mode"],
            "links": json.loads(p["links"]), "available_for_hire": p["available_for_hire"] == "1",
            "stats": {"answered": int(p.get("answered", 0)), "expired": int(p.get("expired", 0)),
                      "median_reply_seconds": statistics.median(times) if times else None},
        }

    async def list_experts(self, tag: str | None) -> list[dict[str, Any]]:
        names = await self.redis.smembers(self._k("tag", tag) if tag else self._k("experts"))
        return [await self.profile(n) for n in sorted(names)]

    # lists -----------------------------------------------------------------------------------------
    async def create_list(self, owner: str, name: str, description: str, price: int, approval: bool) -> dict[str, Any]:
        created = await self.redis.hsetnx(self._k("list", name), "name", name)
        if not created:
            raise Conflict("list_exists", f"a list named {name!r} exists already")
        await self.redis.hset(self._k("list", name), mapping={
            "owner": owner, "description": description, "price": price, "approval": int(approval),
            "created": int(time.time())})
        await self.redis.sadd(self._k("lists"), name)
        return await self.get_list(name)

    async def get_list(self, name: str) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("list", name))
        if not raw:
            raise NotFound("unknown_list", f"no list named {name!r}")
        members = await self.redis.hgetall(self._k("members", name))
        return {"name": name, "owner": raw["owner"], "description": raw["description"], "price": int(raw["price"]),
                "approval_required": raw["approval"] == "1",
                "members": sorted(m for m, state in members.items() if state == "approved"),
                "pending": sorted(m for m, state in members.items() if state == "pending")}

    async def lists(self) -> list[dict[str, Any]]:
        return [await self.get_list(n) for n in sorted(await self.redis.smembers(self._k("lists")))]

    async def join(self, name: str, username: str) -> dict[str, Any]:
        lst = await self.get_list(name)
        state = "pending" if lst["approval_required"] and username != lst["owner"] else "approved"
        await self.redis.hset(self._k("members", name), username, state)
        return {"list": name, "member": username, "state": state}

    async def leave(self, name: str, username: str) -> dict[str, Any]:
        await self.get_list(name)
        await self.redis.hdel(self._k("members", name), username)
        return {"list": name, "member": username, "state": "left"}

    async def approve(self, name: str, owner: str, member: str) -> dict[str, Any]:
        lst = await self.get_list(name)
        if lst["owner"] != owner:
            raise Forbidden("not_list_owner", "only the list's owner approves members")
        if not await self.redis.hexists(self._k("members", name), member):
            raise NotFound("unknown_member", f"{member!r} has not asked to join")
        await self.redis.hset(self._k("members", name), member, "approved")
        return {"list": name, "member": member, "state": "approved"}

    # questions -------------------------------------------------------------------------------------
    escrow = staticmethod(question_escrow)

    async def prepare_question(self, qid: str, asker: str, *, kind: str, target: str, text: str, price_each: int,
                               shares: int, hours: int, recipients: list[str], form: list | None) -> None:
        """Record a question before its payment is captured: unpublished (nobody sees or answers it) but
        with its deadline in the sweeper's set, so whatever fails later its escrow is refunded at the latest
        then (before the capture, a failure here voids the hold: nothing charged)."""
        now = int(time.time() * 1000)
        deadline = now + hours * 3600 * 1000
        record = {"id": qid, "asker": asker, "kind": kind, "target": target, "text": text,
                  "price_each": price_each, "shares": shares, "created": now, "deadline": deadline,
                  "form": json.dumps(form) if form else "", "unpublished": 1}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("q", qid), mapping=record)
            pipe.sadd(self._k("recipients", qid), *recipients)
            pipe.zadd(self._k("open"), {qid: deadline})
            pipe.zadd(self._k("asked", asker), {qid: now})
            await pipe.execute()

    async def publish_question(self, qid: str, asker: str) -> dict[str, Any]:
        """Deliver a prepared question once its escrow is funded (inboxes, then webhooks). A failure here
        raises 503 `question_not_delivered`: an ApiError, so the paywall refunds the capture (the question
        was never visible, so nobody could have been paid from its escrow); the deadline sweeper closes it."""
        try:
            q = await self._q(qid)
            recipients = await self.redis.smembers(self._k("recipients", qid))
            deadline = int(q["deadline"])
            async with self.redis.pipeline(transaction=True) as pipe:
                for r in recipients:
                    pipe.zadd(self._k("inbox", r), {qid: deadline})
                await pipe.execute()
            # last, and alone: published only if every inbox has it (an inbox entry of an unpublished
            # question is skipped by `inbox`)
            await self.redis.hdel(self._k("q", qid), "unpublished")
        except RedisError as exc:
            log.error("question_not_delivered", question=qid, error=str(exc))
            raise ServiceUnavailable("question_not_delivered", "the question could not be delivered; its price "
                                     "goes back to you (you were not charged)", headers={"Retry-After": "1"}) from None
        for r in sorted(recipients):
            tasks.spawn(self._notify(r, {"event": "question", "id": qid, "kind": q["kind"], "text": q["text"],
                                         "price": int(q["price_each"]), "deadline": deadline / 1000}), f"webhook:{qid}")
        return await self.question(qid, asker)

    async def _q(self, qid: str) -> dict[str, Any]:
        raw = await self.redis.hgetall(self._k("q", qid))
        if not raw:
            raise NotFound("unknown_question", "no question with this id")
        return raw

    async def question(self, qid: str, viewer: str) -> dict[str, Any]:
        """The question as the asker or one of its recipients sees it: replies and money state."""
        q = await self._q(qid)
        recipients = await self.redis.smembers(self._k("recipients", qid))
        if q.get("unpublished") or (viewer != q["asker"] and viewer not in recipients):
            raise NotFound("unknown_question", "no question with this id")  # undelivered: as if never asked
        replies = [json.loads(v) for k, v in q.items() if k.startswith("reply:")]
        replies.sort(key=lambda r: r["at"])
        balance = await self.ledger.balance(self.escrow(qid))
        status = q.get("closed") or ("answered" if q["kind"] != "list" and replies else "open")
        if status == "open" and int(q["deadline"]) < time.time() * 1000:
            status = "expiring"
        return {
            "id": qid, "kind": q["kind"], "to": q["target"], "asker": q["asker"], "text": q["text"],
            "form": json.loads(q["form"]) if q.get("form") else None, "status": status,
            "deadline": int(q["deadline"]) / 1000, "created": int(q["created"]) / 1000,
            "replies": replies if viewer == q["asker"] else [r for r in replies if r["by"] == viewer],
            "money": {"price_each": int(q["price_each"]), "shares": int(q["shares"]), "paid": len(replies),
                      # held = settled plus the payment being captured as this very response is sent
                      "escrow": balance.posted + balance.pending_credits if balance else 0,
                      "refund": q.get("refund") or None},
        }

    async def inbox(self, username: str) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        ids = await self.redis.zrangebyscore(self._k("inbox", username), now, "+inf")
        out = []
        for qid in ids:
            try:
                view = await self.question(qid, username)
            except NotFound:  # not delivered (its publishing failed): its escrow was refunded
                continue
            if view["status"] == "open" and not view["replies"]:
                out.append(view)
        return out

    async def reply(self, qid: str, username: str, text: str, answers: dict[str, Any] | None) -> dict[str, Any]:
        """Pay one share to the replier (or their charity) and store the reply, in one ledger script."""
        q = await self._q(qid)
        if q.get("unpublished") or not await self.redis.sismember(self._k("recipients", qid), username):
            raise NotFound("unknown_question", "no question with this id for you")  # undelivered: never answered
        if f"reply:{username}" in q:
            raise Conflict("already_replied", "you replied to this question already (and were paid once)")
        if q.get("closed") or int(q["deadline"]) < time.time() * 1000:
            raise Conflict("question_closed", "the question is closed or past its deadline; its money went back")
        form = json.loads(q["form"]) if q.get("form") else None
        if form:
            answers = validate_answers(form, answers or {})
        credit = await self.payouts.earnings_account(username)
        now = int(time.time() * 1000)
        record = {"by": username, "text": text, "answers": answers, "at": now / 1000,
                  "paid": int(q["price_each"]), "paid_to": credit}
        pay_id = f"xp:{qid}:pay:{username}"
        try:
            result = await self.ledger.post(
                pay_id, self.escrow(qid), credit, int(q["price_each"]),
                guard=Guard(self._k("q", qid), forbid="closed", claim=f"reply:{username}", value=json.dumps(record)),
                reason=f"reply to question {qid}")
        except RedisError:  # the script may still run: go on only if the ledger says this reply was paid
            state = await self.ledger.state_after_doubt(pay_id)
            if state == "absent":
                raise ServiceUnavailable("ledger_unavailable", "the ledger did not answer; the reply was not "
                                         "stored or paid; retry", headers={"Retry-After": "1"}) from None
            if state != "posted":
                raise ServiceUnavailable("reply_outcome_unknown", "the ledger did not confirm the reply; retry the "
                                         "same reply: it is stored and paid at most once (409 already_replied "
                                         "means it was)", headers={"Retry-After": "1"}) from None
            result = Result(Outcome.APPLIED)
        if result.outcome in (Outcome.CLAIMED, Outcome.REPLAYED):
            raise Conflict("already_replied", "you replied to this question already (and were paid once)")
        if result.outcome is Outcome.GUARDED:
            raise Conflict("question_closed", "the question closed before your reply; its money went back")
        if result.outcome in (Outcome.INSUFFICIENT, Outcome.NO_DEBIT_ACCOUNT):
            raise Conflict("no_paid_shares_left", "every paid response to this question has been given")
        if not result.ok:
            raise Conflict(result.outcome.value, "the reply could not be paid")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self._k("profile", username), "answered", 1)
            pipe.lpush(self._k("replytimes", username), (now - int(q["created"])) // 1000)
            pipe.ltrim(self._k("replytimes", username), 0, 199)
            pipe.zrem(self._k("inbox", username), qid)
            if q["kind"] != "list":
                pipe.zrem(self._k("open"), qid)
            await pipe.execute()
        if q["kind"] != "list":
            await self.redis.hsetnx(self._k("q", qid), "closed", "answered")
        tasks.spawn(self._notify(q["asker"], {"event": "reply", "id": qid, "by": username}), f"webhook:{qid}")
        return record

    async def close(self, qid: str, reason: str, asker: str | None = None) -> dict[str, Any]:
        """Return what was never earned to the asker and close (withdrawal or deadline). Idempotent."""
        q = await self._q(qid)
        if asker is not None:
            if q["asker"] != asker or q.get("unpublished"):
                raise NotFound("unknown_question", "no question with this id")
            if q["kind"] != "list" and any(k.startswith("reply:") for k in q):
                raise Conflict("already_answered", "a reply exists; the question can no longer be withdrawn")
        result = await self.ledger.post(
            f"xp:{qid}:refund", self.escrow(qid), user_account(q["asker"]), ALL,
            guard=Guard(self._k("q", qid), claim="closed", value=reason), reason=f"question {qid} {reason}")
        if result.outcome is Outcome.APPLIED:
            metrics.SATS.labels("refunded").inc(int(result.transfer.get("amount") or 0))
            await self.redis.hset(self._k("q", qid), "refund", f"xp:{qid}:refund")
            if (reason == "expired" and q["kind"] != "list" and not q.get("unpublished")
                    and not any(k.startswith("reply:") for k in q)):
                await self.redis.hincrby(self._k("profile", q["target"]), "expired", 1)
        elif result.outcome in (Outcome.NOTHING, Outcome.NO_DEBIT_ACCOUNT):
            await self.redis.hsetnx(self._k("q", qid), "closed", "answered" if any(
                k.startswith("reply:") for k in q) else reason)
        await self.redis.zrem(self._k("open"), qid)
        if q.get("unpublished"):  # never delivered (the sweeper closes it): nobody sees it
            return {"id": qid, "status": "closed"}
        return await self.question(qid, q["asker"])

    async def expire_questions(self) -> int:
        """Close every question past its deadline (the sweeper in every server process runs this)."""
        due = await self.redis.zrangebyscore(self._k("open"), 0, int(time.time() * 1000))
        for qid in due:
            await self.close(qid, "expired")
        return len(due)

    async def responses(self, qid: str, asker: str, fmt: str) -> tuple[str, str]:
        """All replies of a (survey) question for its asker, as CSV or JSON."""
        view = await self.question(qid, asker)
        if view["asker"] != asker:
            raise NotFound("unknown_question", "no question with this id")
        if fmt == "json":
            return json.dumps(view["replies"]), "application/json"
        fields = [f["id"] for f in view["form"] or []]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["by", "at", *fields, "text"])
        for r in view["replies"]:
            w.writerow([csv_cell(v) for v in (r["by"], r["at"], *[(r.get("answers") or {}).get(f, "") for f in fields],
                                             r["text"])])
        return buf.getvalue(), "text/csv"

    # notifications ---------------------------------------------------------------------------------
    async def _notify(self, username: str, payload: dict[str, Any]) -> None:
        """The user's webhook, if they set one, signed under their profile's secret."""
        profile = await self.redis.hgetall(self._k("profile", username))
        if profile.get("webhook"):
            await webhooks.deliver(profile["webhook"], profile["webhook_secret"], payload, pol=self.webhook_policy)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A spreadsheet runs a cell that starts with = + - @ tab or CR as a formula: such text gets a leading
    single quote (OWASP CSV injection); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def validate_answers(form: list[dict[str, Any]], answers: dict[str, Any]) -> dict[str, Any]:
    """Survey replies must answer every field with a value of its type (choice among options, number, text)."""
    errors: dict[str, list[str]] = {}
    out: dict[str, Any] = {}
    for f in form:
        value = answers.get(f["id"])
        if value is None:
            errors[f["id"]] = ["required"]
        elif f["type"] == "choice" and value not in f.get("options", []):
            errors[f["id"]] = [f"must be one of {f.get('options', [])}"]
        elif f["type"] == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not math.isfinite(value) or abs(value) > 2 ** 53):
            errors[f["id"]] = ["must be a finite number of magnitude at most 2^53"]
        elif f["type"] == "text" and (not isinstance(value, str) or len(value) > 2000):
            errors[f["id"]] = ["must be text of at most 2000 characters"]
        else:
            out[f["id"]] = value
    unknown = set(answers) - {f["id"] for f in form}
    if unknown:
        errors.update({k: ["not a field of this survey"] for k in unknown})
    if errors:
        raise Unprocessable("validation_error", {"answers": errors})
    return out

