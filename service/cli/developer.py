"""Developer and CI job: the catalog of priced endpoints, any paid call, QA runs of manifests (JUnit)."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ..client import PaidSession
from .config import Config
from .output import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, Out, UsageError, command, reply, safe

__all__ = ["add_commands"]


async def cmd_catalog(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    """Every priced operation with its price rule: a fixed amount, a per-unit formula, or who sets it."""
    server = (args.url or cfg.need_server()).rstrip("/")
    async with PaidSession() as s:
        ops = await s.discover(server)
    rows = []
    for op in ops:
        for variant, price in (op.price.get("variants") or {"": op.price}).items():
            shown = price.get("formula") or f"{price['amount']}"
            rows.append({"method": op.method, "path": op.path, "price": f"{variant}: {shown}" if variant else shown,
                         "description": op.description, "rule": price})
    out.data([{"method": r["method"], "path": r["path"], "price": r["rule"], "description": r["description"]}
              for r in rows],
             lambda: out.table(rows, [("METHOD", "method"), ("PATH", "path"), ("PRICE (sat)", "price"),
                                      ("DESCRIPTION", "description")]))
    return EXIT_OK


async def cmd_call(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    data = None
    if args.data:
        data = Path(args.data[1:]).read_bytes() if args.data.startswith("@") else args.data.encode()
    headers = dict(h.split(":", 1) for h in args.header or [])
    async with cfg.payer(args.max_price) as s:
        status, body, rheaders = await s.request(args.method.upper(), args.url, data=data,
                                                 headers={k.strip(): v.strip() for k, v in headers.items()})
    if s.payments:
        out.line(f"paid {s.spent} sat, receipt {s.payments[-1].receipt}")
    return reply(out, status, body, lambda: out.line(json.dumps(body, indent=2) if not isinstance(body, str) else body),
                 ok=400)


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
        if self.out.json_mode:
            return
        if self.out.tty:
            self.tick += 1
            print(f"\r{self.FRAMES[self.tick % 4]} {safe(status)} {elapsed:5.1f}s", end="", file=self.out.stream, flush=True)
        elif status != self.last:
            self.out.line(f"run {status} after {elapsed:.1f}s")
        self.last = status

    def done(self) -> None:
        if self.out.tty and not self.out.json_mode:
            print("\r", end="", file=self.out.stream, flush=True)


async def cmd_qa_run(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    files = collect_manifests(args.paths)
    body, origin = pack(files)
    out.line(f"packed {len(origin)} documents from {len(files)} files; suite {args.suite}")
    request = {"suite": args.suite, "manifests": body.decode(), "strict": args.strict}
    if args.k8s:
        request["kubernetes_version"] = args.k8s
    async with cfg.payer(args.max_price, args.budget) as s:
        status, created, _ = await s.request("POST", f"{server}/v1/qa/runs", data=json.dumps(request),
                                             headers={"Content-Type": "application/json"})
        if status != 202:  # refused (e.g. an unknown --k8s): an HTTP error, exit 1
            return reply(out, status, created)
        out.line(f"paid {s.spent} sat, receipt {s.payments[-1].receipt}; run {created['id']}")
        progress, started = Progress(out), time.monotonic()
        while True:
            status, run = await s.owner_get(f"{server}{created['location']}")
            if status != 200:
                out.error(f"error: cannot read the run: {status} {run}")
                return EXIT_USAGE
            progress.update(run["status"], time.monotonic() - started)
            if run["status"] in ("passed", "failed", "error"):
                break
            if time.monotonic() - started > args.timeout:
                progress.done()
                out.error(f"error: the run is still {run['status']} after {args.timeout}s; see {server}{created['location']}")
                return EXIT_USAGE
            await asyncio.sleep(0.5)
        progress.done()
        if run["status"] == "error":
            out.error(f"error: the run failed on the server: {run['error']}; refunded: {run['refund'] or 'no'}")
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
    out.data(run, lambda: None)
    return EXIT_OK if run["status"] == "passed" else EXIT_FINDINGS




def add_commands(sub: Any) -> None:
    c = command(sub, "catalog", cmd_catalog, "priced endpoints of a server and their price rules")
    c.add_argument("url", nargs="?", help="server (default: the configured one)")
    call = command(sub, "call", cmd_call, "call an endpoint, paying up to --max-price")
    call.add_argument("method")
    call.add_argument("url")
    call.add_argument("--data", help="body, or @FILE")
    call.add_argument("--header", action="append", help="K: V (repeatable)")
    call.add_argument("--max-price", type=int, required=True)
    qa = command(sub, "qa", None, "QA runs")
    qsub = qa.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = command(qsub, "run", cmd_qa_run, "validate manifests (files or directories), pay, write JUnit")
    run.add_argument("paths", nargs="+")
    run.add_argument("--suite", default="schema")
    run.add_argument("--k8s", help="Kubernetes version, e.g. 1.31 (default: the newest the server supports, "
                                   "see GET /v1/qa/suites)")
    run.add_argument("--strict", action="store_true")
    run.add_argument("--max-price", type=int, required=True)
    run.add_argument("--budget", type=int)
    run.add_argument("--junit", help="write a JUnit XML report here")
    run.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run")
