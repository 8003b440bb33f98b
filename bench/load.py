"""Closed-loop HTTP load generator (separate process): N workers, fixed duration, optional per-request headers."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp


async def run(url: str, seconds: float, concurrency: int, headers: list[dict[str, str]]) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    next_header = iter(headers) if headers else None
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            while time.perf_counter() < deadline:
                h = None
                if next_header is not None:
                    h = next(next_header, None)
                    if h is None:
                        return
                t0 = time.perf_counter()
                async with session.get(url, headers=h) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 2 else [0] * 99
    return {"requests": len(latencies), "seconds": round(elapsed, 3), "rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2), "statuses": statuses}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--headers-file", help="JSON lines, one header dict per request")
    args = p.parse_args()
    headers = []
    if args.headers_file:
        with open(args.headers_file) as f:
            headers = [json.loads(line) for line in f]
    print(json.dumps(asyncio.run(run(args.url, args.seconds, args.concurrency, headers))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
