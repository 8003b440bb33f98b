"""`python -m service`: serve the API, and the operator's commands: worker (QA run queue), reconcile, credit,
account create, sweep, chainwatch, withdrawals, unclaimed. Without REDIS_URL, one private Redis per data dir."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any, AsyncIterator, Iterator

import structlog

from .. import accounts, crypto
from ..config import ConfigError, Settings
from ..errors import ApiError
from ..ledger import Ledger
from ..logs import configure_logging
from ..redis_client import connect
from ..redis_server import DirOwned, PrivateRedis, PrivateRedisError

__all__ = ["main"]

log = structlog.get_logger("cli")


@contextlib.contextmanager
def redis_url_for(settings: Settings, *, long_running: bool) -> Iterator[str]:
    """REDIS_URL if set; else the private Redis of var/redis, one per dir: the process that owns the dir
    (its lock file) is reused when it is a long-running one; a one-shot owner is waited for (up to 30 s)."""
    if settings.redis_url:
        yield settings.redis_url
        return
    private = PrivateRedis(settings.var_dir / "redis", owner={"long_running": long_running})
    deadline = time.monotonic() + 30
    while True:
        try:
            private.start()
            break
        except DirOwned as owned:
            if (owned.owner.get("long_running") or time.monotonic() > deadline) and private.ping():
                log.info("private_redis_reused", url=private.url, dir=str(private.directory),
                         owner_pid=owned.owner.get("pid"), owner_command=owned.owner.get("command"),
                         note="this process loses its Redis when the owner stops")
                yield private.url
                return
            if owned.owner.get("long_running") or time.monotonic() > deadline:
                raise PrivateRedisError(f"{owned}, but its Redis does not answer on {private.socket_path}: "
                                        "wait for it to finish starting, or stop it") from None
            time.sleep(0.2)
    log.info("private_redis_started", binary=private.binary, source=private.source, version=private.version,
             url=private.url, dir=str(private.directory), appendonly=True)
    try:
        yield private.url
    finally:
        private.stop()
        log.info("private_redis_stopped")


@contextlib.asynccontextmanager
async def open_ledger(url: str, prefix: str) -> AsyncIterator[Ledger]:
    redis = connect(url)
    try:
        ledger = Ledger(redis, prefix)
        await ledger.ensure_system_accounts()
        yield ledger
    finally:
        await redis.aclose()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web  # noqa: PLC0415

    from ..app import create_app  # noqa: PLC0415

    settings = settings.with_(host=args.host or settings.host, port=args.port or settings.port)
    if args.workers > 1:
        return _serve_workers(settings, args.workers)
    with redis_url_for(settings, long_running=True) as url:
        app = create_app(settings.with_(redis_url=url))
        log.info("serving", host=settings.host, port=settings.port, network=settings.network,
                 payee=settings.payee_username, admin_api=bool(settings.admin_token))
        web.run_app(app, host=settings.host, port=settings.port, access_log=None, print=None,
                    reuse_port=args.reuse_port, loop=_event_loop())
    return 0


def _serve_workers(settings: Settings, workers: int) -> int:
    """N server processes on one port (SO_REUSEPORT: the kernel spreads connections), one Redis; a child
    that dies is restarted; SIGTERM/SIGINT stop them all gracefully (each finishes its paid calls)."""
    import shutil  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import time  # noqa: PLC0415

    with redis_url_for(settings, long_running=True) as url:
        env = {**os.environ, "REDIS_URL": url, "HOST": settings.host, "PORT": str(settings.port), "WEB_WORKERS": "1"}
        if "PROMETHEUS_MULTIPROC_DIR" not in env:  # /metrics then merges every worker's counters
            metrics_dir = settings.var_dir / f"metrics-{os.getpid()}"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        cmd = [sys.executable, "-m", "service", "serve", "--reuse-port", "--workers", "1"]
        children = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
        stopping = False

        def stop(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("serving_workers", workers=workers, host=settings.host, port=settings.port)
        while not stopping:
            for i, child in enumerate(children):
                if child.poll() is not None and not stopping:
                    log.warning("worker_restarted", exit_code=child.returncode, pid=child.pid)
                    children[i] = subprocess.Popen(cmd, env=env)
            time.sleep(0.5)
        for child in children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
        if env.get("PROMETHEUS_MULTIPROC_DIR", "").endswith(f"metrics-{os.getpid()}"):
            shutil.rmtree(env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """QA run workers reading the run queue (a Redis Stream consumer group) until SIGTERM/SIGINT."""
    import signal  # noqa: PLC0415

    from ..app import qa_limits  # noqa: PLC0415
    from .. import tasks as background  # noqa: PLC0415
    from ..qa.runs import RunStore, Worker  # noqa: PLC0415

    async def work(url: str) -> int:
        from .. import webhooks  # noqa: PLC0415

        webhooks.configure(settings.webhook_allow_http, settings.webhook_allow)
        redis = connect(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ledger, store = Ledger(redis, settings.redis_prefix), RunStore(redis, settings.redis_prefix)
        workers = [Worker(store, ledger, qa_limits(settings)) for _ in range(args.concurrency)]
        tasks = [asyncio.create_task(w.run_forever(stop)) for w in workers]
        await stop.wait()
        await background.stop(tasks, 10.0)  # bounded: a stuck run does not keep the process alive
        await background.stop_spawned(5.0)  # webhook deliveries in flight
        await redis.aclose()
        log.info("worker_stopped")
        return 0

    with redis_url_for(settings, long_running=True) as url:
        loop = _event_loop()
        try:
            return loop.run_until_complete(work(url))
        finally:
            loop.close()


@contextlib.asynccontextmanager
async def chain_context(url: str, settings: Settings) -> AsyncIterator[tuple[Ledger, Any, Any, Any]]:
    """Ledger, address book, chain backend and payouts for the operator's chain commands."""
    from ..chain.addresses import AddressBook, AddressConflict  # noqa: PLC0415
    from ..chain.backends import backend_from_settings  # noqa: PLC0415
    from ..payouts import Payouts  # noqa: PLC0415

    if not settings.payee_xpub or not settings.chain:
        raise SystemExit("configure PAYEE_XPUB and CHAIN (esplora|bitcoind) with CHAIN_URL first")
    redis = connect(url)
    backend = backend_from_settings(settings.chain, settings.chain_url or "", settings.chain_cookie)
    try:
        ledger = Ledger(redis, settings.redis_prefix)
        ledger.archive_dir = settings.archive_dir
        await ledger.ensure_system_accounts()
        book = AddressBook(redis, settings.redis_prefix, settings.payee_xpub, settings.network, settings.payee_branch)
        try:
            await book.claim()
        except AddressConflict as exc:  # another deployment derives the same addresses
            raise SystemExit(f"configuration error: {exc}") from None
        yield (ledger, book, backend,
               Payouts(redis, settings.redis_prefix, ledger, network=settings.network,
                       hold_days=settings.withdrawal_hold_days, minimum_withdrawal=settings.minimum_withdrawal,
                       owns=book.owns))
    finally:
        await backend.close()
        await redis.aclose()


def cmd_chainwatch(settings: Settings, args: argparse.Namespace) -> int:
    from ..chain.reorgs import recheck_deposits  # noqa: PLC0415
    from ..chain.watcher import credit_deposits  # noqa: PLC0415
    from ..payments.onchain import OnChainRecords, book_strays, settle_payments  # noqa: PLC0415

    async def watch(url: str) -> int:
        async with chain_context(url, settings) as (ledger, book, backend, payouts):
            records = OnChainRecords(ledger.redis, settings.redis_prefix)
            while True:
                try:
                    confirmations = settings.deposit_confirmations
                    credited = await credit_deposits(book, backend, ledger, confirmations)
                    reorgs = await recheck_deposits(ledger, backend, payouts, safe_depth=settings.reorg_safe_depth,
                                                    confirmations=confirmations)
                    strays = await book_strays(book, backend, ledger, records, confirmations)
                    settled = await settle_payments(records, ledger, backend, confirmations)
                    if args.once:
                        print(json.dumps({"credited": credited, "reorg": reorgs, "strays": strays, "settled": settled}))
                        return 0
                except Exception as exc:  # keep watching through node outages
                    log.warning("chainwatch_failed", error=str(exc))
                    if args.once:
                        return 1
                await asyncio.sleep(args.interval)

    with redis_url_for(settings, long_running=not args.once) as url:
        return asyncio.run(watch(url))


def cmd_withdrawals(settings: Settings, args: argparse.Namespace) -> int:
    from ..chain.batch import BatchError, broadcast_batch, build_batch, drop_batch  # noqa: PLC0415

    async def run(url: str) -> int:
        async with chain_context(url, settings) as (_, book, backend, payouts):
            try:
                if args.action == "list":
                    print(json.dumps(await payouts.queued(), indent=2))
                elif args.action == "batch":
                    batch = await build_batch(payouts, book, backend, fee_rate=args.fee_rate,
                                              confirmations=settings.deposit_confirmations, force=args.force)
                    with open(args.out, "w") as f:
                        f.write(batch.psbt + "\n")
                    print(json.dumps({"psbt": args.out, "txid": batch.txid, "withdrawals": batch.withdrawals,
                                      "fee": batch.fee, "change": batch.change}))
                elif args.action == "broadcast":
                    with open(args.file) as f:
                        print(json.dumps(await broadcast_batch(payouts, backend, f.read())))
                elif args.action == "drop":
                    print(json.dumps({"dropped": args.txid, "requeued": await drop_batch(payouts, backend, args.txid)}))
                elif args.action == "release":
                    print(json.dumps({"released": args.username, "was_on_hold": await payouts.release(args.username)}))
                else:
                    print(json.dumps(await payouts.cancel(args.id, args.reason)))
            except BatchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            except ApiError as exc:
                print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
                return 1
        return 0

    with redis_url_for(settings, long_running=False) as url:
        return asyncio.run(run(url))


def cmd_unclaimed(settings: Settings, args: argparse.Namespace) -> int:
    """What on-chain payments left in their accounts, and settling one to an account (or revenue)."""
    from ..ledger import REVENUE, user_account  # noqa: PLC0415
    from ..payments.onchain import OnChainRecords, settle_unclaimed, unclaimed  # noqa: PLC0415

    async def run(url: str) -> int:
        async with open_ledger(url, settings.redis_prefix) as ledger:
            records = OnChainRecords(ledger.redis, settings.redis_prefix)
            if args.action == "list":
                print(json.dumps(await unclaimed(records, ledger), indent=2))
                return 0
            to = REVENUE if args.action == "keep" else user_account(args.to)
            if args.action == "refund" and await ledger.balance(to) is None:
                print(json.dumps({"error": "unknown_account", "detail": f"no account {args.to!r}"}), file=sys.stderr)
                return 1
            result = await settle_unclaimed(records, ledger, args.txid, to)
            print(json.dumps({"txid": args.txid, "to": to, "outcome": result.outcome.value, **result.transfer}))
            return 0 if result.outcome.value in ("ok", "nothing") else 1

    with redis_url_for(settings, long_running=False) as url:
        return asyncio.run(run(url))


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available: measured ~15% more paid calls/s than asyncio's loop here."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _reconcile(ledger: Ledger, args: argparse.Namespace, chain: dict[str, Any] | None = None) -> int:
    report = await ledger.reconcile()
    if report.archived_entries and ledger.archive_dir:  # the archived files must add up to their checkpoint
        from ..journal_archive import JournalArchive, verify_archive  # noqa: PLC0415
        report.mismatches += await verify_archive(ledger, JournalArchive(ledger.archive_dir))
    body: dict[str, Any] = {
        "ok": report.ok, "accounts": report.accounts, "journal_entries": report.journal_entries,
        "archived_entries": report.archived_entries,
        "sum_of_balances": report.sum_posted, "sum_of_pending": report.sum_pending,
        "mismatches": report.mismatches,
    }
    if chain is not None:  # reconcile --chain: each side of the boundary, {"ok": ..., "mismatches": [...]}
        body["chain"] = chain
        body["ok"] = body["ok"] and all(side["ok"] for side in chain.values())
    print(json.dumps(body, indent=2))
    return 0 if body["ok"] else 1


def cmd_reconcile_chain(settings: Settings, args: argparse.Namespace) -> int:
    """`reconcile --chain`: the ledger's own check, plus its chain boundary against the chain."""
    from ..chain.audit import audit_in, audit_out  # noqa: PLC0415

    async def run(url: str) -> int:
        async with chain_context(url, settings) as (ledger, book, backend, payouts):
            return await _reconcile(ledger, args, {
                "in": await audit_in(ledger, book, backend, settings.deposit_confirmations),
                "out": await audit_out(ledger, payouts, settings.network, backend)})

    with redis_url_for(settings, long_running=False) as url:
        return asyncio.run(run(url))


async def _credit(ledger: Ledger, args: argparse.Namespace) -> int:
    result = await accounts.credit(ledger, args.username, args.amount, args.reason, args.id)
    print(json.dumps(result))
    return 0


async def _account_create(ledger: Ledger, args: argparse.Namespace) -> int:
    try:
        pubkey = crypto.parse_pubkey(args.pubkey)
    except crypto.KeyError_ as exc:
        print(json.dumps({"error": "malformed_pubkey", "detail": str(exc)}), file=sys.stderr)
        return 2
    result = await accounts.register(ledger, args.username, pubkey)
    print(json.dumps(result))
    return 0


async def _sweep(ledger: Ledger, args: argparse.Namespace) -> int:
    print(json.dumps({"voided": await ledger.sweep_expired()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP service (private Redis when REDIS_URL is unset)")
    serve.add_argument("--host", help="bind address (HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (PORT, default 8402)")
    serve.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several processes on one port")
    serve.add_argument("--workers", type=int, default=int(os.environ.get("WEB_WORKERS", "1")),
                       help="server processes sharing the port (WEB_WORKERS, default 1)")
    rec = sub.add_parser("reconcile", help="replay the journal; check balances match it and sum to zero (exit 1 if not)")
    rec.add_argument("--chain", action="store_true",
                     help="also check the chain boundary (needs CHAIN): coins booked in == coins our addresses "
                          "received, coins booked out == coins our batches sent")
    credit = sub.add_parser("credit", help="credit an account from the operator's grants account")
    credit.add_argument("username")
    credit.add_argument("amount", type=int, help="satoshis")
    credit.add_argument("--reason", required=True)
    credit.add_argument("--id", help="idempotency key: the same id credits once")
    account = sub.add_parser("account", help="account administration")
    asub = account.add_subparsers(dest="account_command", required=True, metavar="ACTION")
    create = asub.add_parser("create", help="register an account without proof of key possession")
    create.add_argument("username")
    create.add_argument("--pubkey", required=True, help="33-byte compressed secp256k1 key, hex or base64")
    sub.add_parser("sweep", help="void every hold whose timeout has passed")
    watch = sub.add_parser("chainwatch", help="credit confirmed deposits (DEPOSIT_CONFIRMATIONS) exactly once; "
                                              "reverse those a reorg removes before REORG_SAFE_DEPTH")
    watch.add_argument("--once", action="store_true")
    watch.add_argument("--interval", type=float, default=30)
    wd = sub.add_parser("withdrawals", help="batch queued withdrawals into a PSBT, broadcast the signed batch")
    wsub = wd.add_subparsers(dest="action", required=True, metavar="ACTION")
    wsub.add_parser("list", help="queued withdrawals")
    wb = wsub.add_parser("batch", help="write an unsigned PSBT paying every queued withdrawal")
    wb.add_argument("--out", required=True)
    wb.add_argument("--fee-rate", type=int, default=5, help="sat/vB")
    wb.add_argument("--force", action="store_true",
                    help="build even while coins are booked that the chain never paid us (reconcile --chain, IN "
                         "side): RISK: the batch may pay that unbacked money out of other users' coins")
    wbc = wsub.add_parser("broadcast", help="broadcast a signed batch (PSBT base64 or raw hex) and settle it")
    wbc.add_argument("file")
    wc = wsub.add_parser("cancel", help="cancel one queued withdrawal: its hold is voided, the money is back "
                                        "(a batched one: drop its batch first; a sent one cannot be)")
    wc.add_argument("id")
    wc.add_argument("--reason", default="cancelled by the operator")
    wdr = wsub.add_parser("drop", help="forget a built batch the node does not have: its withdrawals go back to the queue")
    wdr.add_argument("txid")
    wrl = wsub.add_parser("release", help="lift the hold a reversed deposit put on an account's withdrawals")
    wrl.add_argument("username")
    unc = sub.add_parser("unclaimed", help="coins on-chain payments left in their accounts (overpaid, failed calls)")
    usub = unc.add_subparsers(dest="action", required=True, metavar="ACTION")
    usub.add_parser("list", help="payment accounts still holding coins, with their payer if one signed")
    ur = usub.add_parser("refund", help="credit what a payment account holds to a user's account")
    ur.add_argument("txid")
    ur.add_argument("--to", required=True, help="username")
    uk = usub.add_parser("keep", help="move what a payment account holds to revenue (e.g. nobody claims it)")
    uk.add_argument("txid")
    worker = sub.add_parser("worker", help="run QA jobs from the queue (scale out: start several)")
    worker.add_argument("--concurrency", type=int, default=1, help="runs processed at once by this process")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, stream=sys.stderr if args.command != "serve" else None)
    try:
        return _dispatch(settings, args)
    except PrivateRedisError as exc:  # the data dir is someone else's, or its redis-server is gone
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "serve":
        return cmd_serve(settings, args)
    if args.command == "worker":
        return cmd_worker(settings, args)
    if args.command == "chainwatch":
        return cmd_chainwatch(settings, args)
    if args.command == "withdrawals":
        return cmd_withdrawals(settings, args)
    if args.command == "unclaimed":
        return cmd_unclaimed(settings, args)
    if args.command == "reconcile" and args.chain:
        return cmd_reconcile_chain(settings, args)
    action = {"reconcile": _reconcile, "credit": _credit, "sweep": _sweep, "account": _account_create}[args.command]

    async def run(url: str) -> int:
        async with open_ledger(url, settings.redis_prefix) as ledger:
            ledger.archive_dir = settings.archive_dir
            return await action(ledger, args)

    try:
        with redis_url_for(settings, long_running=False) as url:
            return asyncio.run(run(url))
    except ApiError as exc:
        print(json.dumps(exc.body()), file=sys.stderr)
        return 1
