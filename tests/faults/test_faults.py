"""Faults, each ending with a reconcile: Redis restarted or unreachable, a server killed mid-call, a
graceful stop with a paid call in flight. Real processes, real redis-server."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from typing import Any
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from service.client import PaidSession, transfer_headers
from service.ledger import user_account
from service.payments.bittransfer import transfer_id_of
from service.redis_server import PrivateRedis, free_port
from service.payment_auth import receipt_reference
from tests.faults.procs import (HERE, MANIFEST, PRICE, SLOW_PRICE, Server, SlowReplies, ledger_for, reconcile_cli,
                                register_funded)


@pytest.fixture
def prefix() -> str:
    return f"f-{os.urandom(5).hex()}"


async def test_redis_unreachable_at_start_then_back(tmp_path, prefix, http):
    port = free_port()
    server = Server(tmp_path, f"redis://127.0.0.1:{port}/0", prefix)
    redis_server = None
    try:
        await server.wait("/healthz")
        async with http.get(f"{server.url}/readyz") as r:
            assert r.status == 503
        async with http.post(f"{server.url}/v1/qa/validate", data=MANIFEST) as r:
            body = await r.json()
            assert (r.status, body["error"]) == (503, "ledger_unavailable") and "Price" not in r.headers
        redis_server = PrivateRedis(tmp_path / "late-redis", port=port).start()
        await server.wait("/readyz", 200, timeout=15)
        async with http.post(f"{server.url}/v1/qa/validate", data=MANIFEST) as r:
            assert r.status == 402
        reconcile_cli(redis_server.url, prefix)
    finally:
        server.stop()
        if redis_server:
            redis_server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_redis_restart_mid_stream_charges_each_call_at_most_once(tmp_path, prefix, http, sig):
    port = free_port()
    rs = PrivateRedis(tmp_path / "redis", port=port, appendfsync="always").start()
    server = Server(tmp_path, rs.url, prefix, HOLD_TIMEOUT="2", REDIS_TIMEOUT_MS="1000")
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 100 * PRICE)
        url = f"{server.url}/v1/qa/validate"
        sent: list[dict] = []
        outcomes: dict[str, list[int]] = {}

        async def call(headers: dict) -> None:
            try:
                async with http.post(url, data=MANIFEST, headers=headers) as r:
                    outcomes.setdefault(headers["Bitcoin-Transfer"], []).append(r.status)
            except aiohttp.ClientError:
                outcomes.setdefault(headers["Bitcoin-Transfer"], []).append(-1)

        for i in range(60):
            headers = transfer_headers(wallet, amount=PRICE, payee_username="microtasks",
                                       payee_address="tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", url=url)
            sent.append(headers)
            await call(headers)
            if i == 20:
                rs.stop(sig)             # Redis goes away mid-stream ...
            if i == 35:
                rs.start()               # ... and comes back with its AOF
        await server.wait("/readyz", timeout=15)
        statuses = [s for v in outcomes.values() for s in v]
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses
        for headers in sent:             # every client retries what failed, with the same signed transfer
            if outcomes[headers["Bitcoin-Transfer"]][-1] != 200:
                await call(headers)
        await asyncio.sleep(3.5)         # holds of calls cut off mid-way expire and are voided
        ledger, r = await ledger_for(rs.url, prefix)
        try:
            await ledger.sweep_expired()
            served = sum(1 for v in outcomes.values() if 200 in v)
            balance = await ledger.balance(user_account(wallet.username))
            assert balance.pending_debits == 0
            assert balance.posted == 100 * PRICE - served * PRICE   # charged exactly for what was served
            assert all(v.count(200) <= 1 for v in outcomes.values())  # nothing settled twice
            reconcile_cli(rs.url, prefix)
        finally:
            await r.aclose()
    finally:
        server.stop()
        rs.stop()


async def test_server_killed_after_the_hold_the_sweeper_voids_it(tmp_path, prefix, http, redis_url):
    first = Server(tmp_path, redis_url, prefix, script=str(HERE / "slow_server.py"), HOLD_TIMEOUT="2",
                   SLOW_SECONDS="30")
    second = None
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await first.wait("/readyz")
        wallet = await register_funded(http, first.url, 1000)
        async with PaidSession(wallet, max_price=500, session=http) as s:
            call = asyncio.ensure_future(s.request("POST", f"{first.url}/test/slow", data=b"{}"))
            deadline = time.monotonic() + 10
            while (await ledger.balance(user_account(wallet.username))).pending_debits == 0:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            first.stop(signal.SIGKILL)   # killed between the hold and the capture
            with pytest.raises(aiohttp.ClientError):
                await call
        assert (await ledger.balance(user_account(wallet.username))).pending_debits == SLOW_PRICE
        second = Server(tmp_path, redis_url, prefix, HOLD_TIMEOUT="2")  # any live process sweeps
        await second.wait("/readyz")
        deadline = time.monotonic() + 15
        while (await ledger.balance(user_account(wallet.username))).pending_debits:
            assert time.monotonic() < deadline, "the expired hold was never voided"
            await asyncio.sleep(0.2)
        balance = await ledger.balance(user_account(wallet.username))
        assert (balance.posted, balance.available) == (1000, 1000)
        reconcile_cli(redis_url, prefix)
    finally:
        first.stop()
        if second:
            second.stop()
        await r.aclose()


async def test_graceful_stop_finishes_and_settles_the_call_in_flight(tmp_path, prefix, http, redis_url):
    server = Server(tmp_path, redis_url, prefix, script=str(HERE / "slow_server.py"), SLOW_SECONDS="2")
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 1000)
        async with PaidSession(wallet, max_price=500, session=http) as s:
            call = asyncio.ensure_future(s.request("POST", f"{server.url}/test/slow", data=b"{}"))
            while (await ledger.balance(user_account(wallet.username))).pending_debits == 0:
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            status, body, headers = await call
        assert status == 200 and body == {"done": True} and headers["Payment-Receipt"]
        server.proc.wait(20)
        balance = await ledger.balance(user_account(wallet.username))
        assert (balance.posted, balance.pending_debits) == (1000 - SLOW_PRICE, 0)
        reconcile_cli(redis_url, prefix)
    finally:
        server.stop()
        await r.aclose()


async def test_slow_redis_answers_503_within_the_timeout_and_leaves_no_hold(tmp_path, prefix, http):
    rs = PrivateRedis(tmp_path / "redis", port=free_port()).start()
    server = Server(tmp_path, rs.url, prefix, HOLD_TIMEOUT="2", REDIS_TIMEOUT_MS="300")
    admin = aioredis.Redis.from_url(rs.url, decode_responses=True)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 100 * PRICE)
        url = f"{server.url}/v1/qa/validate"
        sent = [transfer_headers(wallet, amount=PRICE, payee_username="microtasks",
                                 payee_address="tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", url=url)
                for _ in range(10)]
        outcomes: dict[str, list[int]] = {}

        async def call(headers: dict) -> None:
            async with http.post(url, data=MANIFEST, headers=headers) as r:
                outcomes.setdefault(headers["Bitcoin-Transfer"], []).append(r.status)

        await admin.execute_command("CLIENT", "PAUSE", "6000", "ALL")  # every command now waits 6 s
        paused_at = time.monotonic()
        await asyncio.gather(*(call(h) for h in sent))
        answered_within = time.monotonic() - paused_at
        assert {s for v in outcomes.values() for s in v} == {503}
        assert answered_within < 5, "callers waited for Redis instead of getting a bounded 503"
        await asyncio.sleep(6.2 - answered_within)  # Redis answers again
        await server.wait("/readyz", timeout=15)
        for headers in sent:             # the clients retry with the same signed transfers
            await call(headers)
        await asyncio.sleep(3.5)         # holds whose replies came too late expire and are voided
        ledger, r = await ledger_for(rs.url, prefix)
        try:
            await ledger.sweep_expired()
            served = sum(1 for v in outcomes.values() if 200 in v)
            assert served >= 1
            assert all(v.count(200) <= 1 for v in outcomes.values())
            balance = await ledger.balance(user_account(wallet.username))
            assert (balance.pending_debits, balance.posted) == (0, 100 * PRICE - served * PRICE)
            reconcile_cli(rs.url, prefix)
        finally:
            await r.aclose()
    finally:
        await admin.aclose()
        server.stop()
        rs.stop()


async def test_worker_processes_share_the_port_a_dead_one_is_replaced(tmp_path, prefix, http, redis_url):
    server = Server(tmp_path, redis_url, prefix, WEB_WORKERS="2")  # as the container image starts it
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 1000)
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(children) == 2
        for child in children:  # each serves; none becomes a manager of its own (WEB_WORKERS is inherited)
            assert not subprocess.run(["pgrep", "-P", str(child)], capture_output=True, text=True).stdout
        os.kill(children[0], signal.SIGKILL)
        while Path(f"/proc/{children[0]}").exists() and "Z" not in Path(f"/proc/{children[0]}/stat").read_text().split()[2]:
            await asyncio.sleep(0.05)  # dead: its listening socket has left the port's group
        async with aiohttp.ClientSession() as fresh, PaidSession(wallet, max_price=500, session=fresh) as s:
            for _ in range(4):  # the survivor (and soon the replacement) keeps serving
                status, _, _ = await s.request("POST", f"{server.url}/v1/qa/validate", data=MANIFEST)
                assert status == 200
        deadline = time.monotonic() + 15
        while True:
            now = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()
            if len(now) == 2 and str(children[0]) not in now:
                break
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as fresh, fresh.get(f"{server.url}/metrics") as resp:  # merged across workers
            assert 'microtasks_payments_total{method="bittransfer",outcome="captured"} 4.0' in await resp.text()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert not subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True).stdout
        balance = await ledger.balance(user_account(wallet.username))
        assert (balance.posted, balance.pending_debits) == (1000 - 4 * PRICE, 0)
        reconcile_cli(redis_url, prefix)
    finally:
        server.stop()
        await r.aclose()



async def test_a_capture_whose_reply_is_lost_is_never_reported_as_not_charged(tmp_path, prefix, http, redis_url):
    """Finding 6: the capture runs in Redis but its reply comes after REDIS_TIMEOUT_MS (the script still
    runs: the timeout is client-side). The answer used to be 503 "you were not charged" while the payer was
    charged. Now the transfer is read by id; unreadable, it is 503 payment_outcome_unknown naming the
    receipt, and a retry with the same transfer gets the paid response, uncharged."""
    proxy = await SlowReplies(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    server = Server(tmp_path, proxy.url, prefix, script=str(HERE / "slow_server.py"), SLOW_SECONDS="1",
                    HOLD_TIMEOUT="30", REDIS_TIMEOUT_MS="300")
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 1000)
        url = f"{server.url}/test/slow"
        headers = transfer_headers(wallet, amount=SLOW_PRICE, payee_username="microtasks",
                                   payee_address="tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", url=url)
        transfer_id = transfer_id_of(headers["Bitcoin-Transfer"])

        async def call() -> tuple[int, dict, dict]:
            async with http.post(url, data=b"{}", headers=headers) as resp:
                return resp.status, await resp.json(), dict(resp.headers)

        async with PaidSession(wallet, max_price=500, session=http) as s:  # one call settles normally first
            assert (await s.request("POST", url, data=b"{}"))[0] == 200
        first = asyncio.ensure_future(call())
        while (await ledger.balance(user_account(wallet.username))).pending_debits == 0:
            await asyncio.sleep(0.02)
        proxy.delay, proxy.only = 1.0, b"posted"                    # the capture's reply comes too late
        status, body, _ = await first
        proxy.delay = 0.0
        assert (await ledger.transfer(transfer_id))["state"] == "posted"   # the capture ran: charged
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - 2 * SLOW_PRICE
        assert (status, body["error"]) == (503, "payment_outcome_unknown"), body
        assert "you were not charged" not in body["detail"] and f"/v1/receipts/{transfer_id}" in body["detail"]
        await server.wait("/readyz", timeout=15)
        status, body, got = await call()                            # the client retries the same transfer
        assert (status, body, got.get("Idempotent-Replayed")) == (200, {"done": True}, "true")
        assert receipt_reference(got["Payment-Receipt"]) == transfer_id
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - 2 * SLOW_PRICE
        reconcile_cli(redis_url, prefix)
    finally:
        await r.aclose()
        server.stop()
        await proxy.stop()


async def test_a_withdrawal_hold_whose_reply_is_lost_is_released_not_left_for_days(tmp_path, prefix, http,
                                                                                     redis_url):
    """Finding 6 for withdrawals: the hold ran in Redis but neither its reply nor a read of its state came
    back in time. The answer is 503 withdrawal_outcome_unknown (not "nothing was charged"), no withdrawal is
    queued, and the held amount is released as soon as the ledger answers, not after WITHDRAWAL_HOLD_DAYS."""
    proxy = await SlowReplies(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    server = Server(tmp_path, proxy.url, prefix, REDIS_TIMEOUT_MS="300")
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 50_000)
        async with PaidSession(wallet, session=http) as s:  # one withdrawal goes through first
            status, body = await s.signed("POST", f"{server.url}/v1/accounts/me/withdrawals",
                                          {"amount": 10_000, "address": "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"})
            assert status == 201, body
            proxy.delay, proxy.only = 1.0, b"pending"          # the next hold's reply comes too late
            status, body = await s.signed("POST", f"{server.url}/v1/accounts/me/withdrawals",
                                          {"amount": 20_000, "address": "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"})
            proxy.delay = 0.0
        assert (status, body["error"]) == (503, "withdrawal_outcome_unknown"), body
        assert "nothing was charged" not in body["detail"]
        deadline = time.monotonic() + 15
        while (await ledger.balance(user_account(wallet.username))).pending_debits != 10_000:
            assert time.monotonic() < deadline, "the orphaned withdrawal hold was not released"
            await asyncio.sleep(0.2)
        async with PaidSession(wallet, session=http) as s:
            status, me = await s.signed_get(f"{server.url}/v1/accounts/me")
        assert [w["amount"] for w in me["withdrawals"]] == [10_000]
        balance = await ledger.balance(user_account(wallet.username))
        assert (balance.posted, balance.available) == (50_000, 40_000)
        reconcile_cli(redis_url, prefix)
    finally:
        await r.aclose()
        server.stop()
        await proxy.stop()


async def asker_and_expert(http, url: str) -> tuple[Any, Any]:
    """A funded asker and an expert priced at 500 sat."""
    asker, expert = await register_funded(http, url, 5000), await register_funded(http, url, 1)
    async with PaidSession(expert, session=http) as s:
        status, body = await s.signed("PUT", f"{url}/v1/experts/me",
                                      {"display_name": "E", "tags": ["x"], "price": 500, "reply_hours": 24})
        assert status == 200, body
    return asker, expert


async def test_a_reply_whose_payment_reply_is_lost_is_not_reported_as_unpaid(tmp_path, prefix, http, redis_url):
    """Finding 6 for escrow payouts: the expert's reply was paid from the escrow in Redis, but the answer
    came too late. The expert is told the outcome is unknown (not "nothing was charged"), and retrying the
    same reply is safe: paid once (409 already_replied)."""
    proxy = await SlowReplies(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    server = Server(tmp_path, proxy.url, prefix, REDIS_TIMEOUT_MS="300")
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        asker, expert = await asker_and_expert(http, server.url)
        async with PaidSession(asker, max_price=1000, session=http) as s:
            status, q, _ = await s.request("POST", f"{server.url}/v1/experts/{expert.username}/questions",
                                           data=json.dumps({"text": "CNI?"}),
                                           headers={"Content-Type": "application/json"})
            assert status == 201, q
        async with PaidSession(expert, session=http) as s:
            proxy.delay, proxy.only = 1.0, b"posted"           # the payment's answer comes too late
            status, body = await s.signed("POST", f"{server.url}/v1/questions/{q['id']}/reply", {"text": "Cilium"})
            proxy.delay = 0.0
            assert (status, body["error"]) == (503, "reply_outcome_unknown"), body
            assert (await ledger.balance(user_account(expert.username))).posted == 501   # it was paid
            status, body = await s.signed("POST", f"{server.url}/v1/questions/{q['id']}/reply", {"text": "Cilium"})
            assert (status, body["error"]) == (409, "already_replied")
        assert (await ledger.balance(user_account(expert.username))).posted == 501       # once
        reconcile_cli(redis_url, prefix)
    finally:
        await r.aclose()
        server.stop()
        await proxy.stop()


async def test_an_ask_whose_commit_is_not_confirmed_is_not_stored_and_ends_uncharged(tmp_path, prefix, http,
                                                                                     redis_url):
    """Finding 6 on a route with effects: the ask's capture (made before storing the question) ran in Redis
    but its answer came too late. Nothing is stored; the answer says so and that a capture is refunded;
    once the ledger answers, the asker has every satoshi back (charged only if served)."""
    proxy = await SlowReplies(int(redis_url.rsplit(":", 1)[1].split("/")[0])).start()
    server = Server(tmp_path, proxy.url, prefix, REDIS_TIMEOUT_MS="300")
    ledger, r = await ledger_for(redis_url, prefix)
    try:
        await server.wait("/readyz")
        asker, expert = await asker_and_expert(http, server.url)
        url = f"{server.url}/v1/experts/{expert.username}/questions"
        async with PaidSession(asker, max_price=1000, session=http) as s:  # one ask settles normally first
            status, first, _ = await s.request("POST", url, data=json.dumps({"text": "CNI?"}),
                                               headers={"Content-Type": "application/json"})
            assert status == 201, first
            proxy.delay, proxy.only = 1.0, b"posted"           # the capture's answer comes too late
            status, body, _ = await s.request("POST", url, data=json.dumps({"text": "CSI?"}),
                                              headers={"Content-Type": "application/json"})
            proxy.delay = 0.0
        assert (status, body["error"]) == (503, "payment_outcome_unknown"), body
        assert "nothing was done" in body["detail"]
        deadline = time.monotonic() + 15
        while (await ledger.balance(user_account(asker.username))).available != 4500:
            assert time.monotonic() < deadline, "the unconfirmed capture was neither voided nor refunded"
            await asyncio.sleep(0.2)
        journal = [e for _, e in await r.xrange(ledger.journal_key)]
        assert [e["op"] for e in journal if e.get("id", "").startswith("refund_bt_")] == ["post"]  # it was captured
        async with PaidSession(expert, session=http) as s:
            status, inbox = await s.signed("GET", f"{server.url}/v1/experts/me/questions")
        assert [q["id"] for q in inbox["questions"]] == [first["id"]]
        reconcile_cli(redis_url, prefix)
    finally:
        await r.aclose()
        server.stop()
        await proxy.stop()


async def test_after_a_redis_restart_the_next_paid_call_succeeds_on_a_fresh_connection(tmp_path, prefix, http):
    """The pooled connections are stale after a Redis restart; redis-py replaces a connection the server
    closed and sends the command again (safe: it never ran), so the first paid call after /readyz is 200."""
    rs = PrivateRedis(tmp_path / "redis", port=free_port(), appendfsync="always").start()
    server = Server(tmp_path, rs.url, prefix)
    try:
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 10 * PRICE)
        async with PaidSession(wallet, max_price=PRICE, session=http) as s:
            results = await asyncio.gather(*(s.request("POST", f"{server.url}/v1/qa/validate", data=MANIFEST)
                                             for _ in range(3)))  # several pooled connections in use
            assert [status for status, _, _ in results] == [200] * 3, results
            rs.stop()
            rs.start()
            await server.wait("/readyz", timeout=15)
            results = await asyncio.gather(*(s.request("POST", f"{server.url}/v1/qa/validate", data=MANIFEST)
                                             for _ in range(3)))
        assert [status for status, _, _ in results] == [200] * 3, results
        reconcile_cli(rs.url, prefix)
    finally:
        server.stop()
        rs.stop()
