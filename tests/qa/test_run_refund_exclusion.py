"""A QA run is refunded if and only if it was not delivered, also when Redis answers late (issue 11.13, seen
by the fault simulator): the worker's finish and its refund claim the run's `settled` field in one script
each, so a reply lost after either one ran cannot let the other follow it."""
from __future__ import annotations

import json
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.client import PaidSession, Wallet
from service.keys import GRANTS
from service.ledger import REVENUE, Ledger, user_account
from service.qa.runs import Limits, RunStore, Worker
from tests.faults.procs import SlowReplies

GOOD = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
PRICE = 100 + 20


@pytest.fixture
async def late(settings):
    """A Redis client whose chosen replies arrive after its 0.3 s timeout; the commands run at once."""
    proxy = await SlowReplies(urlparse(settings.redis_url).port).start()
    client = aioredis.Redis.from_url(proxy.url, decode_responses=True, socket_timeout=0.3)
    yield proxy, client
    await client.aclose()
    await proxy.stop()


async def _bought_run(aiohttp_server, make_app, http, ledger, name: str) -> tuple[str, dict]:
    server = await aiohttp_server(make_app(qa_workers=0))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate(name)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        await s.register(base)
        await ledger.post(f"grant-{name}", GRANTS, user_account(wallet.username), 1000)
        status, created, _ = await s.request("POST", f"{base}/v1/qa/runs",
                                             data=json.dumps({"suite": "schema", "manifests": GOOD}),
                                             headers={"Content-Type": "application/json"})
    assert status == 202, created
    return base, {**created, "wallet": wallet}


async def _view(http, base: str, wallet: Wallet, run_id: str) -> dict:
    async with PaidSession(wallet, session=http) as s:
        status, run = await s.signed_get(f"{base}/v1/qa/runs/{run_id}")
    assert status == 200, run
    return run


async def test_a_delivered_run_whose_finish_reply_was_lost_is_never_refunded(
        aiohttp_server, make_app, http, ledger, settings, late):
    proxy, client = late
    base, created = await _bought_run(aiohttp_server, make_app, http, ledger, "lost-finish")
    store = RunStore(ledger.redis, settings.redis_prefix)
    slow = Worker(RunStore(client, settings.redis_prefix), Ledger(client, settings.redis_prefix),
                  Limits(lease_seconds=1, max_attempts=1), name="slow")
    started = await store.start(created["id"], "slow", lease_ms=200)
    run = await store.get(created["id"])
    proxy.only, proxy.delay = b"$2\r\nok\r\n", 1.0  # the finish script's answer
    with pytest.raises(RedisError):  # the result is stored; the worker does not know it
        await slow._attempt(run, started.token)
    proxy.delay = 0
    # every path that refunds now: the same attempt's error path, and a second worker past max attempts
    await slow._fail(run, started.token, "finish reply lost")
    fresh = Worker(store, ledger, Limits(lease_seconds=1, max_attempts=1), name="fresh")
    assert await fresh.process("0-0", created["id"])
    view = await _view(http, base, created["wallet"], created["id"])
    assert view["status"] == "passed" and view["refund"] is None and view["summary"]["testcases"] == 1
    assert await ledger.transfer(f"refund:{created['receipt']}") is None
    assert (await ledger.balance(user_account(created["wallet"].username))).posted == 1000 - PRICE
    assert (await ledger.balance(REVENUE)).posted == PRICE
    assert (await ledger.reconcile()).ok


async def test_a_refund_whose_reply_was_lost_is_never_followed_by_a_delivery(
        aiohttp_server, make_app, http, ledger, settings, late):
    proxy, client = late
    base, created = await _bought_run(aiohttp_server, make_app, http, ledger, "lost-refund")
    store = RunStore(ledger.redis, settings.redis_prefix)
    slow = Worker(RunStore(client, settings.redis_prefix), Ledger(client, settings.redis_prefix),
                  Limits(lease_seconds=1), name="slow")
    started = await store.start(created["id"], "slow", lease_ms=200)
    run = await store.get(created["id"])
    proxy.only, proxy.delay = b"$6\r\nposted\r\n", 1.0  # the refund script's answer
    with pytest.raises(RedisError):  # the refund is posted; the worker does not know it
        await slow._fail(run, started.token, "infrastructure error: TimeoutError")
    proxy.delay = 0
    # the same attempt then computes a result, and another worker picks the entry up: neither delivers
    assert not await store.finish(run, started.token, "passed", summary={"testcases": 1}, cases=[])
    assert (await store.start(created["id"], "fresh", lease_ms=1000)).state == "settled"
    fresh = Worker(store, ledger, Limits(lease_seconds=1), name="fresh")
    assert await fresh.process("0-0", created["id"])
    view = await _view(http, base, created["wallet"], created["id"])
    assert view["status"] == "error" and view["refund"] == f"refund:{created['receipt']}"
    assert view["findings"] == [] and view["summary"] == {}
    async with PaidSession(created["wallet"], session=http) as s:
        status, _ = await s.signed_get(f"{base}/v1/qa/runs/{created['id']}/junit.xml")
    assert status == 404  # no results of a refunded run
    assert (await ledger.balance(user_account(created["wallet"].username))).posted == 1000
    assert (await ledger.balance(REVENUE)).posted == 0
    assert (await ledger.reconcile()).ok
