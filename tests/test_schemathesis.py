"""schemathesis against the served openapi.yaml, every operation (priced ones and their 402s included), with
every check (`--checks all`: positive and negative data, status codes, headers, bodies, Allow, auth): zero
failures. Bounded: a few examples per operation, fixed seed, every phase (examples, coverage, fuzzing, stateful).

tests/schemathesis.toml names the few statuses no JSON Schema can promise (402 for an unpaid call; a pubkey
off the curve; an unreadable archive; a webhook host that does not resolve), each with its reason.
Credentials are not generated (`--generation-with-security-parameters false`): random payment headers are
fuzzed by tests/test_hostile_input.py, where every refusal is checked to change nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from service.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
live_server_prefix: dict[str, str] = {}


@pytest.fixture(scope="module")
def live_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service as `make run` starts it, on a free port, with its own key prefix."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("schemathesis")
    prefix = f"st-{os.urandom(4).hex()}"
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "PORT": str(port),
           "ADMIN_TOKEN": "schemathesis-admin", "RATE_LIMIT_IP_PER_MINUTE": "0", "LOG_LEVEL": "warning",
           "MICROTASKS_VAR": str(tmp / "var")}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/readyz", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.1)
    live_server_prefix[url] = prefix
    yield url
    proc.terminate()
    proc.wait(20)
    log.close()
    assert "unhandled_error" not in (tmp / "server.log").read_text()


def schemathesis_run(url: str, *extra: str, cwd: Path) -> None:
    """The schemathesis CLI (every phase: examples, coverage, fuzzing, stateful), seeded and bounded."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
           "run", f"{url}/openapi.yaml", "--url", url, "--max-examples", "8", "--seed", "20261125",
           "--request-timeout", "10", "--no-color", "--checks", "all", "--generation-with-security-parameters", "false",
           *extra]
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)  # its caches stay in tmp
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "API Operations:" in run.stdout


def test_every_operation_conforms_to_the_spec(live_server: str, tmp_path: Path) -> None:
    schemathesis_run(live_server, cwd=tmp_path)


def test_admin_operations_with_the_admin_token(live_server: str, redis_url: str, tmp_path: Path) -> None:
    """Authenticated as the operator, the admin API is fuzzed past its 401; the ledger still reconciles."""
    schemathesis_run(live_server, "--include-path-regex", "^/v1/admin/", "-H", "Authorization: Bearer schemathesis-admin",
                     cwd=tmp_path)
    prefix = live_server_prefix[live_server]
    report = subprocess.run([sys.executable, "-m", "service", "reconcile"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "REDIS_URL": redis_url, "REDIS_PREFIX": prefix}, timeout=60)
    assert report.returncode == 0, report.stdout + report.stderr
