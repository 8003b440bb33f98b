"""Benchmark targets: `bare` is a plain aiohttp app; `app` is our app plus a trivial free and priced route."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web  # noqa: E402


async def trivial(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def trivial_paid(request: web.Request) -> web.Response:
    """The same handler as `trivial`, as a separate function so that only this one carries a price."""
    return await trivial(request)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bare", "app"])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    if args.mode == "bare":
        app = web.Application()
        app.router.add_get("/bench/free", trivial)
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

    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=_event_loop())


if __name__ == "__main__":
    main()
