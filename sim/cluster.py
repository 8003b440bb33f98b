"""The system under test: a private redis-server (AOF, fsync always) on a loopback port and N real
`python -m service serve` processes on their own loopback ports, each of which can be killed and restarted."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from service.keys import Keys
from service.redis_server import PrivateRedis, _die_with_parent, free_port

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "sim-admin-token"
PREFIX = "sim"
KEYS = Keys(PREFIX)  # the deployment's Redis keys, for the checks that read Redis directly
PUBLIC_URL = "http://sim.example"  # the deployment's origin: its server processes sit behind one name
# The operator's chain settings for the CLI (withdrawals cancel): BIP32 test vector 1, testnet only.
CLI_XPUB = "vpub5ZLGTz7QcWzdeJFSy1Qh9gJKn4UmCH8f3syfXGbhz8vRTwgPeR7Q1M1kjcotbk2uLiv4umtEnTVb3XQvof36fhx5CUJaHX9EphBFzYnveQW"


class ServerProc:
    """One server process on its own port; `kill` and `start` again keep the port."""

    def __init__(self, tmp: Path, env: dict[str, str], index: int, cmd: list[str] | None = None) -> None:
        self.cmd = cmd or [sys.executable, "-m", "service", "serve"]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp, self.env, self.index = tmp, env, index
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.tmp / f"server-{self.index}.log").open("a")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env={**self.env, "PORT": str(self.port)}, stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)  # never outlive the sim

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """Redis + servers for one simulation run (a fresh directory, so a replay starts from nothing)."""

    def __init__(self, tmp: Path, *, servers: int = 2, hold_timeout: int = 4, redis_timeout_ms: int = 500,
                 minimum_withdrawal: int = 1000, workers: int = 0) -> None:
        self.tmp = tmp
        self.hold_timeout = hold_timeout
        self.redis_timeout = redis_timeout_ms / 1000
        self.redis = PrivateRedis(tmp / "redis", port=free_port(), appendfsync="always")
        self.env = {**os.environ, "REDIS_URL": self.redis.url, "REDIS_PREFIX": PREFIX, "ADMIN_TOKEN": ADMIN,
                    "INVOICE_SECRET": "sim", "MICROTASKS_VAR": str(tmp / "var"), "QA_WORKERS": "0",
                    "HOLD_TIMEOUT": str(hold_timeout), "REDIS_TIMEOUT_MS": str(redis_timeout_ms),
                    "LOG_LEVEL": "warning", "RATE_LIMIT_IP_PER_MINUTE": "0", "RATE_LIMIT_ACCOUNT_PER_MINUTE": "0",
                    "MINIMUM_WITHDRAWAL": str(minimum_withdrawal), "PYTHONPATH": str(ROOT),
                    "PUBLIC_URL": PUBLIC_URL}
        self.servers = [ServerProc(tmp, self.env, i) for i in range(servers)]
        worker_env = {**self.env, "QA_LEASE": "1", "QA_MAX_ATTEMPTS": "2", "SIM_SECONDS_PER_DOCUMENT": "0.01"}
        self.workers = [ServerProc(tmp, worker_env, 100 + i, [sys.executable, str(ROOT / "sim" / "worker.py")])
                        for i in range(workers)]
        self.admin: aioredis.Redis | None = None

    async def start(self) -> None:
        self.redis.start()
        for s in self.servers + self.workers:
            s.start()
        self.admin = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
        await self.wait_ready()

    async def wait_ready(self, timeout: float = 30) -> None:
        """Every server answers /readyz 200 (it reaches Redis)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            for s in self.servers:
                while True:
                    if not s.alive:
                        raise RuntimeError(f"server {s.index} exited: {self.server_log(s)[-2000:]}")
                    try:
                        async with http.get(f"{s.url}/readyz") as r:
                            if r.status == 200:
                                break
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server {s.index} never became ready: {self.server_log(s)[-2000:]}")
                    await asyncio.sleep(0.05)

    def server_log(self, s: ServerProc) -> str:
        path = self.tmp / f"server-{s.index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def redis_restart(self, sig: int, down_seconds: float = 0.0) -> None:
        self.redis.stop(sig)
        if down_seconds:
            await asyncio.sleep(down_seconds)
        self.redis.start()
        await self.reconnect()

    async def reconnect(self) -> None:
        """A fresh admin connection (the old one died with the Redis process)."""
        if self.admin is not None:
            try:
                await self.admin.aclose()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self.admin = aioredis.Redis.from_url(self.redis.url, decode_responses=True)

    async def redis_pause(self, ms: int) -> None:
        """CLIENT PAUSE ALL: every command of every client waits (as a Redis blocked by a slow script)."""
        assert self.admin is not None
        await self.admin.execute_command("CLIENT", "PAUSE", str(ms), "ALL")

    async def redis_busy(self, ms: int) -> None:
        """A Lua script that spins for `ms` (a slow script): commands sent meanwhile run after it, even
        when their client gave up waiting (unlike CLIENT PAUSE, whose queued commands die with the client)."""
        spin = ("local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] "
                "while true do local n = redis.call('TIME') "
                "if n[1] * 1000000 + n[2] - start > tonumber(ARGV[1]) then return 1 end end")
        busy = aioredis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            await busy.eval(spin, 0, ms * 1000)
        finally:
            await busy.aclose()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """The operator's `python -m service ...`, against this cluster's Redis (chain commands get an
        xpub and an Esplora URL nobody answers: cancel never touches the chain)."""
        env = {**self.env, "PAYEE_XPUB": CLI_XPUB, "CHAIN": "esplora", "CHAIN_URL": "http://127.0.0.1:9"}
        return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    def reconcile(self) -> tuple[int, dict[str, Any] | None, str]:
        run = self.cli("reconcile")
        try:
            report = json.loads(run.stdout)
        except ValueError:
            report = None
        return run.returncode, report, run.stdout + run.stderr

    async def stop(self) -> None:
        for s in self.servers + self.workers:
            s.stop()
        if self.admin is not None:
            try:
                await self.admin.aclose()
            except Exception:  # noqa: BLE001 - Redis may be down already
                pass
        self.redis.stop()
