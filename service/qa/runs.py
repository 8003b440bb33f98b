"""Paid QA runs: stored and queued in Redis (a Stream with a consumer group), executed by workers.

A worker that dies mid-run leaves its entry pending in the group; another worker claims it after
QA_LEASE seconds (XAUTOCLAIM), so no paid run is lost. A live worker renews its lease (a heartbeat) for as
long as it runs. Each attempt carries a fencing token (the run's attempt counter): `start`, `renew` and
`finish` are compare-and-set scripts on it, so a worker that lost its lease can neither restart a run,
record its outcome nor refund it. Every outcome claims the run's `settled` field once; a refund (the suite
raised, or QA_MAX_ATTEMPTS were used up) claims it in the same ledger script that moves the money (a
Guard), so only the one winning finish ever posts a refund, and only an attempt that was not fenced.
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
from ..keys import REVENUE, Keys, user_account
from ..ledger import Guard, Ledger, Outcome
from ..scripts import register
from . import manifests, suites
from .junit import to_junit

__all__ = ["RunStore", "Worker", "DONE", "GROUP"]

log = structlog.get_logger("qa")
GROUP = "qa-workers"
DONE = ("passed", "failed", "error")


@dataclass(frozen=True)
class Started:
    """What `start` answered: `ok` with this attempt's fencing token, or why no attempt began
    (`done`, `settled` with the winning claim, `leased` by a live worker, `missing`)."""

    state: str
    token: int = 0
    settled: str = ""


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
        self.keys = Keys(prefix)
        self._finish = register(redis, "run_finish")
        self._start = register(redis, "run_start")
        self._renew = register(redis, "run_renew")

    def run_key(self, run_id: str) -> str:
        """The run's hash (refunds guard on it: same hash tag as the ledger)."""
        return self._run(run_id)

    def _run(self, run_id: str) -> str:
        return self.keys.of("qa", "run", run_id)

    def _body(self, run_id: str) -> str:
        return self.keys.of("qa", "body", run_id)

    def _result(self, run_id: str) -> str:
        return self.keys.of("qa", "result", run_id)

    def _active(self, owner: str) -> str:
        return self.keys.of("qa", "active", owner)

    @property
    def queue(self) -> str:
        return self.keys.of("qa", "queue")

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

    async def finish(self, run: dict[str, Any], token: int, status: str, *, summary: dict | None = None,
                     cases: list[dict] | None = None, error: str = "", refund: str = "") -> bool:
        """Record the outcome of attempt `token` once; False if the run was finished already or the
        attempt was fenced by a newer one (a stale worker's result is dropped, never stored)."""
        got = await self._finish(
            keys=[self._run(run["id"]), self._active(run["owner"]), self._result(run["id"])],
            args=[token, status, json.dumps(summary or {}), error, refund,
                  json.dumps(cases) if cases is not None else "", 30 * 86400])
        if got == "ok":
            await self.redis.delete(self._body(run["id"]))
            return True
        if got == "stale":
            log.warning("stale_finish_refused", run=run["id"], token=token, status=status)
        return False

    async def start(self, run_id: str, worker: str, *, lease_ms: int) -> Started:
        """Begin a new attempt (compare-and-set): refused for a finished or settled run, or while another
        attempt's lease is live; the attempt before it is fenced."""
        got = [str(x) for x in await self._start(keys=[self._run(run_id)], args=[worker, lease_ms])]
        if got[0] == "ok":
            return Started("ok", int(got[1]))
        if got[0] != "done":
            log.info("start_refused", run=run_id, worker=worker, state=got[0], detail=got[1] if len(got) > 1 else "")
        return Started(got[0], settled=got[1] if got[0] == "settled" else "")

    async def renew(self, run_id: str, token: int, worker: str, *, lease_ms: int, entry_id: str = "") -> bool:
        """Extend attempt `token`'s lease (and its stream entry's); False once it was fenced or finished."""
        return bool(await self._renew(keys=[self._run(run_id), self.queue],
                                      args=[token, lease_ms, GROUP, worker, entry_id]))

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
            done = True
            if fields:  # a deleted entry comes back empty from XAUTOCLAIM
                done = await self.process(entry_id, fields["run"])
            if done:  # an entry another live attempt holds stays pending for it
                await self.store.redis.xack(self.store.queue, GROUP, entry_id)
        return len(entries)

    @property
    def _lease_ms(self) -> int:
        return int(self.limits.lease_seconds * 1000)

    async def process(self, entry_id: str, run_id: str) -> bool:
        """One attempt at a run under a renewed lease. False when the entry belongs to another attempt."""
        run = await self.store.get(run_id)
        if run is None or run["status"] in DONE:
            return True
        started = await self.store.start(run_id, self.name, lease_ms=self._lease_ms)
        if started.state == "settled":  # a refund landed but its record did not (crash): record it now
            token = int(started.settled.split(":")[0])
            if await self.store.finish(run, token, "error", error="the run failed; refunded",
                                       refund=f"refund:{run['receipt']}"):
                _notify(run, "error", error="the run failed; refunded", refund=f"refund:{run['receipt']}")
            return True
        if started.state != "ok":
            return started.state in ("done", "missing")
        heartbeat = asyncio.create_task(self._heartbeat(run_id, started.token, entry_id))
        try:
            return await self._attempt(run, started.token)
        finally:
            await _stop(heartbeat)

    async def _attempt(self, run: dict[str, Any], token: int) -> bool:
        run_id = run["id"]
        if not await self._payment_settled(run):
            return await self.store.finish(run, token, "error", error="the payment for this run was not settled") \
                or not await self._fenced(run_id, token)
        if token > self.limits.max_attempts:
            await self._fail(run, token, f"gave up after {token - 1} attempts (workers died or timed out)")
            return True
        started = time.perf_counter()
        try:
            body = await self.store.body(run_id)
            if body is None:
                raise RuntimeError("the run's manifests are gone")
            outcome, documents = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, _execute, run, body), self.limits.run_timeout)
        except Exception as exc:
            log.error("run_failed", run=run_id, error=f"{type(exc).__name__}: {exc}")
            await self._fail(run, token, f"infrastructure error: {type(exc).__name__}")
            return not await self._fenced(run_id, token)
        cases = [c.__dict__ for c in outcome.cases]
        status = "failed" if outcome.failed else "passed"
        summary = {**outcome.summary(documents), "seconds": round(time.perf_counter() - started, 3)}
        if await self.store.finish(run, token, status, summary=summary, cases=cases):
            log.info("run_finished", run=run_id, status=status, testcases=summary["testcases"])
            _notify(run, status, summary=summary)
            return True
        return not await self._fenced(run_id, token)

    async def _fenced(self, run_id: str, token: int) -> bool:
        """Did a newer attempt take this run over (its worker owns the stream entry now)?"""
        run = await self.store.get(run_id)
        return bool(run and run["status"] not in DONE and run.get("attempts", 0) != token)

    async def _heartbeat(self, run_id: str, token: int, entry_id: str) -> None:
        """Renew the lease every third of it while the attempt runs; stops when fenced or cancelled."""
        interval = max(0.05, self.limits.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.renew(run_id, token, self.name, lease_ms=self._lease_ms, entry_id=entry_id):
                    log.warning("lease_lost", run=run_id, token=token, worker=self.name)
                    return
            except Exception as exc:  # Redis hiccup: try again next beat (the lease may lapse)
                log.warning("lease_renew_failed", run=run_id, error=str(exc))

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

    async def _fail(self, run: dict[str, Any], token: int, error: str) -> None:
        """Infrastructure failure: give the payer the price back, at most once and only from the current
        attempt: the refund claims the run's `settled` field in its own ledger script (a Guard that is
        refused once this attempt is fenced or another outcome was recorded)."""
        refund_id = f"refund:{run['receipt']}"
        guard = Guard(self.store.run_key(run["id"]), forbid=f"fenced:{token}", claim="settled",
                      value=f"{token}:error")
        result = await self.ledger.post(refund_id, REVENUE, user_account(run["owner"]), run["price"], guard=guard,
                                        reason=f"QA run {run['id']} failed: {error}")
        if result.outcome in (Outcome.GUARDED, Outcome.CLAIMED):
            log.warning("stale_refund_refused", run=run["id"], token=token, outcome=result.outcome.value)
            return
        if result.ok:
            metrics.SATS.labels("refunded").inc(int(run["price"]))
        elif result.outcome is not Outcome.REPLAYED:
            log.error("refund_failed", run=run["id"], outcome=result.outcome.value)
            refund_id = ""
        if await self.store.finish(run, token, "error", error=error, refund=refund_id):
            _notify(run, "error", error=error, refund=refund_id or None)


async def _stop(task: "asyncio.Task[Any]") -> None:
    """Cancel a helper task and wait for it, without swallowing a cancellation aimed at the caller."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


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
