"""Shared fixtures: a private redis-server per session (or REDIS_URL), a fresh key prefix per test,
the real app served over HTTP, and funded accounts."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from service.client import PaidSession, Wallet
from service.config import Settings
from service.ledger import Ledger
from service.pricing import priced
from service.redis_server import PrivateRedis, free_port

ADMIN_TOKEN = "test-admin-token-3f9a"
MANIFEST = b"""apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  a: "1"
"""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """REDIS_URL if the environment gives one (keys are namespaced per test, nothing is flushed);
    otherwise a private redis-server on a free loopback port, stopped at the end of the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = PrivateRedis(tmp_path_factory.mktemp("redis"), port=free_port()).start()
    yield server.url
    server.stop()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url, redis_prefix=f"t-{uuid.uuid4().hex[:12]}", admin_token=ADMIN_TOKEN,
                    invoice_secret="test-invoice-secret", hold_timeout=30)


@pytest.fixture(autouse=True)
async def _release_xpub_claims(redis_url: str) -> AsyncIterator[None]:
    """Each test is a new deployment (a new REDIS_PREFIX) on the session's Redis: forget the claims on
    (PAYEE_XPUB, PAYEE_BRANCH) a finished test made, as an operator retiring a deployment would."""
    yield
    from service.chain.addresses import REGISTRY_TAG

    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for claim in await redis.smembers(f"{REGISTRY_TAG}:claims"):  # only test deployments' (prefix t-...)
            if (await redis.get(claim) or "").startswith("t-"):
                await redis.delete(claim)
                await redis.srem(f"{REGISTRY_TAG}:claims", claim)
    finally:
        await redis.aclose()


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    redis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    ledger = Ledger(redis, settings.redis_prefix)
    await ledger.ensure_system_accounts()
    yield ledger
    await redis.aclose()


@pytest.fixture
def make_app(settings: Settings) -> Callable[..., Any]:
    from service.app import create_app

    def make(**overrides: Any) -> Any:
        return create_app(settings.with_(**overrides) if overrides else settings)

    return make


@pytest.fixture
async def base_url(aiohttp_server: Any, make_app: Callable[..., Any]) -> str:
    server = await aiohttp_server(make_app())
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def admin_post(http: Any, base_url: str) -> Callable[[str, dict[str, Any]], Awaitable[tuple[int, Any]]]:
    async def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with http.post(f"{base_url}{path}", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            return r.status, await r.json()

    return post


@pytest.fixture
def manifest() -> bytes:
    return MANIFEST


@pytest.fixture
def funded(http: Any, base_url: str, admin_post: Any) -> Callable[[int], Awaitable[Wallet]]:
    """Register a new user through the public API (with proof of key) and credit it `amount` sat."""

    async def make(amount: int, username: str | None = None) -> Wallet:
        wallet = Wallet.generate(username or f"u{uuid.uuid4().hex[:10]}")
        async with PaidSession(wallet, max_price=0, session=http) as s:
            status, body = await s.register(base_url)
        assert status == 201, body
        if amount:
            status, body = await admin_post("/v1/admin/credits",
                                            {"username": wallet.username, "amount": amount, "reason": "test"})
            assert status == 201, body
        return wallet

    return make


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
async def failing_url(aiohttp_server, make_app) -> str:
    """The real app plus two priced routes that fail: one raises, one answers 503."""

    @priced("qa.validate")
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    @priced("qa.validate")
    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    app = make_app()
    app.router.add_post("/test/boom", boom)
    app.router.add_post("/test/unavailable", unavailable)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")
