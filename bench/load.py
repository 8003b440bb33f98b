"""The Python fallback load generator (separate process) when wrk is not installed: N closed-loop workers
for a fixed duration, optionally paced (a delay before each request), optionally one pre-signed transfer
per request from a TSV of "Bitcoin-Transfer<TAB>Authorization" lines (as bench/feed.lua reads them)."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp


async def run(url: str, seconds: float, concurrency: int, headers: list[dict[str, str]], delay: float = 0.0) -> dict:
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
                if delay:
                    await asyncio.sleep(delay)
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
    p.add_argument("--tsv", help="pre-signed transfers, one per line: Bitcoin-Transfer<TAB>Authorization")
    p.add_argument("--first", type=int, default=1, help="first line of --tsv to send (1-based)")
    p.add_argument("--wrap", action="store_true", help="send the transfers again from the first when all are sent")
    p.add_argument("--delay-ms", type=int, default=0, help="pause before each request on each connection")
    args = p.parse_args()
    headers = []
    if args.tsv:
        with open(args.tsv) as f:
            for n, line in enumerate(f, 1):
                if n >= args.first:
                    transfer, signature = line.rstrip("\n").split("\t")
                    headers.append({"Bitcoin-Transfer": transfer, "Authorization": signature})
    if args.wrap:
        headers = headers * 50
    result = asyncio.run(run(args.url, args.seconds, args.concurrency, headers, args.delay_ms / 1000))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
