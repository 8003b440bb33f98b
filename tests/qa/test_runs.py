"""Paid asynchronous QA runs end to end: buy, queue, work, results, JUnit, refunds, dead workers."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from service.client import PaidSession, Wallet, signed_headers
from service.keys import GRANTS, REVENUE, Keys, user_account
from service.qa import suites
from service.qa.runs import GROUP

HERE = Path(__file__).resolve().parent
GOOD = """apiVersion: v1
kind: ConfigMap
metadata: {name: a}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80}]}
"""
BAD = GOOD.replace("port: 80", 'port: "eighty"')
PRICE_2_DOCS = 100 + 2 * 20

_spec = importlib.util.spec_from_file_location("slow_worker", HERE / "slow_worker.py")
slow_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slow_worker)


@pytest.fixture
def extra_suites():
    """The test suites `slow` and `explode`, registered like an operator's plug-in, then removed."""
    added = [suites.register(slow_worker.SlowSuite()), suites.register(slow_worker.ExplodingSuite())]
    yield
    for suite in added:
        suites.SUITES.pop(suite.id, None)


async def buy(s: PaidSession, base_url: str, **body) -> dict:
    status, payload, headers = await s.request("POST", f"{base_url}/v1/qa/runs",
                                               data=json.dumps({"suite": "schema", **body}),
                                               headers={"Content-Type": "application/json"})
    assert status == 202, payload
    assert headers["Location"] == payload["location"] and headers["Payment-Receipt"] == payload["receipt"]
    return payload


async def wait_done(s: PaidSession, base_url: str, run_id: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, run = await s.signed_get(f"{base_url}/v1/qa/runs/{run_id}")
        assert status == 200, run
        if run["status"] in ("passed", "failed", "error"):
            return run
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} still {run['status']}")


async def test_buy_a_run_and_read_results_and_junit(http, base_url, funded, ledger):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        created = await buy(s, base_url, manifests=GOOD, kubernetes_version="1.30")
        assert created["price"] == PRICE_2_DOCS and created["status"] == "queued"
        run = await wait_done(s, base_url, created["id"])
        assert run["status"] == "passed" and run["summary"]["testcases"] == 2 and run["findings"] == []
        assert run["timings"]["run_ms"] is not None
        async with http.get(f"{base_url}{run['junit']}",
                            headers=signed_headers(wallet, "GET", f"{base_url}{run['junit']}")) as r:
            assert r.status == 200 and r.content_type == "application/xml"
            suite = ET.fromstring(await r.text()).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "0")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_2_DOCS
    assert (await ledger.reconcile()).ok


async def test_findings_make_a_failed_run_with_junit_failures(http, base_url, funded):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        run = await wait_done(s, base_url, (await buy(s, base_url, manifests=BAD))["id"])
    assert run["status"] == "failed" and run["findings"][0]["path"].startswith("spec.ports[0].port")
    url = f"{base_url}/v1/qa/runs/{run['id']}"
    async with http.get(url, headers={**signed_headers(wallet, "GET", url), "Accept": "application/xml"}) as r:
        root = ET.fromstring(await r.text())
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 1 and "eighty" in failures[0].get("message")


async def test_ci_token_reads_what_it_bought_and_others_cannot(http, base_url, funded):
    owner, other = await funded(1000), await funded(1000)
    async with PaidSession(owner, session=http) as s:
        _, token = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 1000})
    async with PaidSession(max_price=500, token=token["token"], session=http) as s:
        created = await buy(s, base_url, manifests=GOOD)
    url = f"{base_url}/v1/qa/runs/{created['id']}"
    async with http.get(url, headers={"Authorization": f"Token {token['token']}"}) as r:
        assert r.status == 200 and (await r.json())["id"] == created["id"]
    async with PaidSession(other, session=http) as s:
        status, body = await s.signed_get(url)
    assert status == 404 and body["error"] == "unknown_run"


async def test_archive_input(http, base_url, funded):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in [("chart/a.yaml", GOOD), ("chart/README.md", "# no"), ("chart/b.yml", BAD)]:
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        created = await buy(s, base_url, archive=base64.b64encode(buf.getvalue()).decode())
        assert created["price"] == 100 + 4 * 20
        run = await wait_done(s, base_url, created["id"])
    assert run["status"] == "failed" and run["documents"] == 4


@pytest.mark.parametrize("body,status,code", [
    ({"suite": "nope", "manifests": GOOD}, 400, "unknown_suite"),
    ({"suite": "schema"}, 422, "validation_error"),
    ({"suite": "schema", "manifests": GOOD, "archive": "eA=="}, 422, "validation_error"),
    ({"suite": "schema", "manifests": "# nothing\n"}, 400, "no_documents"),
    ({"suite": "schema", "manifests": GOOD, "kubernetes_version": "1.4"}, 400, "unsupported_kubernetes_version"),
    ({"suite": "schema", "manifests": GOOD, "webhook": "ftp://x"}, 422, "validation_error"),
])
async def test_bad_run_requests_fail_before_any_invoice(http, base_url, body, status, code):
    async with http.post(f"{base_url}/v1/qa/runs", json=body) as r:
        got = await r.json()
        assert (r.status, got["error"]) == (status, code), got
        assert "Price" not in r.headers


async def test_queue_limit_refuses_without_charging(aiohttp_server, make_app, http, ledger):  # no other app's worker
    server = await aiohttp_server(make_app(qa_workers=0, qa_max_active=1))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("queue-limit")
    async with PaidSession(wallet, max_price=500, session=http) as s:
        await s.register(base)
        async with http.post(f"{base}/v1/admin/credits", json={"username": wallet.username, "amount": 1000, "reason": "t"},
                             headers={"Authorization": "Bearer test-admin-token-3f9a"}) as r:
            assert r.status == 201
        await buy(s, base, manifests=GOOD)
        status, body, _ = await s.request("POST", f"{base}/v1/qa/runs", data=json.dumps({"suite": "schema", "manifests": GOOD}))
    assert (status, body.get("error")) == (429, "too_many_runs"), body
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_2_DOCS


async def test_infrastructure_failure_refunds_exactly_once(extra_suites, aiohttp_server, make_app, http, ledger,
                                                           settings):
    server = await aiohttp_server(make_app())
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("refund-me")
    async with PaidSession(wallet, max_price=500, session=http) as s:
        await s.register(base)
        await ledger.post("grant-refund-me", GRANTS, user_account(wallet.username), 1000)
        created = await buy(s, base, suite="explode", manifests=GOOD)
        run = await wait_done(s, base, created["id"])
    assert run["status"] == "error" and run["refund"] == f"refund:{created['receipt']}"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000
    # a redelivered entry (e.g. two workers) neither reruns nor refunds again
    from service.qa.runs import RunStore, Worker
    worker = Worker(RunStore(ledger.redis, settings.redis_prefix), ledger)
    await worker.process("0-1", created["id"])
    again = await worker.store.get(created["id"])
    await worker._fail(again, again["attempts"], "again")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000
    assert (await ledger.balance(REVENUE)).posted == 0
    assert (await ledger.reconcile()).ok


def start_worker(settings, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": settings.redis_url, "REDIS_PREFIX": settings.redis_prefix, "LOG_LEVEL": "info",
           **env_extra}
    return subprocess.Popen([sys.executable, str(HERE / "slow_worker.py")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_worker_killed_mid_run_another_finishes_charged_once(extra_suites, aiohttp_server, make_app, http,
                                                                   ledger, settings):
    server = await aiohttp_server(make_app(qa_workers=0))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("killed-worker")
    env = {"QA_LEASE": "1", "SLOW_SUITE_SECONDS": "2"}
    first = start_worker(settings, env)
    second = None
    try:
        async with PaidSession(wallet, max_price=500, session=http) as s:
            await s.register(base)
            await ledger.post("grant-killed", GRANTS, user_account(wallet.username), 1000)
            created = await buy(s, base, suite="slow", manifests=GOOD)
            deadline = time.monotonic() + 20
            while (await s.signed_get(f"{base}/v1/qa/runs/{created['id']}"))[1]["status"] != "running":
                assert time.monotonic() < deadline, "the first worker never started the run"
                await asyncio.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            first.wait()
            second = start_worker(settings, env)
            run = await wait_done(s, base, created["id"], timeout=30)
        assert run["status"] == "passed"
        record = await ledger.redis.hgetall(Keys(settings.redis_prefix).of("qa", "run", created["id"]))
        assert record["attempts"] == "2"
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_2_DOCS
        for _ in range(40):  # the entry is acknowledged right after the run is recorded
            pending = await ledger.redis.xpending(Keys(settings.redis_prefix).of("qa", "queue"), GROUP)
            if pending["pending"] == 0:
                break
            await asyncio.sleep(0.05)
        assert pending["pending"] == 0
        assert (await ledger.reconcile()).ok
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


async def test_webhook_receives_the_summary(http, make_app, funded, aiohttp_server):
    import hashlib
    import hmac

    from aiohttp import web

    # the receiver is on loopback: the operator's allow-list lets webhooks reach it (SSRF rules otherwise)
    base_url = str((await aiohttp_server(make_app(webhook_allow=("127.0.0.0/8",), webhook_allow_http=True)))
                   .make_url("")).rstrip("/")

    received: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received.append(json.loads(body))
        signatures.append((body, request.headers["X-Microtasks-Signature"]))
        return web.Response(status=204)

    signatures: list[tuple[bytes, str]] = []
    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        created = await buy(s, base_url, manifests=GOOD, webhook=str(receiver.make_url("/hook")))
        await wait_done(s, base_url, created["id"])
    for _ in range(50):
        if received:
            break
        await asyncio.sleep(0.05)
    # one event, named, signed under the secret the 202 showed once (the same scheme as expert webhooks)
    assert len(received) == 1
    assert {k: received[0][k] for k in ("event", "id", "status")} == {
        "event": "run_finished", "id": created["id"], "status": "passed"}
    assert received[0]["summary"]["testcases"] == 2
    body, signature = signatures[0]
    assert signature == "sha256=" + hmac.new(created["webhook_secret"].encode(), body, hashlib.sha256).hexdigest()


async def test_short_lease_many_workers_each_run_once_charged_never_refunded(
        extra_suites, aiohttp_server, make_app, http, ledger, monkeypatch):
    """Issue 11.13: with QA_LEASE shorter than a run, a live worker keeps its lease (heartbeat), so no
    second worker re-runs it, and no run that was computed ends `error` with a refund."""
    monkeypatch.setenv("SLOW_SUITE_SECONDS", "2.5")
    server = await aiohttp_server(make_app(qa_workers=4, qa_lease=1))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("short-lease")
    async with PaidSession(wallet, max_price=500, session=http) as s:
        await s.register(base)
        await ledger.post("grant-short-lease", GRANTS, user_account(wallet.username), 1000)
        created = [await buy(s, base, suite="slow", manifests=GOOD) for _ in range(4)]
        runs = await asyncio.gather(*[wait_done(s, base, c["id"], timeout=30) for c in created])
    assert [r["status"] for r in runs] == ["passed"] * 4 and all(r["refund"] is None for r in runs)
    for c in created:
        record = await ledger.redis.hgetall(ledger.keys.of("qa", "run", c["id"]))
        assert record["attempts"] == "1", record  # never re-claimed while its worker was alive
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - 4 * PRICE_2_DOCS
    assert (await ledger.balance(REVENUE)).posted == 4 * PRICE_2_DOCS
    assert (await ledger.reconcile()).ok


async def test_stale_worker_cannot_restart_finish_or_refund_a_run(aiohttp_server, make_app, http, ledger, settings):
    """Issue 11.13: each attempt has a fencing token; the attempt that lost its lease is refused at
    start, finish and refund, and a finished run is never set back to running."""
    from service.qa.runs import Limits, RunStore, Worker

    server = await aiohttp_server(make_app(qa_workers=0))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("stale-worker")
    async with PaidSession(wallet, max_price=500, session=http) as s:
        await s.register(base)
        await ledger.post("grant-stale", GRANTS, user_account(wallet.username), 1000)
        created = await buy(s, base, manifests=GOOD)
    store = RunStore(ledger.redis, settings.redis_prefix)
    stale = Worker(store, ledger, Limits(lease_seconds=1), name="stale")
    live = Worker(store, ledger, Limits(lease_seconds=1), name="live")
    first = await store.start(created["id"], "stale", lease_ms=50)
    assert first.token == 1
    assert (await store.start(created["id"], "live", lease_ms=1000)).state == "leased"  # lease still held
    await asyncio.sleep(0.1)
    second = await store.start(created["id"], "live", lease_ms=1000)
    assert second.token == 2
    run = await store.get(created["id"])
    await stale._fail(run, first.token, "stale worker thinks it failed")
    assert not await store.finish(run, first.token, "failed", summary={}, cases=[])
    assert not await store.renew(created["id"], first.token, "stale", lease_ms=1000)
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_2_DOCS  # no refund
    assert await store.finish(run, second.token, "passed", summary={"testcases": 2}, cases=[])
    assert (await store.start(created["id"], "late", lease_ms=1000)).state == "done"
    await live._fail(run, second.token, "too late")
    view = await store.get(created["id"])
    assert view["status"] == "passed" and not view.get("refund")
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_2_DOCS
    assert await store.active(wallet.username) == 0
    assert (await ledger.reconcile()).ok


def _bomb(unpacked_mib: int = 700) -> bytes:
    """A ~700 KB .tar.gz that unpacks to ~700 MiB: one .yaml member of zeros, as many gzip members."""
    import gzip

    info = tarfile.TarInfo("chart/huge.yaml")
    info.size = unpacked_mib * 1024 * 1024
    chunk = gzip.compress(b"\0" * (10 * 1024 * 1024), compresslevel=9)
    return gzip.compress(info.tobuf(), compresslevel=9) + chunk * (unpacked_mib // 10)


@pytest.mark.parametrize("archive", [
    pytest.param(_bomb, id="huge-member"),
    pytest.param(lambda: _many_members(200_000), id="many-members"),
])
async def test_decompression_bomb_answers_fast_and_never_stalls_the_server(http, base_url, archive):
    """Issue 12.2: an anonymous run request with a ~1 MB bomb archive is refused within milliseconds
    (limits enforced while streaming, off the event loop), and /healthz stays responsive meanwhile."""
    body = {"suite": "schema", "archive": base64.b64encode(archive()).decode()}
    assert len(json.dumps(body)) < 1024 * 1024
    latencies: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            async with http.get(f"{base_url}/healthz") as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    async with http.post(f"{base_url}/v1/qa/runs", json=body) as r:
        status, payload = r.status, await r.json()
    elapsed = time.perf_counter() - t0
    done.set()
    await prober
    assert status in (402, 413, 422), payload
    assert payload["error"] in ("archive_too_large", "payload_too_large", "invalid_archive"), payload
    assert elapsed < 0.5, f"the refusal took {elapsed:.2f} s"
    assert latencies and max(latencies) < 0.2, f"/healthz took up to {max(latencies):.2f} s"


def _many_members(count: int) -> bytes:
    """A tar.gz of `count` empty members (listing them all is the work), compressed as one block."""
    import gzip

    return gzip.compress(tarfile.TarInfo("d/x.txt").tobuf() * count, compresslevel=6)
