"""Paid QA runs: stored and queued in Redis (a Stream with a consumer group), executed by workers.

A worker that dies mid-run leaves its entry pending in the group; another worker claims it after
QA_LEASE seconds (XAUTOCLAIM), so no paid run is lost. Finishing a run is one Lua script that only the
first finisher wins. A run that fails for infrastructure reasons (the suite raised, or the entry was
delivered QA_MAX_ATTEMPTS times) refunds the payer with a compensating transfer whose id is derived
from the payment, so the refund happens exactly once.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from .. import metrics, tasks, webhooks
from ..errors import NotFound
from ..ledger import REVENUE, Ledger, user_account
from . import manifests, suites
from .junit import to_junit

__all__ = ["RunStore", "Worker", "DONE", "GROUP"]

log = structlog.get_logger("qa")
GROUP = "qa-workers"
DONE = ("passed", "failed", "error")

_FINISH = """
-- KEYS: run hash, owner's active counter. ARGV: status, finished_ms, summary json, error, refund id
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'passed' or status == 'failed' or status == 'error' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2], 'summary', ARGV[3], 'error', ARGV[4],
  'refund', ARGV[5])
if tonumber(redis.call('DECR', KEYS[2])) < 0 then redis.call('SET', KEYS[2], 0) end
return 1
"""


@dataclass(frozen=True)
class Limits:
    max_active_per_account: int = 20
    lease_seconds: int = 30
    max_attempts: int = 3
    run_timeout: float = 120.0


class RunStore:
    """Owns every `{prefix}:qa:*` key: runs, their manifests and results, the queue."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.tag = "{" + prefix + "}"
        self._finish = redis.register_script(_FINISH)

    def _run(self, run_id: str) -> str:
        return f"{self.tag}:qa:run:{run_id}"

    def _body(self, run_id: str) -> str:
        return f"{self.tag}:qa:body:{run_id}"

    def _result(self, run_id: str) -> str:
        return f"{self.tag}:qa:result:{run_id}"

    def _active(self, owner: str) -> str:
        return f"{self.tag}:qa:active:{owner}"

    @property
    def queue(self) -> str:
        return f"{self.tag}:qa:queue"

    async def active(self, owner: str) -> int:
        return int(await self.redis.get(self._active(owner)) or 0)

    async def depth(self) -> int:
        """Runs queued and not yet finished: undelivered entries plus those a worker holds unacknowledged."""
        try:
            groups = await self.redis.xinfo_groups(self.queue)
        except ResponseError:  # no queue yet
            return 0
        group = next((g for g in groups if g.get("name") == GROUP), None)
        if group is None:
            return int(await self.redis.xlen(self.queue))
        return int(group.get("lag") or 0) + int(group.get("pending") or 0)

    async def submit(self, *, owner: str, suite: str, k8s: str, strict: bool, body: str, documents: int,
                     price: int, receipt: str, webhook: str | None) -> dict[str, Any]:
        """Store and enqueue a run in one MULTI/EXEC (a run is never stored without being queued)."""
        run_id = f"run_{secrets.token_hex(10)}"
        now = int(time.time() * 1000)
        record = {"id": run_id, "owner": owner, "suite": suite, "kubernetes_version": k8s, "strict": int(strict),
                  "status": "queued", "created": now, "documents": documents, "price": price,
                  "receipt": receipt, "webhook": webhook or "", "attempts": 0,
                  "webhook_secret": secrets.token_hex(16) if webhook else ""}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._run(run_id), mapping=record)
            pipe.set(self._body(run_id), body, ex=7 * 86400)
            pipe.incr(self._active(owner))
            pipe.xadd(self.queue, {"run": run_id})
            await pipe.execute()
        return await self.get(run_id)  # type: ignore[return-value]

    async def get(self, run_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(self._run(run_id))
        if not raw:
            return None
        r: dict[str, Any] = dict(raw)
        for key in ("created", "started", "finished", "documents", "price", "attempts"):
            if r.get(key):
                r[key] = int(r[key])
        r["strict"] = r.get("strict") == "1"
        r["summary"] = json.loads(r["summary"]) if r.get("summary") else None
        return r

    async def view(self, run_id: str, owner: str) -> dict[str, Any]:
        """A run as its payer sees it; anyone else gets the same 404 as for an unknown id."""
        r = await self.get(run_id)
        if r is None or r["owner"] != owner:
            raise NotFound("unknown_run", "no run with this id for this account")
        cases = await self.cases(run_id) if r["status"] in ("passed", "failed") else []
        timings = {"queued_ms": (r.get("started") or r.get("finished") or 0) - r["created"] if r.get("started") or r.get("finished") else None,
                   "run_ms": r["finished"] - r["started"] if r.get("finished") and r.get("started") else None}
        return {
            "id": r["id"], "status": r["status"], "suite": r["suite"], "kubernetes_version": r["kubernetes_version"],
            "strict": r["strict"], "documents": r["documents"], "price": r["price"], "receipt": r["receipt"],
            "created": r["created"] / 1000, "started": r["started"] / 1000 if r.get("started") else None,
            "finished": r["finished"] / 1000 if r.get("finished") else None, "timings": timings,
            "summary": r["summary"], "error": r.get("error") or None, "refund": r.get("refund") or None,
            "findings": [c for c in cases if c["status"] == "failed"],
            "junit": f"/v1/qa/runs/{r['id']}/junit.xml",
        }

    async def cases(self, run_id: str) -> list[dict[str, Any]]:
        raw = await self.redis.get(self._result(run_id))
        return json.loads(raw) if raw else []

    async def junit(self, run_id: str, owner: str) -> str:
        r = await self.view(run_id, owner)
        if r["status"] not in ("passed", "failed"):
            raise NotFound("no_results_yet", f"the run is {r['status']}; JUnit exists once it has passed or failed")
        seconds = (r["timings"]["run_ms"] or 0) / 1000
        return to_junit(r["suite"], await self.cases(run_id), run_id=run_id, seconds=seconds)

    async def finish(self, run: dict[str, Any], status: str, *, summary: dict | None = None,
                     cases: list[dict] | None = None, error: str = "", refund: str = "") -> bool:
        """Record the outcome once; False if another worker finished this run first."""
        if cases is not None:
            await self.redis.set(self._result(run["id"]), json.dumps(cases), ex=30 * 86400)
        won = await self._finish(keys=[self._run(run["id"]), self._active(run["owner"])],
                                 args=[status, int(time.time() * 1000), json.dumps(summary or {}), error, refund])
        if won:
            await self.redis.delete(self._body(run["id"]))
        return bool(won)

    async def start(self, run_id: str, worker: str) -> None:
        await self.redis.hset(self._run(run_id), mapping={"status": "running", "started": int(time.time() * 1000),
                                                           "worker": worker})
        await self.redis.hincrby(self._run(run_id), "attempts", 1)

    async def body(self, run_id: str) -> str | None:
        return await self.redis.get(self._body(run_id))


class Worker:
    """Consumes the run queue: claim, check the payment settled, run the suite, store, finish."""

    def __init__(self, store: RunStore, ledger: Ledger, limits: Limits | None = None, name: str | None = None) -> None:
        self.store = store
        self.ledger = ledger
        self.limits = limits or Limits()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    async def ensure_group(self) -> None:
        try:
            await self.store.redis.xgroup_create(self.store.queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run_forever(self, stop: asyncio.Event | None = None) -> None:
        await self.ensure_group()
        log.info("worker_started", worker=self.name)
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.step(block_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: keep trying, nothing is acked
                log.warning("worker_step_failed", worker=self.name, error=str(exc))
                await asyncio.sleep(1)

    async def step(self, block_ms: int = 0) -> int:
        """Process stale entries of dead workers first, then new ones. Returns how many were handled."""
        _, claimed, _ = await self.store.redis.xautoclaim(
            self.store.queue, GROUP, self.name, min_idle_time=self.limits.lease_seconds * 1000, start_id="0-0", count=5)
        entries = list(claimed)
        if not entries:
            got = await self.store.redis.xreadgroup(GROUP, self.name, {self.store.queue: ">"}, count=1,
                                                    block=block_ms or None)
            entries = [e for _, batch in got for e in batch] if got else []
        for entry_id, fields in entries:
            if fields:  # a deleted entry comes back empty from XAUTOCLAIM
                await self.process(entry_id, fields["run"])
            await self.store.redis.xack(self.store.queue, GROUP, entry_id)
        return len(entries)

    async def process(self, entry_id: str, run_id: str) -> None:
        run = await self.store.get(run_id)
        if run is None or run["status"] in DONE:
            return
        if not await self._payment_settled(run):
            await self.store.finish(run, "error", error="the payment for this run was not settled")
            return
        if run["attempts"] >= self.limits.max_attempts:
            await self._fail(run, f"gave up after {run['attempts']} attempts (workers died or timed out)")
            return
        await self.store.start(run_id, self.name)
        started = time.perf_counter()
        try:
            body = await self.store.body(run_id)
            if body is None:
                raise RuntimeError("the run's manifests are gone")
            outcome, documents = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, _execute, run, body), self.limits.run_timeout)
        except Exception as exc:
            log.error("run_failed", run=run_id, error=f"{type(exc).__name__}: {exc}")
            await self._fail(run, f"infrastructure error: {type(exc).__name__}")
            return
        cases = [c.__dict__ for c in outcome.cases]
        status = "failed" if outcome.failed else "passed"
        summary = {**outcome.summary(documents), "seconds": round(time.perf_counter() - started, 3)}
        if await self.store.finish(run, status, summary=summary, cases=cases):
            log.info("run_finished", run=run_id, status=status, testcases=summary["testcases"])
            _notify(run, status, summary=summary)

    async def _payment_settled(self, run: dict[str, Any], wait: float = 5.0) -> bool:
        """The paywall captures right after the 202; wait briefly for that, never run an unpaid run."""
        deadline = time.monotonic() + wait
        while True:
            transfer = await self.ledger.transfer(run["receipt"])
            state = transfer["state"] if transfer else "missing"
            if state == "posted":
                return True
            if state != "pending" or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def _fail(self, run: dict[str, Any], error: str) -> None:
        """Infrastructure failure: give the payer the price back, exactly once (idempotent transfer id)."""
        refund_id = f"refund:{run['receipt']}"
        result = await self.ledger.post(refund_id, REVENUE, user_account(run["owner"]), run["price"],
                                        reason=f"QA run {run['id']} failed: {error}")
        if result.ok:
            metrics.SATS.labels("refunded").inc(int(run["price"]))
        if result.outcome.value not in ("ok", "replayed"):
            log.error("refund_failed", run=run["id"], outcome=result.outcome.value)
            refund_id = ""
        if await self.store.finish(run, "error", error=error, refund=refund_id):
            _notify(run, "error", error=error, refund=refund_id or None)


def _execute(run: dict[str, Any], body: str) -> tuple[suites.Outcome, int]:
    suite = suites.get(run["suite"])
    if suite is None:
        raise RuntimeError(f"suite {run['suite']!r} is not installed on this worker")
    docs = manifests.parse_manifests(body, max_documents=10**6)
    return suite.run(docs, run["kubernetes_version"], run["strict"]), len(docs)


def _notify(run: dict[str, Any], status: str, **fields: Any) -> None:
    """The buyer's webhook, if the run named one: signed under the run's own secret, in the background."""
    if run.get("webhook"):
        payload = {"event": "run_finished", "id": run["id"], "status": status, "at": time.time(), **fields}
        tasks.spawn(webhooks.deliver(run["webhook"], run.get("webhook_secret", ""), payload), f"webhook:{run['id']}")
