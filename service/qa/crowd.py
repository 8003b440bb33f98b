"""Crowd QA: contributors register runners with labels, claim jobs that ask for those labels under a
lease, run them on their own infrastructure and are paid per accepted result from the job's escrow.

Money: posting a job moves reward × results_wanted from the buyer into the job's own escrow account
(`escrow:job:<id>`, which can never go below zero), so no job can pay out more than it was funded
with; accepting a result *is* its payment: one ledger transfer (id derived from the result, so paid at
most once) that claims the result's `accepted_at` field in the same script (a Guard that a rejection
forbids), so no result is ever accepted but unpaid, nor paid but rejected. The job's counters follow in
an idempotent script. What is never earned goes back to the buyer, in one all-of-it transfer, when the job
closes or expires: a payment either lands before it or finds the escrow empty.

Independence costs something (so "two different accounts agree" is not free to fake):
- one slot per account per job, whatever number of runners the account registers;
- a claim stakes CROWD_STAKE_PERCENT of the reward (at least 1 sat) from the runner's account into the
  job's stake escrow (`escrow:stake:<id>`). The stake comes back with an accepted result, or at close for
  a lease that lapsed or a result never decided; a *rejected* result forfeits it to the operator's revenue
  (never to the buyer, who would otherwise profit from rejecting honest work);
- a result carries JUnit evidence that parses and names every manifest of the job (`Kind/name`);
- two agreeing results of different accounts are accepted *provisionally* (auto_accept): their rewards
  are released only after CROWD_DISPUTE_SECONDS, during which the buyer can still reject them (their
  stakes then go to the operator). Closing a job releases its provisional results at once: a buyer disputes by rejecting.
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
from ..keys import REVENUE, Keys, job_escrow, stake_escrow, user_account
from ..ledger import ALL, AccountKind, Guard, Ledger, Outcome
from ..scripts import register
from . import manifests as k8s_manifests
from .junit import check_evidence

__all__ = ["Crowd"]


def _public(result: dict[str, str]) -> dict[str, Any]:
    """A result as the buyer sees it: a paid result is accepted, whatever the counters script got to."""
    out = {k: v for k, v in result.items() if k != "junit"}
    if out.get("accepted_at"):
        out["state"] = "accepted"
    return out


async def _manifest_names(text: str) -> list[str]:
    """`Kind/name` of every named manifest of a job (parsed off the event loop): the evidence must name them."""
    docs = await asyncio.get_running_loop().run_in_executor(
        None, lambda: k8s_manifests.parse_manifests(text, max_documents=500))
    names = [f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}" for d in docs
             if isinstance(d.get("metadata"), dict) and d["metadata"].get("name")]
    return sorted(set(names))


def _labels_match(wanted: dict[str, str], offered: dict[str, str]) -> bool:
    return all(offered.get(k) == v for k, v in wanted.items())


_STAKES_CLOSED = "closed:stakes"  # set in a job's stakes hash by close; a stake's Guard forbids it (never a username)


class Crowd:
    """Owns every `{prefix}:crowd:*` key; money moves only through the ledger."""

    def __init__(self, redis: aioredis.Redis, prefix: str, ledger: Ledger, lease_seconds: int = 600,
                 dispute_seconds: int = 86_400, stake_percent: int = 20) -> None:
        self.redis, self.ledger, self.lease_seconds = redis, ledger, lease_seconds
        self.dispute_seconds, self.stake_percent = dispute_seconds, stake_percent
        self.keys = Keys(prefix)
        self._claim = register(redis, "crowd_claim")
        self._unclaim = register(redis, "crowd_unclaim")
        self._submit = register(redis, "crowd_submit")
        self._open = register(redis, "crowd_open")
        self._mark = register(redis, "crowd_mark")

    def _k(self, *parts: str) -> str:
        return self.keys.of("crowd", *parts)

    async def open_jobs(self) -> int:
        return int(await self.redis.zcard(self._k("open")))

    escrow = staticmethod(job_escrow)
    stake_escrow = staticmethod(stake_escrow)

    def stake_for(self, reward: int) -> int:
        """What a claim stakes: CROWD_STAKE_PERCENT of the reward, at least 1 sat (0 when the setting is 0)."""
        return max(1, reward * self.stake_percent // 100) if self.stake_percent > 0 else 0

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
        """Fund the job's escrow from the buyer (402 insufficient_funds if short), then publish it. Its
        manifests must parse: results name them (`Kind/name`) as evidence."""
        balance = await self.ledger.balance(user_account(buyer))  # a cheap read first: an unfunded buyer
        if balance is None or balance.available < reward * wanted:  # costs no YAML parse (the post still checks)
            raise PaymentRequired("insufficient_funds", f"the job needs {reward * wanted} sat in escrow")
        names = await _manifest_names(manifests) if manifests else []
        job_id = f"job_{secrets.token_hex(8)}"
        now = int(time.time() * 1000)
        record = {"id": job_id, "buyer": buyer, "title": title, "instructions": instructions,
                  "manifests": manifests or "", "labels": json.dumps(labels), "reward": reward, "wanted": wanted,
                  "accepted": 0, "pending": 0, "status": "funding", "created": now,
                  "expires_at": now + expires_in * 1000, "auto_accept": int(auto_accept), "refund": "",
                  "stake": self.stake_for(reward), "names": json.dumps(names)}
        # the record first (not claimable while `funding`, its expiry in the sweeper's set), then the money:
        # whatever fails after the funding, `close` or the expiry sweeper returns the escrow to the buyer
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._k("job", job_id), mapping=record)
            pipe.zadd(self._k("open"), {job_id: record["expires_at"]})
            await pipe.execute()
        await self.ledger.open_account(self.escrow(job_id), AccountKind.ESCROW)
        await self.ledger.open_account(self.stake_escrow(job_id), AccountKind.ESCROW)
        funded = await self.ledger.post(f"crowd:{job_id}:fund", user_account(buyer), self.escrow(job_id),
                                        reward * wanted, reason=f"escrow for crowd job {job_id}")
        if not funded.ok:
            await self.close(job_id, reason="unfunded")  # nothing was moved: the record just closes
            if funded.outcome is Outcome.INSUFFICIENT:
                raise PaymentRequired("insufficient_funds", f"the job needs {reward * wanted} sat in escrow")
            raise Conflict(funded.outcome.value, "the escrow could not be funded")
        await self._open(keys=[self._k("job", job_id)])
        return await self.job(job_id, buyer)

    async def _job(self, job_id: str) -> dict[str, Any] | None:
        j = await self.redis.hgetall(self._k("job", job_id))
        if not j:
            return None
        out: dict[str, Any] = dict(j)
        for key in ("reward", "wanted", "accepted", "pending", "created", "expires_at", "auto_accept"):
            out[key] = int(out[key])
        out["stake"] = int(out.get("stake") or 0)
        out["labels"] = json.loads(out["labels"])
        out["names"] = json.loads(out.get("names") or "[]")
        return out

    async def job(self, job_id: str, buyer: str) -> dict[str, Any]:
        """The job as its buyer sees it, with results and what the escrow still holds."""
        j = await self._job(job_id)
        if j is None or j["buyer"] != buyer:
            raise NotFound("unknown_job", "no job with this id for this account")
        balance = await self.ledger.balance(self.escrow(job_id))
        results = [await self.redis.hgetall(self._k("result", job_id, rid))
                   for rid in await self.redis.lrange(self._k("results", job_id), 0, -1)]
        return {**{k: v for k, v in j.items() if k not in ("manifests", "names")},
                "escrow": balance.posted if balance else 0,
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
                                              self._k("claimed", job_id), self._k("accounts", job_id)],
                                        args=[runner_id, now, self.lease_seconds * 1000, owner])
                if got == "ok":
                    await self._take_stake(j, owner, runner_id)
                    return {"job": job_id, "title": j["title"], "instructions": j["instructions"],
                            "manifests": j["manifests"], "labels": j["labels"], "reward": j["reward"],
                            "stake": j["stake"], "lease_expires_at": (now + self.lease_seconds * 1000) / 1000}
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    async def _take_stake(self, j: dict[str, Any], owner: str, runner_id: str) -> None:
        """The claim's stake, once per account and job (its id and a Guard on the job's stakes hash);
        402 and the claim undone when the account cannot pay it."""
        if not j["stake"]:
            return
        staked = await self.ledger.post(
            f"crowd:{j['id']}:stake:{owner}", user_account(owner), self.stake_escrow(j["id"]), j["stake"],
            guard=Guard(self._k("stakes", j["id"]), forbid=_STAKES_CLOSED, claim=owner, value=runner_id),
            reason=f"stake for a claim on crowd job {j['id']}")
        if staked.outcome in (Outcome.APPLIED, Outcome.REPLAYED, Outcome.CLAIMED):
            return
        await self._unclaim(keys=[self._k("leases", j["id"]), self._k("claimed", j["id"]),
                                  self._k("accounts", j["id"])], args=[runner_id, owner])
        if staked.outcome is Outcome.GUARDED:  # close settled the stakes first: this one would be stranded
            raise Conflict("job_closed", "the job closed while you claimed it; nothing was staked")
        raise PaymentRequired("insufficient_funds", f"claiming this job stakes {j['stake']} sat from your balance "
                                                    "(returned with an accepted result, forfeited if rejected)")

    async def _settle_stake(self, j: dict[str, Any], owner: str, *, forfeit: bool) -> None:
        """Give a stake back to its runner, or to the operator's revenue for a rejected result: once (id and Guard)."""
        if not await self.redis.hexists(self._k("stakes", j["id"]), owner):
            return
        to = REVENUE if forfeit else user_account(owner)
        await self.ledger.post(
            f"crowd:{j['id']}:stake:{owner}:settle", self.stake_escrow(j["id"]), to, j["stake"],
            guard=Guard(self._k("stakes", j["id"]), claim=f"settled:{owner}", value=to),
            reason=f"stake on crowd job {j['id']} {'forfeited' if forfeit else 'returned'}")

    async def submit(self, owner: str, job_id: str, runner_id: str, status: str, junit: str, log: str) -> dict[str, Any]:
        """Only a runner holding an unexpired lease (and whose claim was staked) may submit, once, with
        JUnit evidence that names the job's manifests."""
        await self.runner(runner_id, owner)
        j = await self._job(job_id)
        if j is None:
            raise Conflict("no_lease", "submit a result only for a job your runner holds an unexpired lease on")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: check_evidence(junit, status=status, names=j["names"]))
        result_id = f"res_{secrets.token_hex(8)}"
        fields = {"id": result_id, "job": job_id, "runner": runner_id, "owner": owner, "status": status,
                  "junit": junit, "log": log, "state": "submitted", "created": int(time.time() * 1000)}
        got = await self._submit(keys=[self._k("leases", job_id), self._k("result", job_id, result_id),
                                       self._k("results", job_id), self._k("job", job_id), self._k("stakes", job_id)],
                                 args=[runner_id, int(time.time() * 1000), result_id, json.dumps(fields), owner,
                                       "1" if j["stake"] else "0"])
        if got != "ok":
            raise Conflict(got, "submit a result only for a job your runner holds an unexpired lease on, once")
        if j["auto_accept"]:
            await self._auto_accept(j, result_id, status, owner)
        return {"id": result_id, "job": job_id, "state": (await self.redis.hget(self._k("result", job_id, result_id), "state"))}

    async def _auto_accept(self, j: dict[str, Any], result_id: str, status: str, owner: str) -> None:
        """Two independent runners (different accounts) reporting the same outcome accept each other,
        provisionally: paid when the dispute window ends unless the buyer rejects first."""
        release_at = int(time.time() * 1000) + self.dispute_seconds * 1000
        for rid in await self.redis.lrange(self._k("results", j["id"]), 0, -1):
            other = await self.redis.hgetall(self._k("result", j["id"], rid))
            independent = other.get("owner") != owner and other.get("status") == status
            if rid != result_id and independent and other.get("state") in ("submitted", "provisional", "accepted"):
                for r in (rid, result_id):
                    await self._mark(keys=[self._k("result", j["id"], r), self._k("job", j["id"]), self._k("release")],
                                     args=["provisional", release_at, f"{j['id']}|{r}"])
                if self.dispute_seconds <= 0:
                    await self.release_due()
                return

    async def release_due(self, limit: int = 200) -> int:
        """Pay every provisional result whose dispute window has ended (run by the sweeper; idempotent)."""
        due = await self.redis.zrangebyscore(self._k("release"), 0, int(time.time() * 1000), start=0, num=limit)
        released = 0
        for member in due:
            job_id, result_id = member.split("|", 1)
            j = await self._job(job_id)
            if j is not None and await self._settle(j, result_id, "accepted", release=True) == 1:
                released += 1
            await self.redis.zrem(self._k("release"), member)
        return released

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

    async def _settle(self, j: dict[str, Any], result_id: str, state: str, *, release: bool = False) -> int:
        """Accept = pay: one transfer from the job's escrow that claims the result's `accepted_at` (and is
        refused once it was rejected). Reject = a script refused once that claim exists. Returns 1 when
        the state changed, 0 when it already was so, -1 when the job cannot pay, -2 rejecting a paid one."""
        key = self._k("result", j["id"], result_id)
        owner = await self.redis.hget(key, "owner")
        if state == "accepted":
            if j["status"] != "open" and not release and not await self.redis.hexists(key, "accepted_at"):
                return -1
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
        changed = int(await self._mark(keys=[key, self._k("job", j["id"])], args=[state, int(time.time() * 1000)]))
        if changed >= 0 and (state == "accepted" or await self.redis.hexists(key, "rejected_at")):
            await self._settle_stake(j, owner, forfeit=state == "rejected")
        return changed

    async def close(self, job_id: str, buyer: str | None = None, reason: str = "closed") -> dict[str, Any]:
        """Close the job and return what was never earned to the buyer (idempotent): the whole available
        escrow in one transfer, so an acceptance racing the close is either paid before it or refused."""
        j = await self._job(job_id)
        if j is None or (buyer is not None and j["buyer"] != buyer):
            raise NotFound("unknown_job", "no job with this id for this account")
        await self.redis.hset(self._k("job", job_id), "status", reason)
        await self.redis.zrem(self._k("open"), job_id)
        owners: dict[str, bool] = {}
        for rid in await self.redis.lrange(self._k("results", job_id), 0, -1):
            result = await self.redis.hgetall(self._k("result", job_id, rid))
            if result.get("state") == "provisional":  # closing waives the dispute window: release now
                await self._settle(j, rid, "accepted", release=True)
            await self._mark(keys=[self._k("result", job_id, rid), self._k("job", job_id)],  # counters of paid ones
                             args=["accepted", int(time.time() * 1000)])
            owners[result["owner"]] = bool(result.get("rejected_at"))
        await self.redis.hset(self._k("stakes", job_id), _STAKES_CLOSED, 1)  # no stake lands after this
        for owner in await self.redis.hkeys(self._k("stakes", job_id)):
            if not owner.startswith(("settled:", _STAKES_CLOSED)):
                await self._settle_stake(j, owner, forfeit=owners.get(owner, False))
        refund_id = f"crowd:{job_id}:refund:{int(time.time() * 1000)}"
        res = await self.ledger.post(refund_id, self.escrow(job_id), user_account(j["buyer"]), ALL,
                                     reason=f"crowd job {job_id} {reason}: unearned rewards")
        if res.outcome is Outcome.APPLIED:
            metrics.SATS.labels("refunded").inc(int(res.transfer.get("amount", 0)))
            await self.redis.hset(self._k("job", job_id), "refund", refund_id)
        return await self.job(job_id, j["buyer"])

    async def expire_jobs(self) -> int:
        """Close every open job past its expiry (after the dispute windows of its provisional results),
        and release auto-accepted rewards whose window ended (run by the sweeper in every server process)."""
        await self.release_due()
        now = int(time.time() * 1000)
        closed = 0
        for job_id in await self.redis.zrangebyscore(self._k("open"), 0, now):
            windows = [int(at or 0) for state, at in [
                await self.redis.hmget(self._k("result", job_id, rid), "state", "release_at")
                for rid in await self.redis.lrange(self._k("results", job_id), 0, -1)] if state == "provisional"]
            if max(windows, default=0) > now:  # the buyer keeps the whole dispute window: close after it
                await self.redis.zadd(self._k("open"), {job_id: max(windows)})
                continue
            await self.close(job_id, reason="expired")
            closed += 1
        return closed
