"""Crowd QA: contributors register runners with labels, claim jobs that ask for those labels under a
lease, run them on their own infrastructure and are paid per accepted result from the job's escrow.

Money: posting a job moves reward × results_wanted from the buyer into the job's own escrow account
(`escrow:job:<id>`, which can never go below zero), so no job can pay out more than it was funded
with; accepting a result *is* its payment: one ledger transfer (id derived from the result, so paid at
most once) that claims the result's `accepted_at` field in the same script (a Guard that a rejection
forbids), so no result is ever accepted but unpaid, nor paid but rejected. The job's counters follow in
an idempotent script. What is never earned goes back to the buyer, in one all-of-it transfer, when the job
closes or expires: a payment either lands before it or finds the escrow empty.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import redis.asyncio as aioredis

from .. import metrics
from ..errors import Conflict, NotFound, PaymentRequired
from ..ledger import ALL, AccountKind, Guard, Ledger, Outcome, user_account

__all__ = ["Crowd"]

_CLAIM = """
-- KEYS: job, leases (runner -> deadline ms), claimed-by set. ARGV: runner, now_ms, lease_ms
local j = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'wanted', 'accepted', 'pending')
if j[1] ~= 'open' or tonumber(j[2]) <= tonumber(ARGV[2]) then return 'closed' end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then return 'seen' end
local active = 0
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if tonumber(leases[i + 1]) < tonumber(ARGV[2]) then redis.call('HDEL', KEYS[2], leases[i])
  else active = active + 1 end
end
-- a slot is taken by a live lease, an accepted result, or a result awaiting the buyer's decision
if active + tonumber(j[4]) + tonumber(j[5] or 0) >= tonumber(j[3]) then return 'full' end
redis.call('HSET', KEYS[2], ARGV[1], tonumber(ARGV[2]) + tonumber(ARGV[3]))
redis.call('SADD', KEYS[3], ARGV[1])
return 'ok'
"""

_SUBMIT = """
-- KEYS: leases, result hash, results list, job. ARGV: runner, now_ms, result id, fields json
local deadline = redis.call('HGET', KEYS[1], ARGV[1])
if not deadline then return 'no_lease' end
if tonumber(deadline) < tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], ARGV[1]); return 'lease_expired' end
redis.call('HDEL', KEYS[1], ARGV[1])
local f = cjson.decode(ARGV[4])
for k, v in pairs(f) do redis.call('HSET', KEYS[2], k, v) end
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('HINCRBY', KEYS[4], 'pending', 1)
return 'ok'
"""

_MARK = """
-- KEYS: result, job. ARGV: accepted|rejected, now_ms. Brings the result's state and the job's counters in
-- line with what the ledger decided: 'accepted' once the payment claimed `accepted_at` (idempotent);
-- 'rejected' only while no payment claimed it (the payment's guard forbids `rejected_at` from then on).
local r = redis.call('HMGET', KEYS[1], 'state', 'accepted_at', 'rejected_at')
local undecided = r[1] == 'submitted' or r[1] == 'provisional'
if ARGV[1] == 'accepted' then
  if not r[2] then return 0 end
  if not undecided then return 0 end
  redis.call('HINCRBY', KEYS[2], 'accepted', 1)
else
  if r[2] then return -2 end
  if not undecided then return 0 end
  redis.call('HSET', KEYS[1], 'rejected_at', ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'pending', -1)
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""


def _public(result: dict[str, str]) -> dict[str, Any]:
    """A result as the buyer sees it: a paid result is accepted, whatever the counters script got to."""
    out = {k: v for k, v in result.items() if k != "junit"}
    if out.get("accepted_at"):
        out["state"] = "accepted"
    return out


def _labels_match(wanted: dict[str, str], offered: dict[str, str]) -> bool:
    return all(offered.get(k) == v for k, v in wanted.items())


class Crowd:
    """Owns every `{prefix}:crowd:*` key; money moves only through the ledger."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, lease_seconds: int = 600) -> None:
        self.redis, self.ledger, self.lease_seconds = redis, ledger, lease_seconds
        self.tag = "{" + prefix + "}"
        self._claim = redis.register_script(_CLAIM)
        self._submit = redis.register_script(_SUBMIT)
        self._mark = redis.register_script(_MARK)

    def _k(self, *parts: str) -> str:
        return ":".join([self.tag, "crowd", *parts])

    async def open_jobs(self) -> int:
        return int(await self.redis.zcard(self._k("open")))

    @staticmethod
    def escrow(job_id: str) -> str:
        return f"escrow:job:{job_id}"

    # runners ---------------------------------------------------------------------------------------
    async def register_runner(self, owner: str, labels: dict[str, str]) -> dict[str, Any]:
        runner_id = f"rn_{secrets.token_hex(8)}"
        record = {"id": runner_id, "owner": owner, "labels": json.dumps(labels), "created": int(time.time())}
        await self.redis.hset(self._k("runner", runner_id), mapping=record)
        return {**record, "labels": labels}

    async def runner(self, runner_id: str, owner: str) -> dict[str, Any]:
        r = await self.redis.hgetall(self._k("runner", runner_id))
        if not r or r["owner"] != owner:
            raise NotFound("unknown_runner", "no runner with this id on your account")
        return {**r, "labels": json.loads(r["labels"])}

    # jobs ------------------------------------------------------------------------------------------
    async def post_job(self, buyer: str, *, title: str, instructions: str, manifests: str | None,
                       labels: dict[str, str], reward: int, wanted: int, expires_in: int,
                       auto_accept: bool) -> dict[str, Any]:
        """Fund the job's escrow from the buyer (402 insufficient_funds if short), then publish it."""
        job_id = f"job_{secrets.token_hex(8)}"
        await self.ledger.open_account(self.escrow(job_id), AccountKind.ESCROW)
        funded = await self.ledger.post(f"crowd:{job_id}:fund", user_account(buyer), self.escrow(job_id),
                                        reward * wanted, reason=f"escrow for crowd job {job_id}")
        if funded.outcome is Outcome.INSUFFICIENT:
            raise PaymentRequired("insufficient_funds", f"the job needs {reward * wanted} sat in escrow")
        if not funded.ok:
            raise Conflict(funded.outcome.value, "the escrow could not be funded")
        now = int(time.time() * 1000)
        record = {"id": job_id, "buyer": buyer, "title": title, "instructions": instructions,
                  "manifests": manifests or "", "labels": json.dumps(labels), "reward": reward, "wanted": wanted,
                  "accepted": 0, "pending": 0, "status": "open", "created": now, "expires_at": now + expires_in * 1000,
                  "auto_accept": int(auto_accept), "refund": ""}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("job", job_id), mapping=record)
            pipe.zadd(self._k("open"), {job_id: record["expires_at"]})
            await pipe.execute()
        return await self.job(job_id, buyer)

    async def _job(self, job_id: str) -> dict[str, Any] | None:
        j = await self.redis.hgetall(self._k("job", job_id))
        if not j:
            return None
        out: dict[str, Any] = dict(j)
        for key in ("reward", "wanted", "accepted", "pending", "created", "expires_at", "auto_accept"):
            out[key] = int(out[key])
        out["labels"] = json.loads(out["labels"])
        return out

    async def job(self, job_id: str, buyer: str) -> dict[str, Any]:
        """The job as its buyer sees it, with results and what the escrow still holds."""
        j = await self._job(job_id)
        if j is None or j["buyer"] != buyer:
            raise NotFound("unknown_job", "no job with this id for this account")
        balance = await self.ledger.balance(self.escrow(job_id))
        results = [await self.redis.hgetall(self._k("result", job_id, rid))
                   for rid in await self.redis.lrange(self._k("results", job_id), 0, -1)]
        return {**{k: v for k, v in j.items() if k != "manifests"}, "escrow": balance.posted if balance else 0,
                "leases": len(await self.redis.hkeys(self._k("leases", job_id))),
                "results": [_public(r) for r in results]}

    async def claim(self, owner: str, runner_id: str, wait: float) -> dict[str, Any] | None:
        """Long-poll for an open job whose labels the runner has; a lease of `lease_seconds` on success."""
        runner = await self.runner(runner_id, owner)
        deadline = time.monotonic() + wait
        while True:
            now = int(time.time() * 1000)
            for job_id in await self.redis.zrangebyscore(self._k("open"), now, "+inf"):
                j = await self._job(job_id)
                if not j or j["buyer"] == owner or not _labels_match(j["labels"], runner["labels"]):
                    continue
                got = await self._claim(keys=[self._k("job", job_id), self._k("leases", job_id),
                                              self._k("claimed", job_id)],
                                        args=[runner_id, now, self.lease_seconds * 1000])
                if got == "ok":
                    return {"job": job_id, "title": j["title"], "instructions": j["instructions"],
                            "manifests": j["manifests"], "labels": j["labels"], "reward": j["reward"],
                            "lease_expires_at": (now + self.lease_seconds * 1000) / 1000}
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def submit(self, owner: str, job_id: str, runner_id: str, status: str, junit: str, log: str) -> dict[str, Any]:
        """Only a runner holding an unexpired lease on the job may submit, and only once."""
        await self.runner(runner_id, owner)
        result_id = f"res_{secrets.token_hex(8)}"
        fields = {"id": result_id, "job": job_id, "runner": runner_id, "owner": owner, "status": status,
                  "junit": junit, "log": log, "state": "submitted", "created": int(time.time() * 1000)}
        got = await self._submit(keys=[self._k("leases", job_id), self._k("result", job_id, result_id),
                                       self._k("results", job_id), self._k("job", job_id)],
                                 args=[runner_id, int(time.time() * 1000), result_id, json.dumps(fields)])
        if got != "ok":
            raise Conflict(got, "submit a result only for a job your runner holds an unexpired lease on, once")
        j = await self._job(job_id)
        if j and j["auto_accept"]:
            await self._auto_accept(j, result_id, status, owner)
        return {"id": result_id, "job": job_id, "state": (await self.redis.hget(self._k("result", job_id, result_id), "state"))}

    async def _auto_accept(self, j: dict[str, Any], result_id: str, status: str, owner: str) -> None:
        """Two independent runners (different accounts) reporting the same outcome accept each other."""
        for rid in await self.redis.lrange(self._k("results", j["id"]), 0, -1):
            other = await self.redis.hgetall(self._k("result", j["id"], rid))
            independent = other.get("owner") != owner and other.get("status") == status
            if rid != result_id and independent and other.get("state") in ("submitted", "accepted"):
                for r in (rid, result_id):
                    await self._settle(j, r, "accepted")
                return

    async def decide(self, buyer: str, job_id: str, result_id: str, state: str) -> dict[str, Any]:
        j = await self._job(job_id)
        if j is None or j["buyer"] != buyer:
            raise NotFound("unknown_job", "no job with this id for this account")
        if not await self.redis.exists(self._k("result", job_id, result_id)):
            raise NotFound("unknown_result", "no result with this id on this job")
        changed = await self._settle(j, result_id, state)
        if changed == -1:
            raise Conflict("job_full_or_closed", "the job has all the results it pays for, or is closed")
        if changed == -2:
            raise Conflict("already_accepted", "this result was accepted and paid; it can no longer be rejected")
        return _public(await self.redis.hgetall(self._k("result", job_id, result_id)))

    def _pay_id(self, job_id: str, result_id: str) -> str:
        return f"crowd:{job_id}:pay:{result_id}"

    async def _settle(self, j: dict[str, Any], result_id: str, state: str) -> int:
        """Accept = pay: one transfer from the job's escrow that claims the result's `accepted_at` (and is
        refused once it was rejected). Reject = a script refused once that claim exists. Returns 1 when
        the state changed, 0 when it already was so, -1 when the job cannot pay, -2 rejecting a paid one."""
        key = self._k("result", j["id"], result_id)
        if state == "accepted":
            if j["status"] != "open" and not await self.redis.hexists(key, "accepted_at"):
                return -1
            owner = await self.redis.hget(key, "owner")
            paid = await self.ledger.post(
                self._pay_id(j["id"], result_id), self.escrow(j["id"]), user_account(owner), j["reward"],
                guard=Guard(key, forbid="rejected_at", claim="accepted_at", value=str(int(time.time() * 1000))),
                reason=f"accepted result {result_id}")
            if paid.outcome in (Outcome.INSUFFICIENT, Outcome.NOTHING):
                return -1
            if paid.outcome is Outcome.GUARDED:
                return 0  # rejected before: stays rejected
            if paid.outcome not in (Outcome.APPLIED, Outcome.REPLAYED, Outcome.CLAIMED):
                raise Conflict(paid.outcome.value, "the reward could not be paid")
            await self.redis.hset(key, "payment", self._pay_id(j["id"], result_id))
        return int(await self._mark(keys=[key, self._k("job", j["id"])], args=[state, int(time.time() * 1000)]))

    async def close(self, job_id: str, buyer: str | None = None, reason: str = "closed") -> dict[str, Any]:
        """Close the job and return what was never earned to the buyer (idempotent): the whole available
        escrow in one transfer, so an acceptance racing the close is either paid before it or refused."""
        j = await self._job(job_id)
        if j is None or (buyer is not None and j["buyer"] != buyer):
            raise NotFound("unknown_job", "no job with this id for this account")
        await self.redis.hset(self._k("job", job_id), "status", reason)
        await self.redis.zrem(self._k("open"), job_id)
        for rid in await self.redis.lrange(self._k("results", job_id), 0, -1):  # counters of paid results
            await self._mark(keys=[self._k("result", job_id, rid), self._k("job", job_id)],
                             args=["accepted", int(time.time() * 1000)])
        refund_id = f"crowd:{job_id}:refund:{int(time.time() * 1000)}"
        res = await self.ledger.post(refund_id, self.escrow(job_id), user_account(j["buyer"]), ALL,
                                     reason=f"crowd job {job_id} {reason}: unearned rewards")
        if res.outcome is Outcome.APPLIED:
            metrics.SATS.labels("refunded").inc(int(res.transfer.get("amount", 0)))
            await self.redis.hset(self._k("job", job_id), "refund", refund_id)
        return await self.job(job_id, j["buyer"])

    async def expire_jobs(self) -> int:
        """Close every open job past its expiry (run by the sweeper in every server process)."""
        expired = await self.redis.zrangebyscore(self._k("open"), 0, int(time.time() * 1000))
        for job_id in expired:
            await self.close(job_id, reason="expired")
        return len(expired)
