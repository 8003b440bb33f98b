"""`microtasks`: the command line for developers and CI jobs (wallet, register, balance, tokens,
catalog, paid calls, QA runs with JUnit output). Config: flags, then env (MICROTASKS_SERVER,
MICROTASKS_TOKEN), then the config file. Exit codes: 0 pass, 1 findings/HTTP error, 2 usage or payment error."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .client import PaidSession, PaymentError, Wallet

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags, missing files or config: exit 2 with the message."""


def config_dir() -> Path:
    if os.environ.get("MICROTASKS_CONFIG_DIR"):
        return Path(os.environ["MICROTASKS_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "microtasks"


@dataclass
class Config:
    server: str | None
    token: str | None
    wallet_path: Path

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> "Config":
        """Flags win over env, env over the config file."""
        path = config_dir() / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        server = getattr(args, "server", None) or os.environ.get("MICROTASKS_SERVER") or stored.get("server")
        token = getattr(args, "token", None) or os.environ.get("MICROTASKS_TOKEN") or stored.get("token")
        wallet = getattr(args, "wallet", None) or os.environ.get("MICROTASKS_WALLET") or stored.get("wallet")
        return cls(server.rstrip("/") if server else None, token, Path(wallet) if wallet else config_dir() / "wallet.json")

    def need_server(self) -> str:
        if not self.server:
            raise UsageError("no server: pass --server URL, set MICROTASKS_SERVER, or run `microtasks register --server URL`")
        return self.server

    def wallet(self) -> Wallet:
        if not self.wallet_path.exists():
            raise UsageError(f"no wallet at {self.wallet_path}: run `microtasks wallet init USERNAME`")
        return Wallet.load(self.wallet_path)


def save_config(**values: Any) -> None:
    path = config_dir() / "config.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.update({k: v for k, v in values.items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2))


_CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline, and DEL


def safe(text: object) -> str:
    """What the server sent (replies, names, errors) may carry terminal escapes (ESC[2K, OSC 52 clipboard
    writes, ESC[8m hidden text): every line printed loses its control characters, terminal or not."""
    return _CONTROLS.sub("", str(text))


class Out:
    """Plain lines (CI logs and terminals alike): no control characters from the server ever reach the screen."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()

    def line(self, text: str) -> None:
        print(safe(text), file=self.stream, flush=True)

    def json(self, obj: Any) -> None:
        self.line(json.dumps(obj, indent=2))


def parse_duration(text: str) -> int:
    """'90', '45m', '12h', '30d' → seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise UsageError(f"not a duration: {text!r} (use e.g. 3600, 45m, 12h, 30d)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


# --- commands ---------------------------------------------------------------------------------------
def cmd_wallet(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    if args.action == "init":
        if cfg.wallet_path.exists() and not args.force:
            raise UsageError(f"{cfg.wallet_path} exists; use --force to replace it (the old key is lost)")
        wallet = Wallet.generate(args.username)
        wallet.save(cfg.wallet_path)
    else:
        wallet = cfg.wallet()
    out.json({"username": wallet.username, "pubkey": wallet.pubkey.hex(), "wallet": str(cfg.wallet_path)})
    return EXIT_OK


async def cmd_register(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    wallet = cfg.wallet()
    if args.username and args.username != wallet.username:
        raise UsageError(f"the wallet belongs to {wallet.username!r}; run `microtasks wallet init {args.username} --force`")
    async with PaidSession(wallet) as s:
        status, body = await s.register(server)
    out.json(body)
    if status == 201:
        save_config(server=server)
        return EXIT_OK
    return EXIT_FINDINGS


async def cmd_balance(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server, wallet = cfg.need_server(), cfg.wallet()
    async with PaidSession(wallet) as s:
        status, body = await s.signed_get(f"{server}/v1/accounts/{wallet.username}")
    out.json(body)
    return EXIT_OK if status == 200 else EXIT_FINDINGS


async def cmd_token(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server, wallet = cfg.need_server(), cfg.wallet()
    async with PaidSession(wallet) as s:
        if args.action == "create":
            body: dict[str, Any] = {"max_total": args.max_total, "routes": args.route or [], "label": args.label or ""}
            if args.max_per_call:
                body["max_per_call"] = args.max_per_call
            if args.expires_in:
                body["expires_at"] = int(time.time()) + parse_duration(args.expires_in)
            status, payload = await s.signed("POST", f"{server}/v1/accounts/me/tokens", body)
        elif args.action == "list":
            status, payload = await s.signed("GET", f"{server}/v1/accounts/me/tokens")
        else:
            status, payload = await s.signed("DELETE", f"{server}/v1/accounts/me/tokens/{args.id}")
    out.json(payload)
    return EXIT_OK if status < 300 else EXIT_FINDINGS


async def cmd_catalog(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = (args.url or cfg.need_server()).rstrip("/")
    async with PaidSession() as s:
        ops = await s.discover(server)
    out.line(f"{'METHOD':7} {'PATH':24} {'PRICE (sat)':28} DESCRIPTION")
    for op in ops:
        for variant, price in (op.price.get("variants") or {"": op.price}).items():
            shown = price.get("formula") if price.get("per_unit") else str(price["amount"])
            label = f"{variant}: {shown}" if variant else shown
            out.line(f"{op.method:7} {op.path:24} {label:28} {op.description}")
    return EXIT_OK


def _session(cfg: Config, max_price: int, budget: int | None = None) -> PaidSession:
    """Pay with the token when one is configured (CI), else with the wallet's key."""
    if cfg.token:
        return PaidSession(max_price=max_price, budget=budget, token=cfg.token)
    return PaidSession(cfg.wallet(), max_price=max_price, budget=budget)


async def cmd_call(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    data = None
    if args.data:
        data = Path(args.data[1:]).read_bytes() if args.data.startswith("@") else args.data.encode()
    headers = dict(h.split(":", 1) for h in args.header or [])
    async with _session(cfg, args.max_price) as s:
        status, body, rheaders = await s.request(args.method.upper(), args.url, data=data,
                                                 headers={k.strip(): v.strip() for k, v in headers.items()})
    if s.payments:
        out.line(f"paid {s.spent} sat, receipt {s.payments[-1].receipt}")
    out.line(json.dumps(body, indent=2) if not isinstance(body, str) else body)
    return EXIT_OK if status < 400 else EXIT_FINDINGS


def collect_manifests(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"no such file or directory: {raw}")
    if not files:
        raise UsageError("no .yaml/.yml manifests found")
    return files


def pack(files: list[Path]) -> tuple[bytes, list[tuple[str, int]]]:
    """One multi-document YAML body, and which file each document came from (for JUnit names)."""
    import yaml  # noqa: PLC0415

    chunks, origin = [], []
    for f in files:
        text = f.read_text()
        try:
            count = sum(1 for d in yaml.safe_load_all(text) if d is not None)
        except yaml.YAMLError as exc:
            raise UsageError(f"{f}: not valid YAML: {exc}") from None
        origin += [(str(f), i) for i in range(count)]
        chunks.append(text.strip("\n"))
    return ("\n---\n".join(chunks) + "\n").encode(), origin


class Progress:
    """A spinner on a terminal; one plain line per status change otherwise (CI logs)."""

    FRAMES = "|/-\\"

    def __init__(self, out: Out) -> None:
        self.out, self.last, self.tick = out, None, 0

    def update(self, status: str, elapsed: float) -> None:
        if self.out.tty:
            self.tick += 1
            print(f"\r{self.FRAMES[self.tick % 4]} {safe(status)} {elapsed:5.1f}s", end="", file=self.out.stream, flush=True)
        elif status != self.last:
            self.out.line(f"run {status} after {elapsed:.1f}s")
        self.last = status

    def done(self) -> None:
        if self.out.tty:
            print("\r", end="", file=self.out.stream, flush=True)


async def cmd_qa_run(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    files = collect_manifests(args.paths)
    body, origin = pack(files)
    out.line(f"packed {len(origin)} documents from {len(files)} files; suite {args.suite}")
    request = {"suite": args.suite, "manifests": body.decode(), "strict": args.strict}
    if args.k8s:
        request["kubernetes_version"] = args.k8s
    async with _session(cfg, args.max_price, args.budget) as s:
        status, created, _ = await s.request("POST", f"{server}/v1/qa/runs", data=json.dumps(request),
                                             headers={"Content-Type": "application/json"})
        if status != 202:
            detail = created.get("detail") if isinstance(created, dict) else created
            out.line(f"error: {status} {created.get('error') if isinstance(created, dict) else ''}: {detail}")
            return EXIT_USAGE
        out.line(f"paid {s.spent} sat, receipt {s.payments[-1].receipt}; run {created['id']}")
        progress, started = Progress(out), time.monotonic()
        while True:
            status, run = await s.owner_get(f"{server}{created['location']}")
            if status != 200:
                out.line(f"error: cannot read the run: {status} {run}")
                return EXIT_USAGE
            progress.update(run["status"], time.monotonic() - started)
            if run["status"] in ("passed", "failed", "error"):
                break
            if time.monotonic() - started > args.timeout:
                progress.done()
                out.line(f"error: the run is still {run['status']} after {args.timeout}s; see {server}{created['location']}")
                return EXIT_USAGE
            await asyncio.sleep(0.5)
        progress.done()
        if run["status"] == "error":
            out.line(f"error: the run failed on the server: {run['error']}; refunded: {run['refund'] or 'no'}")
            return EXIT_USAGE
        summary = run["summary"]
        out.line(f"{run['status']}: {summary['testcases']} checks on {summary['documents']} documents, "
                 f"{summary['failures']} failed, {summary['skipped']} skipped (kubernetes {run['kubernetes_version']})")
        for f in run["findings"]:
            src, idx = origin[f["document"]] if 0 <= f["document"] < len(origin) else ("bundle", "")
            where = f" {f['path']}" if f["path"] else ""
            out.line(f"FAIL {src}#{idx} {f['kind']}/{f['name']} [{f['rule']}]{where}: {f['message']}")
        if args.junit:
            status, xml = await s.owner_get(f"{server}{run['junit']}", accept="application/xml")
            Path(args.junit).write_text(xml)
            out.line(f"junit written to {args.junit}")
    return EXIT_OK if run["status"] == "passed" else EXIT_FINDINGS


async def cmd_ask(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    """Ask an expert (or a list with --list): the price is held in escrow until a reply or the deadline."""
    server = cfg.need_server()
    if args.list:
        path, body = f"/v1/lists/{args.target}/questions", {"text": args.question, "max_responses": args.max_responses}
    else:
        path, body = f"/v1/experts/{args.target}/questions", {"text": args.question}
    async with _session(cfg, args.max_price, args.budget) as s:
        status, q, _ = await s.request("POST", f"{server}{path}", data=json.dumps(body),
                                       headers={"Content-Type": "application/json"})
        if status != 201:
            out.line(f"error: {status} {q.get('error') if isinstance(q, dict) else ''}: "
                     f"{q.get('detail') if isinstance(q, dict) else q}")
            return EXIT_USAGE
        out.line(f"asked {q['to']}: question {q['id']}, {s.spent} sat held until a reply or "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(q['deadline']))}")
        while args.wait and not q["replies"] and q["status"] in ("open",):
            await asyncio.sleep(2)
            _, q = await s.signed_get(f"{server}/v1/questions/{q['id']}")
        for r in q["replies"]:
            out.line(f"reply from {r['by']}: {r['text']}")
    return EXIT_OK


async def cmd_question(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server, wallet = cfg.need_server(), cfg.wallet()
    async with PaidSession(wallet) as s:
        status, q = await s.signed_get(f"{server}/v1/questions/{args.id}")
    out.json(q)
    return EXIT_OK if status == 200 else EXIT_FINDINGS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microtasks", description="Pay-per-call Kubernetes QA and experts")
    p.add_argument("--server", help="service URL (env MICROTASKS_SERVER)")
    p.add_argument("--token", help="spending token id.secret (env MICROTASKS_TOKEN)")
    p.add_argument("--wallet", help="wallet file (default: config dir/wallet.json)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    w = sub.add_parser("wallet", help="create or show the key (0600 file in the config dir)")
    wsub = w.add_subparsers(dest="action", required=True)
    wi = wsub.add_parser("init")
    wi.add_argument("username")
    wi.add_argument("--force", action="store_true")
    wsub.add_parser("show")
    r = sub.add_parser("register", help="register the wallet's username and key with the server")
    r.add_argument("username", nargs="?")
    sub.add_parser("balance", help="balance and recent journal entries")
    t = sub.add_parser("token", help="spending tokens for CI")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create")
    tc.add_argument("--max-total", type=int, required=True)
    tc.add_argument("--max-per-call", type=int)
    tc.add_argument("--expires-in", help="e.g. 30d, 12h, 3600")
    tc.add_argument("--route", action="append", help="allowed path prefix (repeatable)")
    tc.add_argument("--label")
    tsub.add_parser("list")
    tr = tsub.add_parser("revoke")
    tr.add_argument("id")
    c = sub.add_parser("catalog", help="priced endpoints of a server")
    c.add_argument("url", nargs="?")
    call = sub.add_parser("call", help="call an endpoint, paying up to --max-price")
    call.add_argument("method")
    call.add_argument("url")
    call.add_argument("--data", help="body, or @FILE")
    call.add_argument("--header", action="append", help="K: V (repeatable)")
    call.add_argument("--max-price", type=int, required=True)
    qa = sub.add_parser("qa", help="QA runs")
    qsub = qa.add_subparsers(dest="action", required=True)
    run = qsub.add_parser("run", help="validate manifests (files or directories), pay, write JUnit")
    run.add_argument("paths", nargs="+")
    run.add_argument("--suite", default="schema")
    run.add_argument("--k8s", help="Kubernetes version, e.g. 1.31")
    run.add_argument("--strict", action="store_true")
    run.add_argument("--max-price", type=int, required=True)
    run.add_argument("--budget", type=int)
    run.add_argument("--junit", help="write a JUnit XML report here")
    run.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run")
    ask = sub.add_parser("ask", help="ask an expert (or a list with --list), paid on reply")
    ask.add_argument("target", help="expert username, or list name with --list")
    ask.add_argument("question")
    ask.add_argument("--list", action="store_true")
    ask.add_argument("--max-responses", type=int, default=1)
    ask.add_argument("--max-price", type=int, required=True)
    ask.add_argument("--budget", type=int)
    ask.add_argument("--wait", action="store_true", help="wait for the reply")
    q = sub.add_parser("question", help="show a question, its replies and money state")
    q.add_argument("id")
    return p


COMMANDS = {"ask": cmd_ask, "question": cmd_question, "wallet": cmd_wallet, "register": cmd_register, "balance": cmd_balance, "token": cmd_token,
            "catalog": cmd_catalog, "call": cmd_call, "qa": cmd_qa_run}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    out = Out()
    try:
        cfg = Config.resolve(args)
        result = COMMANDS[args.command](args, cfg, out)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result
    except UsageError as exc:
        print(safe(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except PaymentError as exc:
        print(safe(f"payment error: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except (OSError, aiohttp.ClientError) as exc:
        print(safe(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
