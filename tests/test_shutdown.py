"""Shutdown is bounded: every background task stops on cancel, even one whose work swallows the
cancellation (as a client library that turns CancelledError into its own error does)."""
from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestServer

from service.state import EXPERTS


async def _swallows_cancel() -> int:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RuntimeError("connection reset during cancel") from None  # the cancel becomes an Exception
    return 0


async def test_sweeper_stops_even_when_its_work_swallows_the_cancel(make_app):
    app = make_app(hold_timeout=4, qa_workers=1)  # the sweeper wakes up every second
    server = TestServer(app)
    await server.start_server()
    app[EXPERTS].expire_questions = _swallows_cancel
    await asyncio.sleep(1.5)  # the sweeper is now inside expire_questions
    started = time.monotonic()
    closing = asyncio.ensure_future(server.close())
    done, _ = await asyncio.wait({closing}, timeout=15)
    assert done, "shutdown hung: the sweeper went back to sleep after cancel()"
    assert time.monotonic() - started < 12
