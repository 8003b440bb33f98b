"""The real service plus one priced route that takes SLOW_SECONDS (for kill and shutdown tests); started
with the same `serve` code path as `python -m service serve`."""
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiohttp import web  # noqa: E402

from service import app as app_module  # noqa: E402
from service.cli.operator import main  # noqa: E402
from service.pricing import priced  # noqa: E402


@priced("qa.validate")
async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "5")))
    return web.json_response({"done": True})


_create = app_module.create_app


def create_app(settings):
    application = _create(settings)
    application.router.add_post("/test/slow", slow)
    return application


app_module.create_app = create_app

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
