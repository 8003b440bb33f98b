"""Benchmark targets, each a plain aiohttp app on uvloop except `app` (our whole app):

- bare:   a trivial JSON route (aiohttp's own cost);
- verify: the work no paid call can avoid in this process: parse the BitTransfer, verify its signature
          with the project's crypto.verify;
- floor:  verify + ONE Redis script per call through redis-py (replay record with a TTL, balance check,
          debit/credit): the least a paid call can do against one Redis without batching;
- app:    our app plus a trivial free route and the same handler priced (`/bench/paid`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web  # noqa: E402

FLOOR_PREFIX = "benchfloor"
# KEYS: replay record, payer balance, payee balance. ARGV: amount, replay TTL s.
FLOOR_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'replayed' end
local bal = tonumber(redis.call('HGET', KEYS[2], 'b') or '0')
local amount = tonumber(ARGV[1])
if bal < amount then return 'insufficient' end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'b', -amount)
redis.call('HINCRBY', KEYS[3], 'b', amount)
return 'ok'
"""


async def trivial(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def trivial_paid(request: web.Request) -> web.Response:
    """The same handler as `trivial`, as a separate function so that only this one carries a price."""
    return await trivial(request)


def _verified(request: web.Request) -> dict | None:
    """Parse + verify the BitTransfer headers as the paywall must; None when they do not verify."""
    from service import crypto
    text = request.headers.get("Bitcoin-Transfer")
    signature = request.headers.get("Authorization")
    if not text or not signature:
        return None
    transfer = json.loads(text)
    pubkey = crypto.parse_pubkey(transfer["payer_pubkey"])
    if not crypto.verify(pubkey, signature, text.encode()):
        return None
    return transfer


async def verify_only(request: web.Request) -> web.Response:
    if _verified(request) is None:
        return web.json_response({"error": "bad_signature"}, status=401)
    return web.json_response({"ok": True})


def floor_app() -> web.Application:
    import hashlib

    import redis.asyncio as aioredis

    app = web.Application()

    async def redis_ctx(app: web.Application):  # plain redis-py (hiredis parser): a fixed reference
        redis = aioredis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
        app["script"] = redis.register_script(FLOOR_LUA)
        yield
        await redis.aclose()

    async def floor(request: web.Request) -> web.Response:
        transfer = _verified(request)
        if transfer is None:
            return web.json_response({"error": "bad_signature"}, status=401)
        tid = hashlib.sha256(request.headers["Bitcoin-Transfer"].encode()).hexdigest()
        outcome = await request.app["script"](
            keys=[f"{FLOOR_PREFIX}:xfer:{tid}", f"{FLOOR_PREFIX}:bal:{transfer['payer']}",
                  f"{FLOOR_PREFIX}:bal:{transfer['payee_username']}"],
            args=[int(transfer["amount"]), 600])
        if outcome != "ok":
            return web.json_response({"error": outcome}, status=409)
        return web.json_response({"ok": True})

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/bench/paid", floor)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bare", "verify", "floor", "app"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--reuse-port", action="store_true", help="several processes on one port (serve --workers)")
    args = p.parse_args()
    if args.mode == "bare":
        app = web.Application()
        app.router.add_get("/bench/free", trivial)
    elif args.mode == "verify":
        app = web.Application()
        app.router.add_get("/bench/paid", verify_only)
    elif args.mode == "floor":
        app = floor_app()
    else:
        from service.app import create_app
        from service.config import Settings
        from service.logs import configure_logging
        from service.pricing import PriceRule, priced
        from service.state import PRICES

        configure_logging(os.environ.get("LOG_LEVEL", "warning"))
        app = create_app(Settings.from_env())
        app.router.add_get("/bench/free", trivial)
        app[PRICES]["bench.paid"] = PriceRule("bench.paid", 10, description="benchmark")
        app.router.add_get("/bench/paid", priced("bench.paid")(trivial_paid))
    from service.cli.operator import _event_loop

    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=_event_loop(),
                reuse_port=args.reuse_port)


if __name__ == "__main__":
    main()
