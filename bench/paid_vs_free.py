"""`make bench`: requests/s and p50/p99 of a bare aiohttp route, our app's free route, and the same route
priced and paid with pre-signed BitTransfers (pay-first, one round trip), in one run on a private Redis.
The load generator runs in its own process. Prints a table and the ratio paid / free."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
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

ADMIN = "bench-admin"


def start(mode: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "bench" / "server.py"), mode, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def load(url: str, seconds: float, concurrency: int, headers_file: str | None = None) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), url, "--seconds", str(seconds),
           "--concurrency", str(concurrency)]
    if headers_file:
        cmd += ["--headers-file", headers_file]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


async def prepare_payers(base: str, accounts: int, transfers: int, path: Path) -> None:
    """Register and fund accounts, then pre-sign one transfer per request (signing is the client's cost)."""
    wallets = [Wallet.generate(f"bench{uuid.uuid4().hex[:10]}") for _ in range(accounts)]
    async with aiohttp.ClientSession() as http:
        for w in wallets:
            async with PaidSession(w, max_price=0, session=http) as s:
                await s.register(base)
            async with http.post(f"{base}/v1/admin/credits", headers={"Authorization": f"Bearer {ADMIN}"},
                                 json={"username": w.username, "amount": 10 * transfers, "reason": "bench"}) as r:
                assert r.status == 201
        async with http.get(f"{base}/bench/paid") as r:
            price, payee, address = int(r.headers["Price"]), r.headers["Username"], r.headers["Bitcoin-Address"]
    with path.open("w") as f:
        for i in range(transfers):
            h = transfer_headers(wallets[i % accounts], amount=price, payee_username=payee, payee_address=address,
                                 url=f"{base}/bench/paid")
            f.write(json.dumps(h) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="microtasks-bench-"))
    redis = PrivateRedis(tmp / "redis", port=free_port()).start()
    env = {**os.environ, "REDIS_URL": redis.url, "ADMIN_TOKEN": ADMIN, "LOG_LEVEL": "warning",
           "REDIS_PREFIX": "bench",
           # limits stay on (their Redis call is part of the cost) but one loopback client must not hit them
           "RATE_LIMIT_IP_PER_MINUTE": "100000000", "RATE_LIMIT_ACCOUNT_PER_MINUTE": "100000000", "MICROTASKS_VAR": str(tmp / "var")}
    bare_port, app_port = free_port(), free_port()
    procs = [start("bare", bare_port, env), start("app", app_port, env)]
    try:
        bare, app = f"http://127.0.0.1:{bare_port}", f"http://127.0.0.1:{app_port}"
        asyncio.run(wait_up(f"{bare}/bench/free"))
        asyncio.run(wait_up(f"{app}/readyz"))
        headers_file = tmp / "transfers.jsonl"
        t0 = time.perf_counter()
        asyncio.run(prepare_payers(app, accounts=50, transfers=int(args.seconds * 6000), path=headers_file))
        print(f"pre-signed transfers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        load(f"{app}/bench/free", 1, args.concurrency)  # warm-up
        results = {
            "bare aiohttp (baseline)": load(f"{bare}/bench/free", args.seconds, args.concurrency),
            "app, free route (a)": load(f"{app}/bench/free", args.seconds, args.concurrency),
            "app, paid route (b)": load(f"{app}/bench/paid", args.seconds, args.concurrency, str(headers_file)),
        }
        out = subprocess.run([sys.executable, "-m", "service", "reconcile"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        reconcile = json.loads(out.stdout)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        redis.stop()
    print(f"{'target':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for name, r in results.items():
        print(f"{name:28} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}  {r['statuses']}")
    base = results["bare aiohttp (baseline)"]["rps"]
    a, b = results["app, free route (a)"]["rps"], results["app, paid route (b)"]["rps"]
    print(f"ratio paid/free (b/a): {b / a:.2f}   free/bare: {a / base:.2f}   paid/bare: {b / base:.2f}")
    print(f"reconcile after the run: ok={reconcile['ok']} journal_entries={reconcile['journal_entries']} "
          f"sum_of_balances={reconcile['sum_of_balances']}")


if __name__ == "__main__":
    main()
