"""`make bench`: in ONE run on one private Redis, req/s and p50/p99 of

  bare aiohttp · verify only (parse + crypto.verify) · floor (verify + one Redis script) ·
  our app's free route · our app's paid route (a pre-signed BitTransfer per request, pay-first),

then the paid route rate-limited at half its peak (p99 at a steady rate), on 2 processes sharing the port
(what `serve --workers 2` does), and the server CPU per paid call split by stage. Load comes from `wrk`
(C, one thread, a Lua script feeding the transfers: bench/feed.lua) when it is installed, else from
bench/load.py (Python, a weaker generator: the table then says so). After every paid run the books are
checked: each capture in the journal is a distinct transfer, revenue grew by exactly price x captures,
no hold is left pending, every 200 the client saw is among the captures, and `reconcile` is ok.
`--memory SECONDS`: a steady paid run instead, sampling Redis used_memory (see memory_mode)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import redis as sync_redis  # noqa: E402

from service.client import PaidSession, Wallet, transfer_headers  # noqa: E402
from service.redis_server import PrivateRedis, free_port  # noqa: E402

ADMIN = "bench-admin"
PREFIX = "bench"
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
WRK = shutil.which("wrk")


# --- processes and their CPU ------------------------------------------------------------------------------
def start(mode: str, port: int, env: dict[str, str], reuse: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "bench" / "server.py"), mode, "--port", str(port)]
    return subprocess.Popen(cmd + (["--reuse-port"] if reuse else []), env=env, stdout=subprocess.DEVNULL,
                            stderr=sys.stderr)


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU of these processes so far (from /proc, clock ticks)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def redis_cpu(r: sync_redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(400):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


# --- one load run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    requests: int = 0
    seconds: float = 0.0
    ok: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    generator: str = ""
    gen_cpu: float = 0.0       # seconds of CPU the load generator used
    server_cpu: float = 0.0    # seconds of CPU of the server process(es)
    redis_cpu: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def share(self, cpu: float) -> float:
        """CPU seconds as a share of the machine (all cores) over this run."""
        return cpu / (self.seconds * CORES) if self.seconds else 0.0

    def us_per_call(self, cpu: float) -> float:
        return cpu / self.ok * 1e6 if self.ok else 0.0


def load(name: str, url: str, seconds: float, connections: int, server_pids: list[int], r: sync_redis.Redis,
         tsv: Path | None = None, first: int = 1, delay_ms: int = 0, python: bool = False, wrap: bool = False) -> Run:
    """Closed loop (or paced: `delay_ms` before each request on each connection) for `seconds`."""
    run = Run(name)
    s0, r0, g0 = cpu_seconds(server_pids), redis_cpu(r), resource.getrusage(resource.RUSAGE_CHILDREN)
    if WRK and not python:
        cmd = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s",
               str(ROOT / "bench" / "feed.lua"), url, "--", str(tsv) if tsv else "-", str(first), str(delay_ms), "1"] + (["wrap"] if wrap else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        data = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))
        run.generator = "wrk -t1"
        run.requests, run.seconds = data["requests"], data["duration_us"] / 1e6
        run.non2xx = data["non2xx"]
        run.socket_errors = sum(data[k] for k in ("connect", "read", "write", "timeout"))
        run.p50_ms, run.p99_ms = data["p50_us"] / 1000, data["p99_us"] / 1000
    else:
        cmd = [sys.executable, str(ROOT / "bench" / "load.py"), url, "--seconds", str(seconds),
               "--concurrency", str(connections), "--first", str(first), "--delay-ms", str(delay_ms)]
        if tsv:
            cmd += ["--tsv", str(tsv)] + (["--wrap"] if wrap else [])
        data = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        run.generator = "python bench/load.py"
        run.requests, run.seconds = data["requests"], data["seconds"]
        run.non2xx = sum(n for status, n in data["statuses"].items() if not 200 <= int(status) < 300)
        run.p50_ms, run.p99_ms = data["p50_ms"], data["p99_ms"]
    g1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.gen_cpu = (g1.ru_utime - g0.ru_utime) + (g1.ru_stime - g0.ru_stime)
    run.server_cpu = cpu_seconds(server_pids) - s0
    run.redis_cpu = redis_cpu(r) - r0
    run.ok = run.requests - run.non2xx
    return run


# --- payers and their pre-signed transfers -----------------------------------------------------------------
class Transfers:
    """A TSV of pre-signed transfers; each line is sent once; `take(n)` hands out the next n lines."""

    def __init__(self, path: Path, wallets: list[Wallet], price: int, payee: str, address: str, url: str) -> None:
        self.path, self.wallets, self.price, self.payee, self.address, self.url = path, wallets, price, payee, address, url
        self.signed = 0
        self.next = 1  # first unused line (1-based, as feed.lua counts)

    def take(self, n: int) -> int:
        """Sign up to n more (signing is the client's cost, done before the run); returns the first line."""
        missing = self.next + n - 1 - self.signed
        if missing > 0:
            with self.path.open("a") as f:
                for i in range(missing):
                    w = self.wallets[(self.signed + i) % len(self.wallets)]
                    h = transfer_headers(w, amount=self.price, payee_username=self.payee,
                                         payee_address=self.address, url=self.url)
                    f.write(f"{h['Bitcoin-Transfer']}\t{h['Authorization']}\n")
            self.signed += missing
        first, self.next = self.next, self.next + n
        return first


async def prepare_payers(base: str, accounts: int, funds: int) -> tuple[list[Wallet], int, str, str]:
    wallets = [Wallet.generate(f"bench{uuid.uuid4().hex[:10]}") for _ in range(accounts)]
    async with aiohttp.ClientSession() as http:
        for w in wallets:
            async with PaidSession(w, max_price=0, session=http) as s:
                await s.register(base)
            async with http.post(f"{base}/v1/admin/credits", headers={"Authorization": f"Bearer {ADMIN}"},
                                 json={"username": w.username, "amount": funds, "reason": "bench"}) as r:
                assert r.status == 201, await r.text()
        async with http.get(f"{base}/bench/paid") as r:
            return wallets, int(r.headers["Price"]), r.headers["Username"], r.headers["Bitcoin-Address"]


# --- the books after a paid run -----------------------------------------------------------------------------
class Books:
    """Reads the ledger's journal and revenue around a run: every served call charged exactly once."""

    def __init__(self, r: sync_redis.Redis, price: int, env: dict[str, str]) -> None:
        self.r, self.price, self.env = r, price, env
        self.journal, self.revenue = "{" + PREFIX + "}:journal", "{" + PREFIX + "}:acct:sys:revenue"
        self.pending = "{" + PREFIX + "}:pending"

    def mark(self) -> tuple[str, int]:
        """(journal's last id, revenue) read atomically (one MULTI)."""
        with self.r.pipeline(transaction=True) as pipe:
            last, revenue = pipe.xrevrange(self.journal, count=1).hget(self.revenue, "cp").execute()
        return (last[0][0] if last else "0-0"), int(revenue or 0)

    def settled(self) -> tuple[str, int]:
        """Wait (up to 10 s) until no hold is pending and nothing moved for 0.5 s: calls the client gave up
        on may still be queued in the server; then the mark."""
        seen, quiet = self.mark(), 0.0
        for _ in range(100):
            time.sleep(0.1)
            now = self.mark()
            quiet = quiet + 0.1 if now == seen and not self.r.zcard(self.pending) else 0.0
            if quiet >= 0.5:
                break
            seen = now
        return seen

    def check(self, run: Run, since: tuple[str, int], connections: int, journal: bool = True) -> bool:
        """journal=False when entries may have moved to the archive meanwhile: revenue and reconcile only."""
        until = self.settled()
        ops: dict[str, int] = {}
        captured: set[str] = set()
        captures = 0
        start = "(" + since[0]
        while journal:
            rows = self.r.xrange(self.journal, start, until[0], count=5000)
            for entry_id, e in rows:
                ops[e["op"]] = ops.get(e["op"], 0) + 1
                if e["op"] == "capture":
                    captures += 1
                    captured.add(e["id"])
            if len(rows) < 5000:
                break
            start = "(" + rows[-1][0]
        revenue = until[1] - since[1]
        if not journal:
            captures = revenue // self.price
            captured = set(range(captures))
        rec = subprocess.run([sys.executable, "-m", "service", "reconcile"], cwd=ROOT, env=self.env,
                             capture_output=True, text=True)
        reconcile = json.loads(rec.stdout)
        pending = self.r.zcard(self.pending)
        in_flight = captures - run.ok  # captured after the client stopped reading (at most one per connection)
        good = (run.ok > 0 and run.non2xx == 0 and run.socket_errors == 0 and captures == len(captured) and revenue == self.price * captures and not pending
                and 0 <= in_flight <= connections and ops.get("void", 0) == 0 and reconcile["ok"])
        run.notes.append(f"books: {captures} captures of {len(captured)} distinct transfers, revenue "
                         f"+{revenue} sat = {self.price} x {revenue // self.price}, {run.ok} OK answers seen + "
                         f"{in_flight} finished after the client stopped, {ops.get('void', 0)} voids, "
                         f"{pending} holds pending, reconcile ok={reconcile['ok']} -> "
                         + ("every served call charged exactly once" if good else "MISMATCH"))
        return good


# --- the report -------------------------------------------------------------------------------------------
def row(run: Run, bare: float) -> str:
    return (f"{run.name:34} {run.rps:>8.0f} {run.rps / bare if bare else 0:>6.2f} {run.p50_ms:>7.2f} {run.p99_ms:>7.2f}"
            f" {run.us_per_call(run.server_cpu):>7.0f} {run.us_per_call(run.redis_cpu):>6.0f}"
            f" {run.share(run.gen_cpu):>5.0%} {run.share(run.server_cpu):>5.0%} {run.share(run.redis_cpu):>5.0%}"
            f"  {run.ok} ok, {run.non2xx} non-2xx, {run.socket_errors} socket errors")


HEADER = (f"{'target':34} {'req/s':>8} {'xbare':>6} {'p50 ms':>7} {'p99 ms':>7} {'srv us':>7} {'rds us':>6}"
          f" {'gen':>5} {'srv':>5} {'rds':>5}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--python-load", action="store_true", help="use bench/load.py even when wrk is installed")
    p.add_argument("--memory", type=float, metavar="SECONDS", help="memory mode: a steady paid run this long")
    p.add_argument("--rate", type=int, default=50, help="memory mode: paid calls/s")
    args = p.parse_args()
    py = args.python_load or not WRK
    tmp = Path(tempfile.mkdtemp(prefix="microtasks-bench-"))
    redis = PrivateRedis(tmp / "redis", port=free_port()).start()
    r = sync_redis.Redis.from_url(redis.url, decode_responses=True)
    env = {**os.environ, "REDIS_URL": redis.url, "ADMIN_TOKEN": ADMIN, "LOG_LEVEL": "warning",
           "REDIS_PREFIX": PREFIX, "QA_WORKERS": "0",
           # limits stay on (their Redis call is part of the cost) but one loopback client must not hit them
           "RATE_LIMIT_IP_PER_MINUTE": "100000000", "RATE_LIMIT_ACCOUNT_PER_MINUTE": "100000000",
           "MICROTASKS_VAR": str(tmp / "var"), **(MEMORY_ENV if args.memory else {})}
    ports = {m: free_port() for m in ("bare", "verify", "floor", "app", "app2")}
    procs = {m: [start(m, ports[m], env)] for m in ("bare", "verify", "floor", "app")}
    procs["app2"] = [start("app", ports["app2"], env, reuse=True) for _ in range(2)]
    url = {m: f"http://127.0.0.1:{port}" for m, port in ports.items()}
    pids = {m: [proc.pid for proc in ps] for m, ps in procs.items()}
    c, secs = args.connections, args.seconds
    try:
        for m in ("bare", "verify"):
            asyncio.run(wait_up(f"{url[m]}/bench/" + ("free" if m == "bare" else "paid")))
        for m in ("app", "app2"):
            asyncio.run(wait_up(f"{url[m]}/readyz"))
        asyncio.run(wait_up(f"{url['floor']}/"))
        wallets, price, payee, address = asyncio.run(prepare_payers(url["app"], accounts=5 if args.memory else 50,
                                                                    funds=10**12))
        for w in wallets:  # the floor's own balances, in its own keys
            r.hset(f"benchfloor:bal:{w.username}", "b", 10**12)
        transfers = Transfers(tmp / "transfers.tsv", wallets, price, payee, address, f"{url['app']}/bench/paid")
        books = Books(r, price, env)
        if args.memory:
            sys.exit(0 if memory_mode(args, r, url["app"], transfers, books) else 1)
        t0 = time.perf_counter()
        first = transfers.take(int(secs * 7000))  # more than the floor or the paid route serves here
        print(f"pre-signed {transfers.signed} transfers in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        load("warm-up", f"{url['app']}/bench/free", 1, c, pids["app"], r, python=py)
        runs = [load("bare aiohttp (trivial JSON)", f"{url['bare']}/bench/free", secs, c, pids["bare"], r, python=py),
                load("verify only (parse + verify)", f"{url['verify']}/bench/paid", secs, c, pids["verify"], r,
                     transfers.path, first, python=py, wrap=True),
                load("floor (verify + 1 Redis script)", f"{url['floor']}/bench/paid", secs, c, pids["floor"], r,
                     transfers.path, first, python=py),
                load("app, free route", f"{url['app']}/bench/free", secs, c, pids["app"], r, python=py)]
        mark = books.mark()
        paid = load("app, paid route", f"{url['app']}/bench/paid", secs, c, pids["app"], r, transfers.path, first,
                    python=py)
        ok = books.check(paid, mark, c)
        transfers.next = first + paid.requests + c
        runs.append(paid)
        # paced: half the peak paid rate, spread over fewer connections with a fixed delay between requests
        half, paced_c = paid.rps / 2, 16
        delay = max(1, round(paced_c / half * 1000)) if half else 1000
        mark = books.mark()
        paced = load(f"app, paid, paced ~{paced_c / delay * 1000:.0f}/s", f"{url['app']}/bench/paid", secs, paced_c,
                     pids["app"], r, transfers.path, transfers.take(int(secs * half * 1.5) + paced_c), delay, python=py)
        ok &= books.check(paced, mark, paced_c)
        runs.append(paced)
        transfers2 = Transfers(tmp / "transfers2.tsv", wallets, price, payee, address, f"{url['app2']}/bench/paid")
        first2 = transfers2.take(int(secs * paid.rps * 2.5) + c)  # its own URL: a transfer names its deployment
        mark = books.mark()
        two = load("app, paid route, 2 processes", f"{url['app2']}/bench/paid", secs, c, pids["app2"], r,
                   transfers2.path, first2, python=py)
        ok &= books.check(two, mark, c)
        runs.append(two)
    finally:
        for ps in procs.values():
            for proc in ps:
                proc.terminate()
        for ps in procs.values():
            for proc in ps:
                proc.wait()
        redis.stop()
    report(runs, c, secs, ok)
    sys.exit(0 if ok else 1)


def report(runs: list[Run], c: int, secs: float, ok: bool) -> None:
    bare, verify, floor, free, paid, paced, two = runs
    print(f"load generator: {bare.generator}, {c} connections, {secs:g} s per target; {CORES} cores; one run, "
          f"same Redis. srv/rds us = server/Redis CPU per OK answer; gen/srv/rds = share of all cores")
    if bare.generator.startswith("python"):
        print("NOTE: Python load generator (wrk not installed, or --python-load): it, not the server, may be the limit")
    print(HEADER)
    for run in runs:
        print(row(run, bare.rps))
    print(f"ratios: paid/floor {paid.rps / floor.rps:.2f}  paid/bare {paid.rps / bare.rps:.2f}  "
          f"free/bare {free.rps / bare.rps:.2f}  verify/bare {verify.rps / bare.rps:.2f}  "
          f"floor/bare {floor.rps / bare.rps:.2f}  2 processes/1 {two.rps / paid.rps:.2f}")
    print(f"paced run ({paced.generator}: fixed {paced.name.split('~')[-1]} over 16 connections, each waits its delay "
          f"before each request; closed loop per connection, so not corrected for coordinated omission): "
          f"p50 {paced.p50_ms:.2f} ms, p99 {paced.p99_ms:.2f} ms")
    us = {run.name: run.us_per_call(run.server_cpu) for run in runs}
    http, ver, flo, app = (us[bare.name], us[verify.name] - us[bare.name], us[floor.name] - us[verify.name],
                           us[paid.name] - us[floor.name])
    print(f"server CPU per paid call: {us[paid.name]:.0f} us = HTTP (aiohttp, bare) {http:.0f} + verify {ver:.0f} "
          f"+ Redis client (floor - verify) {flo:.0f} + ours (paid - floor) {app:.0f}; Redis server "
          f"{paid.us_per_call(paid.redis_cpu):.0f} us per paid call (floor: {floor.us_per_call(floor.redis_cpu):.0f})")
    redis_us = paid.us_per_call(paid.redis_cpu)
    if redis_us:
        print(f"one Redis (single-threaded) saturates at ~1e6 / {redis_us:.0f} us = {1e6 / redis_us:,.0f} paid calls/s "
              f"at this run's Redis CPU per paid call (floor's one script: {1e6 / max(1.0, floor.us_per_call(floor.redis_cpu)):,.0f}/s)")
    print(f"2 processes: {two.rps:.0f} req/s = {two.rps / paid.rps:.2f}x one; during it the load generator used "
          f"{two.share(two.gen_cpu):.0%}, the servers {two.share(two.server_cpu):.0%}, Redis "
          f"{two.share(two.redis_cpu):.0%} of the {CORES} cores")
    for run in (paid, paced, two):
        for note in run.notes:
            print(f"{run.name}: {note}")
    print("RESULT: " + ("books exact after every paid run" if ok else "MISMATCH in the books"))


MEMORY_ENV = {"TRANSFER_WINDOW": "15", "HOLD_TIMEOUT": "15", "JOURNAL_ARCHIVE_AFTER": "10"}


def memory_mode(args: argparse.Namespace, r: sync_redis.Redis, url: str, transfers: Transfers, books: Books) -> bool:
    """A steady paid run at --rate calls/s for --memory seconds (signed on the fly, paced open loop), with
    short windows (MEMORY_ENV) so that every per-call record reaches its steady state within ~90 s: replay
    records expire (window + margin), kept responses expire (hold timeout), the journal moves to the archive
    (JOURNAL_ARCHIVE_AFTER), per-user histories stay at their last 1000. Prints used_memory over time and
    its growth over the second half of the run (the first half is the warm-up)."""
    samples: list[tuple[float, int]] = []
    statuses: dict[int, int] = {}

    async def run() -> None:
        started = time.monotonic()
        interval = 1 / args.rate
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            async def one(i: int) -> None:
                w = transfers.wallets[i % len(transfers.wallets)]
                h = transfer_headers(w, amount=transfers.price, payee_username=transfers.payee,
                                     payee_address=transfers.address, url=transfers.url)
                async with http.get(f"{url}/bench/paid", headers=h) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1

            pending: set[asyncio.Task] = set()
            i, next_sample = 0, 0.0
            while (now := time.monotonic() - started) < args.memory:
                if now >= next_sample:
                    samples.append((now, int(r.info("memory")["used_memory"])))
                    next_sample += 5
                task = asyncio.create_task(one(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
                i += 1
                await asyncio.sleep(max(0.0, started + i * interval - time.monotonic()))
            await asyncio.gather(*pending)
            samples.append((time.monotonic() - started, int(r.info("memory")["used_memory"])))

    mark = books.mark()
    asyncio.run(run())
    served = statuses.get(200, 0)
    run_ = Run("memory", requests=sum(statuses.values()), ok=served, non2xx=sum(statuses.values()) - served)
    ok = books.check(run_, mark, 0, journal=False)
    print(f"memory mode: {args.rate} paid calls/s for {args.memory:g} s (Python open-loop generator signing each "
          f"transfer), {len(transfers.wallets)} payers, {MEMORY_ENV}; statuses {statuses}")
    for t, used in samples:
        print(f"  t={t:6.1f} s  used_memory={used / 1e6:8.3f} MB")
    # steady state: the mean of the third quarter against the mean of the last (the final sample, taken
    # after the load stopped, is left out); single samples jitter with the allocator and the archive's batches
    third = [used for t, used in samples[:-1] if args.memory / 2 <= t < args.memory * 3 / 4]
    last = [used for t, used in samples[:-1] if t >= args.memory * 3 / 4]
    growth = (sum(last) / len(last) - sum(third) / len(third)) / (sum(third) / len(third)) if third and last else 0.0
    keys = r.dbsize()
    print(f"growth, mean of the last quarter against the third (the first half is the warm-up): {growth:+.1%} ({'flat' if abs(growth) < 0.05 else 'NOT flat'}"
          f", limit 5 %); {keys} keys, journal stream {r.xlen('{' + PREFIX + '}:journal')} entries")
    for note in run_.notes:
        print(note)
    return ok and abs(growth) < 0.05


if __name__ == "__main__":
    main()
