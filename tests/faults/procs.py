"""Real server processes for the fault and scale-out tests: start, wait for a probe, stop with a signal."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from service.client import PaidSession, Wallet
from service.ledger import Ledger
from service.redis_server import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
PRICE = 120       # /v1/qa/validate with one document
SLOW_PRICE = 100  # /test/slow: the base price, no documents
ADMIN = "faults-admin"


class Server:
    def __init__(self, tmp: Path, redis_url: str, prefix: str, script: str | None = None, args: tuple[str, ...] = (),
                 **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        full_env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "ADMIN_TOKEN": ADMIN,
                    "INVOICE_SECRET": "faults", "PORT": str(self.port), "MICROTASKS_VAR": str(tmp / "var"),
                    "QA_WORKERS": "0", **env}
        cmd = [sys.executable, script] if script else [sys.executable, "-m", "service", "serve", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    async def wait(self, path: str = "/healthz", status: int = 200, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    async with s.get(f"{self.url}{path}") as r:
                        if r.status == status:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never answered {status}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def register_funded(http, url: str, amount: int) -> Wallet:
    wallet = Wallet.generate(f"f{os.urandom(5).hex()}")
    async with PaidSession(wallet, session=http) as s:
        status, body = await s.register(url)
        assert status == 201, body
    async with http.post(f"{url}/v1/admin/credits", json={"username": wallet.username, "amount": amount,
                                                          "reason": "t"}, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 201, await r.text()
    return wallet


async def ledger_for(url: str, prefix: str) -> tuple[Ledger, aioredis.Redis]:
    r = aioredis.Redis.from_url(url, decode_responses=True)
    return Ledger(r, prefix), r


def reconcile_cli(redis_url: str, prefix: str) -> dict:
    """`python -m service reconcile`, as an operator runs it after an incident: exit 0 and its report."""
    run = subprocess.run([sys.executable, "-m", "service", "reconcile"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix}, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] and report["sum_of_balances"] == 0, report
    return report


class SlowReplies:
    """A TCP proxy in front of Redis whose replies can be held back for `delay` seconds: commands reach
    Redis (and run) at once, their answers arrive after the client's timeout (a slow network, a stalled
    reader). With `only`, just the replies containing those bytes are late (e.g. b"posted": what a capture
    and a read of its state answer), so pings and new connections' handshakes stay fast and the test is
    deterministic. `url` is what the server connects to."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.delay = 0.0
        self.only: bytes = b""
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> "SlowReplies":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await src.read(65536):
                    if slow and self.delay and (not self.only or self.only in data):
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, False), pump(up_reader, writer, True))
