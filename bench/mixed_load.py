"""`make load`: a mix of free, 402 and paid calls (with client retries of the same signed transfer) from
many accounts, against 2 server processes sharing one port (SO_REUSEPORT) and one Redis, for a fixed time;
then it settles the books: every account's balance against the calls it was served, and a reconcile.

Loopback only; bounded in time (--seconds) and in count (the pre-signed transfers). The load generator
runs in its own process (`--generate`), so the servers get both cores' worth of contention honestly.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from service.client import PaidSession, Wallet, transfer_headers  # noqa: E402
from service.redis_server import PrivateRedis, free_port  # noqa: E402

ADMIN = "load-admin"
MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: load}\n"
FUNDS = 1_000_000
MIX = {"free": 0.3, "unpaid": 0.2, "paid": 0.5}
RETRY_SHARE = 0.05  # of paid calls, re-sent at once with the same transfer (a client retrying)


# --- the load generator (its own process) -------------------------------------------------------------------
async def generate(base: str, seconds: float, concurrency: int, transfers: list[dict]) -> dict:
    rng = random.Random(7)
    pending = iter(transfers)
    lat: dict[str, list[float]] = {k: [] for k in (*MIX, "retry")}
    statuses: dict[str, dict[int, int]] = {k: {} for k in lat}
    served: dict[str, int] = {}       # transfer → how many 200s it got that were not replays (must be ≤ 1)
    replays = 0                       # retries answered with the first result (Idempotent-Replayed: true)
    payer_of: dict[str, str] = {}
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one(session: aiohttp.ClientSession, kind: str, method: str, url: str, **kw) -> int:
        nonlocal errors, replays
        t0 = time.perf_counter()
        try:
            async with session.request(method, url, **kw) as r:
                await r.read()
                status = r.status
                replayed = r.headers.get("Idempotent-Replayed") == "true"
        except aiohttp.ClientError:
            errors += 1
            return -1
        lat[kind].append(time.perf_counter() - t0)
        statuses[kind][status] = statuses[kind].get(status, 0) + 1
        if replayed:  # the first call's stored result, not charged again: not a second settlement
            replays += 1
            return 0
        return status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker() -> None:
            while time.perf_counter() < deadline:
                kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
                if kind == "free":
                    await one(session, kind, "GET", f"{base}/v1/catalog")
                elif kind == "unpaid":
                    await one(session, kind, "POST", f"{base}/v1/qa/validate", data=MANIFEST)
                else:
                    item = next(pending, None)
                    if item is None:
                        return
                    payer, headers = item["payer"], item["headers"]
                    tid = headers["Bitcoin-Transfer"]
                    payer_of[tid] = payer
                    tries = 2 if rng.random() < RETRY_SHARE else 1
                    for attempt in range(tries):
                        status = await one(session, "retry" if attempt else kind, "POST", f"{base}/v1/qa/validate",
                                           data=MANIFEST, headers=headers)
                        served[tid] = served.get(tid, 0) + (status == 200)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started

    def summary(values: list[float]) -> dict:
        values.sort()
        q = statistics.quantiles(values, n=100) if len(values) > 2 else [0.0] * 99
        return {"count": len(values), "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}

    per_payer: dict[str, int] = {}
    for tid, n in served.items():
        per_payer[payer_of[tid]] = per_payer.get(payer_of[tid], 0) + min(n, 1)
    every = [v for values in lat.values() for v in values]
    return {"seconds": round(elapsed, 3), "requests": len(every), "rps": round(len(every) / elapsed, 1),
            "all": summary(every), "kinds": {k: {**summary(v), "statuses": statuses[k]} for k, v in lat.items()},
            "errors": errors, "served_per_payer": per_payer,
            "served_twice": sum(1 for n in served.values() if n > 1), "replays": replays}


# --- the orchestrator -----------------------------------------------------------------------------------
async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


async def prepare(base: str, accounts: int, transfers: int) -> tuple[list[Wallet], list[dict]]:
    wallets = [Wallet.generate(f"load{uuid.uuid4().hex[:10]}") for _ in range(accounts)]
    async with aiohttp.ClientSession() as http:
        for w in wallets:
            async with PaidSession(w, max_price=0, session=http) as s:
                status, _ = await s.register(base)
                assert status == 201
            async with http.post(f"{base}/v1/admin/credits", headers={"Authorization": f"Bearer {ADMIN}"},
                                 json={"username": w.username, "amount": FUNDS, "reason": "load"}) as r:
                assert r.status == 201
        async with http.post(f"{base}/v1/qa/validate", data=MANIFEST) as r:
            price, payee, address = int(r.headers["Price"]), r.headers["Username"], r.headers["Bitcoin-Address"]
    signed = [{"payer": wallets[i % accounts].username,
               "headers": transfer_headers(wallets[i % accounts], amount=price, payee_username=payee,
                                           payee_address=address, url=f"{base}/v1/qa/validate")}
              for i in range(transfers)]
    return wallets, [{"price": price}, *signed]


async def balances(base: str, wallets: list[Wallet]) -> dict[str, tuple[int, int]]:
    out = {}
    async with aiohttp.ClientSession() as http:
        for w in wallets:
            async with PaidSession(w, session=http) as s:
                status, body = await s.signed_get(f"{base}/v1/accounts/me")
                assert status == 200, body
                out[w.username] = (body["balance"], body.get("pending", 0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--generate", help=argparse.SUPPRESS)  # internal: run as the load generator
    args = p.parse_args()
    if args.generate:
        work = json.loads(Path(args.generate).read_text())
        result = asyncio.run(generate(work["base"], args.seconds, args.concurrency, work["transfers"]))
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="microtasks-load-"))
    redis = PrivateRedis(tmp / "redis", port=free_port(), appendfsync="always").start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis.url, "ADMIN_TOKEN": ADMIN, "LOG_LEVEL": "warning", "PORT": str(port),
           "REDIS_PREFIX": "load", "MICROTASKS_VAR": str(tmp / "var"), "QA_WORKERS": "0",
           "RATE_LIMIT_IP_PER_MINUTE": "100000000", "RATE_LIMIT_ACCOUNT_PER_MINUTE": "100000000"}
    servers = [subprocess.Popen([sys.executable, "-m", "service", "serve", "--reuse-port"], cwd=ROOT, env=env,
                                stderr=(tmp / f"server-{i}.log").open("w"))
               for i in range(args.servers)]
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base))
        time.sleep(1)  # every process bound and bootstrapped
        budget = int(args.seconds * 6000 * MIX["paid"])  # more than the servers can take in the time
        wallets, signed = asyncio.run(prepare(base, args.accounts, budget))
        price = signed[0]["price"]
        (tmp / "work.json").write_text(json.dumps({"base": base, "transfers": signed[1:]}))
        gen = subprocess.run([sys.executable, __file__, "--generate", str(tmp / "work.json"),
                              "--seconds", str(args.seconds), "--concurrency", str(args.concurrency)],
                             capture_output=True, text=True, check=True)
        result = json.loads(gen.stdout)
        time.sleep(0.5)
        books = asyncio.run(balances(base, wallets))
        rec = subprocess.run([sys.executable, "-m", "service", "reconcile"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        reconcile = json.loads(rec.stdout)
        alive = sum(1 for s in servers if s.poll() is None)
    finally:
        for s in servers:
            s.terminate()
            s.wait(30)
        redis.stop()

    lost = overcharged = 0
    for username, (balance, pending) in books.items():
        expected = FUNDS - price * result["served_per_payer"].get(username, 0)
        lost += max(0, balance - expected)          # served without being charged
        overcharged += max(0, expected - balance)   # charged without being served (or twice)
    print(f"{args.servers} server processes on one port (SO_REUSEPORT, {alive} alive at the end), one Redis "
          f"(AOF always), {args.accounts} accounts, {args.concurrency} connections, {result['seconds']} s")
    print(f"{'kind':8} {'count':>7} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for kind, k in result["kinds"].items():
        print(f"{kind:8} {k['count']:>7} {k['p50_ms']:>8.2f} {k['p99_ms']:>8.2f}  {k['statuses']}")
    total = result["all"]
    bad = sum(n for k in result["kinds"].values() for s, n in k["statuses"].items() if int(s) >= 500)
    print(f"all      {total['count']:>7} {total['p50_ms']:>8.2f} {total['p99_ms']:>8.2f}  "
          f"{result['rps']} req/s; 5xx: {bad / max(1, total['count']):.2%}; connection errors: {result['errors']}")
    print(f"books: {lost} sat served unpaid, {overcharged} sat charged for nothing, "
          f"{result['served_twice']} transfers settled twice, {result['replays']} retries answered with the "
          "first result (Idempotent-Replayed)")
    print(f"reconcile: ok={reconcile['ok']} journal_entries={reconcile['journal_entries']} "
          f"sum_of_balances={reconcile['sum_of_balances']}")
    clean = not lost and not overcharged and not result["served_twice"] and reconcile["ok"]
    print("RESULT: " + ("0 sat lost, 0 double charges" if clean else "MISMATCH"))
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
