"""A private redis-server child process: the embedded default when REDIS_URL is unset, and the test harness."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .redis_dir import DirLock, DirOwned, PrivateRedisError, choose_binary, find_redis_server, record_binary

__all__ = ["find_redis_server", "PrivateRedis", "PrivateRedisError", "DirOwned", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class PrivateRedis:
    """Starts redis-server with AOF in `directory`, on a unix socket (default) or a loopback port. One per dir:
    start() takes the dir's lock (DirOwned if another process has it) and runs the binary recorded there."""

    def __init__(self, directory: Path, *, port: int | None = None, appendfsync: str = "everysec",
                 extra: tuple[str, ...] = (), owner: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory).absolute()
        self.port = port
        self.appendfsync = appendfsync
        self.extra = extra  # more redis-server options (a replica's --replicaof, a cluster node's settings)
        self.owner = owner or {}  # written into the lock file for whoever finds the dir taken
        self.lock = DirLock(self.directory)
        self.binary = self.source = self.version = ""
        self.proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"unix://{self.socket_path}?db=0"

    def start(self, timeout: float = 10.0) -> "PrivateRedis":
        if self.lock.fd is None:
            self.lock.acquire({**self.owner, "url": self.url})
        try:
            if self.port is None and self.ping():  # a redis-server nobody's lock names (an older release's)
                raise DirOwned(self.directory, {"command": "a redis-server started without the lock file",
                                                "long_running": True})
            self.binary, self.source, self.version = choose_binary(self.directory)
            self._spawn(timeout)
        except BaseException:
            self.lock.release()
            raise
        record_binary(self.directory, self.binary, self.source, self.version)
        return self

    def _spawn(self, timeout: float) -> None:
        args = [
            self.binary,
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        if self.port is None:
            if self.socket_path.exists():
                self.socket_path.unlink()
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        args += list(self.extra)
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = (self.directory / "redis.log")
                tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {err}{tail}")
            if self.ping():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout}s")

    def ping(self) -> bool:
        try:
            if self.port is None:
                s = socket.socket(socket.AF_UNIX)
                target: object = str(self.socket_path)
            else:
                s = socket.socket()
                target = ("127.0.0.1", self.port)
            with s:
                s.settimeout(0.5)
                s.connect(target)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """SIGTERM makes redis-server flush its AOF and exit; SIGKILL simulates a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.lock.release()

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
