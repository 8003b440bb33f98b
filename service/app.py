"""The application factory: settings in, a ready aiohttp app out (Redis pool, ledger, paywall, routes)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from endpoints import pages, routes as endpoint_routes

from .config import Settings
from .deployment import deployment_id
from .invoices import Invoices, load_secret
from .journal_archive import JournalArchive, archive_once
from .ledger import Ledger
from .logs import request_context_middleware
from .payments import PaymentMethods
from .payments.bittransfer import BitTransfer
from .payments.mpp import PaymentScheme
from .payments.token import TokenPayment
from .paywall import paywall_middleware
from .pricing import price_book
from .qa.runs import Limits, RunStore, Worker
from .qa.crowd import Crowd
from .experts import Experts
from .payouts import Payouts
from .chain.addresses import AddressBook, AddressConflict
from .chain.backends import backend_from_settings
from .payments.onchain import OnChain, OnChainRecords
from .payments.x402_exact_btc import ExactBtc
from .rates import FixedRate, HttpRate
from .metrics import EXPIRED, REDIS_LATENCY, metrics_middleware
from .redis_client import connect, safe_url
from .ratelimit import RateLimiter, rate_limit_middleware
from .page_asks import PageAsks
from .state import PAGE_ASKS, LIMITER, HEALTH, RATES, ADDRESSES, CHAIN, CROWD, EXPERTS, INVOICES, PAYOUTS, LEDGER, METHODS, PRICES, REDIS, RUNS, SETTINGS
from .web_errors import error_middleware
from .inputs import input_middleware
from . import tasks, webhooks

__all__ = ["create_app"]

log = structlog.get_logger("app")
SHUTDOWN_TIMEOUT = 5.0  # seconds each group of background tasks gets to stop


def create_app(settings: Settings) -> web.Application:
    if not settings.redis_url:
        raise ValueError("settings.redis_url is required (the CLI starts a private Redis when REDIS_URL is unset)")
    app = web.Application(
        client_max_size=settings.max_body,
        middlewares=[metrics_middleware, request_context_middleware, error_middleware, input_middleware, rate_limit_middleware,
                     paywall_middleware()],
    )
    app[SETTINGS] = settings
    webhooks.configure(settings.webhook_allow_http, settings.webhook_allow)
    app[PRICES] = price_book(settings)
    app[RATES] = (HttpRate(settings.usd_rate_url, settings.usd_rate_path, settings.usd_rate_max_age)
                  if settings.usd_rate_url else FixedRate(settings.usd_rate))
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_sweeper_ctx)
    app.cleanup_ctx.append(_workers_ctx)
    endpoint_routes.setup(app)
    pages.setup(app)
    return app


class RedisHealth:
    """Is the ledger usable right now? Bootstrapped once (system accounts, invoice secret, charities),
    then pinged every second; priced routes answer 503 while it is not, instead of a 402 nobody can pay."""

    def __init__(self) -> None:
        self.bootstrapped = False
        self.reachable = False

    @property
    def ok(self) -> bool:
        return self.bootstrapped and self.reachable


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    redis = connect(s.redis_url, timeout=s.redis_timeout)
    app[REDIS] = redis
    ledger = Ledger(redis, s.redis_prefix, timeout=s.redis_timeout)
    ledger.archive_dir = s.archive_dir
    app[LEDGER] = ledger
    app[INVOICES] = Invoices(s.invoice_secret.encode() if s.invoice_secret else None,
                             ttl=s.invoice_ttl, payee=s.payee_username, address=s.payee_address,
                             deployment=deployment_id(s))
    app[RUNS] = RunStore(redis, s.redis_prefix)
    app[CROWD] = Crowd(redis, s.redis_prefix, ledger, lease_seconds=s.crowd_lease, dispute_seconds=s.crowd_dispute,
                       stake_percent=s.crowd_stake_percent)
    app[PAYOUTS] = Payouts(redis, s.redis_prefix, ledger, network=s.network, hold_days=s.withdrawal_hold_days,
                           minimum_withdrawal=s.minimum_withdrawal)
    app[EXPERTS] = Experts(redis, s.redis_prefix, ledger, app[PAYOUTS])
    app[EXPERTS].webhook_policy = webhooks.policy_for(s.webhook_allow_http, tuple(s.webhook_allow))
    methods: list = [TokenPayment(s, ledger)]
    owns = None
    if s.payee_xpub:
        app[ADDRESSES] = AddressBook(redis, s.redis_prefix, s.payee_xpub, s.network, s.payee_branch,
                                     pool=s.invoice_address_pool, per_client=s.invoice_addresses_per_client)
        owns = app[ADDRESSES].owns
        app[PAYOUTS].owns = owns  # our own addresses never receive a withdrawal (fee drain)
    app[PAGE_ASKS] = PageAsks(redis, s.redis_prefix, ledger, app[EXPERTS], app[PAYOUTS], app.get(ADDRESSES),
                              confirmations=s.deposit_confirmations)
    if s.chain:
        app[CHAIN] = backend_from_settings(s.chain, s.chain_url or "", s.chain_cookie)
    if s.chain and s.payee_xpub:  # a call is paid on chain only to its invoice's own derived address
        onchain = OnChain(s, app[CHAIN], app[ADDRESSES], app[INVOICES], ledger, OnChainRecords(redis, s.redis_prefix))
        methods += [onchain, ExactBtc(onchain)]  # 21's raw transaction and x402's PSBT: one on-chain path
    bittransfer = BitTransfer(s, app[INVOICES], owns, ledger)
    # the IETF "Payment" scheme's credential source (payments/mpp.py); first, so it sees a second payment
    app[METHODS] = PaymentMethods(PaymentScheme(s, app[INVOICES], bittransfer), bittransfer, *methods)
    app[LIMITER] = RateLimiter(redis, s.redis_prefix, s.redis_timeout)
    app[HEALTH] = health = RedisHealth()
    if ADDRESSES in app:  # another deployment deriving the same addresses: refuse to start (AddressConflict)
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):  # Redis down: the bootstrap checks
            await app[ADDRESSES].claim()
    monitor = asyncio.create_task(_monitor(app, health), name="redis-monitor")
    for _ in range(20):  # usually ready at once; a Redis that is down does not stop the server starting
        if health.ok:
            break
        await asyncio.sleep(0.05)
    yield
    await tasks.stop([monitor], SHUTDOWN_TIMEOUT)
    if CHAIN in app:
        await app[CHAIN].close()
    await redis.aclose()


async def _monitor(app: web.Application, health: RedisHealth) -> None:
    """Bootstrap the ledger as soon as Redis answers, then keep the health flag current."""
    s, redis = app[SETTINGS], app[REDIS]
    while True:
        try:
            async with asyncio.timeout(max(s.redis_timeout, 0.5)):
                with REDIS_LATENCY.time():
                    await redis.ping()
                if not health.bootstrapped:
                    await app[LEDGER].ensure_system_accounts()
                    if app[INVOICES].secret is None:
                        app[INVOICES].secret = await load_secret(redis, s.redis_prefix, None)
                    await app[EXPERTS].ensure_charities()
                    if ADDRESSES in app:
                        await app[ADDRESSES].claim()
                    health.bootstrapped = True
                    log.info("ledger_ready", redis=safe_url(s.redis_url), prefix=s.redis_prefix)
            if not health.reachable:
                log.info("redis_reachable")
            health.reachable = True
        except asyncio.CancelledError:
            raise
        except AddressConflict as exc:  # never serve with addresses another deployment hands out too
            log.error("address_conflict", error=str(exc))
            health.reachable = False
        except Exception as exc:  # noqa: BLE001 - any failure means the ledger is not usable now
            if tasks.cancelling():
                raise asyncio.CancelledError from exc
            if health.reachable or not health.bootstrapped:
                log.warning("redis_unreachable", error=f"{type(exc).__name__}: {exc}")
            health.reachable = False
        await asyncio.sleep(1 if health.ok else 0.25)


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    """Void expired holds every few seconds (every process runs one; the script makes that safe)."""
    ledger = app[LEDGER]

    stop = asyncio.Event()

    async def sweep() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):  # a stop ends the wait at once
                await asyncio.wait_for(stop.wait(), min(5, max(1, app[SETTINGS].hold_timeout // 4)))
            if stop.is_set():
                return
            try:
                voided = await ledger.sweep_expired()
                if voided:
                    EXPIRED.inc(voided)
                    log.info("holds_expired", voided=voided)
                if app[SETTINGS].journal_archive_after > 0:
                    archived = await archive_once(ledger, JournalArchive(app[SETTINGS].archive_dir),
                                                  app[SETTINGS].journal_archive_after)
                    if archived:
                        log.info("journal_archived", entries=archived)
                closed = await app[CROWD].expire_jobs()
                if closed:
                    log.info("crowd_jobs_expired", closed=closed)
                expired = await app[EXPERTS].expire_questions()
                if expired:
                    log.info("questions_expired", closed=expired)
                delivered = await app[PAGE_ASKS].advance_all()
                if delivered:
                    log.info("web_asks_delivered", count=delivered)
                queued = await app[PAYOUTS].auto_withdraw()
                if queued:
                    log.info("auto_withdrawals_queued", count=queued)
            except Exception as exc:  # keep sweeping when Redis comes back, but never past a cancel
                if tasks.cancelling() or stop.is_set():
                    raise asyncio.CancelledError from exc
                log.warning("sweep_failed", error=str(exc))

    task = asyncio.create_task(sweep(), name="hold-sweeper")
    yield
    stop.set()
    await tasks.stop([task], SHUTDOWN_TIMEOUT)
    await tasks.stop_spawned(SHUTDOWN_TIMEOUT)  # webhook deliveries still in flight


def qa_limits(s: Settings) -> Limits:
    return Limits(max_active_per_account=s.qa_max_active, lease_seconds=s.qa_lease, max_attempts=s.qa_max_attempts)


async def _workers_ctx(app: web.Application) -> AsyncIterator[None]:
    """QA_WORKERS in-process workers (default 1, so one `make run` serves runs); 0 when separate
    `python -m service worker` processes do the work."""
    s = app[SETTINGS]
    stop = asyncio.Event()
    workers = [asyncio.create_task(Worker(app[RUNS], app[LEDGER], qa_limits(s)).run_forever(stop), name=f"qa-worker-{i}")
               for i in range(s.qa_workers)]
    yield
    stop.set()
    await tasks.stop(workers, SHUTDOWN_TIMEOUT)
