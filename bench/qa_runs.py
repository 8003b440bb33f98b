"""`make bench` (part 2): QA runs through ONE worker process for a 50-document bundle: runs/s and the
p50/p99 latency from submission (queued) to done, per suite. Private Redis; server with no embedded worker."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from service.client import PaidSession, Wallet  # noqa: E402
from service.redis_server import PrivateRedis, free_port  # noqa: E402

ADMIN = "bench-admin"
DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{i}, namespace: shop}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web-{i}}}}}
  template:
    metadata: {{labels: {{app: web-{i}}}}}
    spec:
      containers: [{{name: web, image: "nginx:1.27", resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}}}]
"""
BUNDLE = "---\n".join(DEPLOYMENT.format(i=i) for i in range(50))


async def bench(base: str, suite: str, runs: int) -> dict:
    wallet = Wallet.generate(f"qabench{os.urandom(4).hex()}")
    async with aiohttp.ClientSession() as http:
        async with PaidSession(wallet, session=http) as s:
            await s.register(base)
        async with http.post(f"{base}/v1/admin/credits", headers={"Authorization": f"Bearer {ADMIN}"},
                             json={"username": wallet.username, "amount": 10**9, "reason": "bench"}) as r:
            assert r.status == 201
        async with PaidSession(wallet, max_price=10**6, session=http) as s:
            started = time.perf_counter()
            ids = []
            for _ in range(runs):
                status, body, _ = await s.request("POST", f"{base}/v1/qa/runs",
                                                  data=json.dumps({"suite": suite, "manifests": BUNDLE}))
                assert status == 202, body
                ids.append(body["id"])
            submitted = time.perf_counter() - started
            done: dict[str, dict] = {}
            while len(done) < len(ids):
                for run_id in ids:
                    if run_id not in done:
                        _, run = await s.signed_get(f"{base}/v1/qa/runs/{run_id}")
                        if run["status"] in ("passed", "failed", "error"):
                            done[run_id] = run
                await asyncio.sleep(0.2)
    latencies = sorted((r["finished"] - r["created"]) * 1000 for r in done.values())
    span = max(r["finished"] for r in done.values()) - min(r["created"] for r in done.values())
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [latencies[0]] * 99
    return {"suite": suite, "runs": runs, "submit_s": round(submitted, 2), "runs_per_s": round(runs / span, 2),
            "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "run_ms_median": round(statistics.median(r["timings"]["run_ms"] for r in done.values()), 1),
            "statuses": sorted({r["status"] for r in done.values()})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="microtasks-qabench-"))
    redis = PrivateRedis(tmp / "redis", port=free_port()).start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis.url, "ADMIN_TOKEN": ADMIN, "LOG_LEVEL": "warning", "QA_WORKERS": "0",
           "REDIS_PREFIX": "qabench",
           # limits stay on (their Redis call is part of the cost) but one loopback client must not hit them
           "RATE_LIMIT_IP_PER_MINUTE": "100000000", "RATE_LIMIT_ACCOUNT_PER_MINUTE": "100000000", "QA_MAX_ACTIVE": "1000", "MICROTASKS_VAR": str(tmp / "var"), "PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env)
    worker = subprocess.Popen([sys.executable, "-m", "service", "worker"], cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        from paid_vs_free import wait_up  # noqa: PLC0415

        asyncio.run(wait_up(f"{base}/readyz"))
        results = [asyncio.run(bench(base, suite, args.runs)) for suite in ("schema", "policy", "conformance")]
    finally:
        for proc in (server, worker):
            proc.terminate()
            proc.wait()
        redis.stop()
    print(f"\nQA runs through one worker, 50-document bundle, {args.runs} runs submitted back to back:")
    print(f"{'suite':12} {'runs/s':>7} {'queue→done p50 ms':>18} {'p99 ms':>8} {'run ms (median)':>16}  statuses")
    for r in results:
        print(f"{r['suite']:12} {r['runs_per_s']:>7.2f} {r['p50_ms']:>18.1f} {r['p99_ms']:>8.1f} "
              f"{r['run_ms_median']:>16.1f}  {r['statuses']}")


if __name__ == "__main__":
    main()
