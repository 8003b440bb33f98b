"""Crowd QA: contributors register runners with labels, claim jobs that ask for those labels under a
lease, run them on their own infrastructure and are paid per accepted result from the job's escrow.

Money: posting a job moves reward × results_wanted from the buyer into the job's own escrow account
(`escrow:job:<id>`, which can never go below zero), so no job can pay out more than it was funded
with; each accepted result is one transfer with an id derived from the result (paid at most once);
what is never earned goes back to the buyer when the job closes or expires.
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
from ..ledger import AccountKind, Ledger, Outcome, user_account

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

_DECIDE = """
-- KEYS: result, job. ARGV: new state (accepted|rejected). Only a submitted result changes, once.
if redis.call('HGET', KEYS[1], 'state') ~= 'submitted' then return 0 end
if ARGV[1] == 'accepted' then
  local j = redis.call('HMGET', KEYS[2], 'status', 'wanted', 'accepted')
  if j[1] ~= 'open' or tonumber(j[3]) >= tonumber(j[2]) then return -1 end
  redis.call('HINCRBY', KEYS[2], 'accepted', 1)
end
redis.call('HINCRBY', KEYS[2], 'pending', -1)
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""


def _labels_match(wanted: dict[str, str], offered: dict[str, str]) -> bool:
    return all(offered.get(k) == v for k, v in wanted.items())


class Crowd:
    """Owns every `{prefix}:crowd:*` key; money moves only through the ledger."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, lease_seconds: int = 600) -> None:
        self.redis, self.ledger, self.lease_seconds = redis, ledger, lease_seconds
        self.tag = "{" + prefix + "}"
        self._claim = redis.register_script(_CLAIM)
        self._submit = redis.register_script(_SUBMIT)
        self._decide = redis.register_script(_DECIDE)

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
                "results": [{k: v for k, v in r.items() if k != "junit"} for r in results]}

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
        result = await self.redis.hgetall(self._k("result", job_id, result_id))
        return {k: v for k, v in result.items() if k != "junit"}

    async def _settle(self, j: dict[str, Any], result_id: str, state: str) -> int:
        """Mark once; an accepted result is paid one reward from the job's escrow (id per result: once)."""
        changed = await self._decide(keys=[self._k("result", j["id"], result_id), self._k("job", j["id"])], args=[state])
        if changed == 1 and state == "accepted":
            owner = await self.redis.hget(self._k("result", j["id"], result_id), "owner")
            paid = await self.ledger.post(f"crowd:{j['id']}:pay:{result_id}", self.escrow(j["id"]),
                                          user_account(owner), j["reward"], reason=f"accepted result {result_id}")
            await self.redis.hset(self._k("result", j["id"], result_id), "payment",
                                  f"crowd:{j['id']}:pay:{result_id}" if paid.outcome in (Outcome.APPLIED, Outcome.REPLAYED) else "")
        return changed

    async def close(self, job_id: str, buyer: str | None = None, reason: str = "closed") -> dict[str, Any]:
        """Close the job and return what was never earned to the buyer (idempotent)."""
        j = await self._job(job_id)
        if j is None or (buyer is not None and j["buyer"] != buyer):
            raise NotFound("unknown_job", "no job with this id for this account")
        await self.redis.hset(self._k("job", job_id), "status", reason)
        await self.redis.zrem(self._k("open"), job_id)
        for attempt in range(3):  # a payout decided just before the close may still land: re-read and retry
            balance = await self.ledger.balance(self.escrow(job_id))
            if not balance or balance.posted <= 0:
                break
            res = await self.ledger.post(f"crowd:{job_id}:refund:{attempt}", self.escrow(job_id),
                                         user_account(j["buyer"]), balance.posted,
                                         reason=f"crowd job {job_id} {reason}: unearned rewards")
            if res.outcome is Outcome.APPLIED:
                metrics.SATS.labels("refunded").inc(balance.posted)
                await self.redis.hset(self._k("job", job_id), "refund", f"crowd:{job_id}:refund:{attempt}")
                break
        return await self.job(job_id, j["buyer"])

    async def expire_jobs(self) -> int:
        """Close every open job past its expiry (run by the sweeper in every server process)."""
        expired = await self.redis.zrangebyscore(self._k("open"), 0, int(time.time() * 1000))
        for job_id in expired:
            await self.close(job_id, reason="expired")
        return len(expired)
