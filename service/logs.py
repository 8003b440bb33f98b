"""structlog JSON logs: one line per event, the request id bound on every line, secrets never written."""
from __future__ import annotations

import logging
import re
import sys
import time
import itertools
import secrets
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from . import protocol as P

__all__ = ["configure_logging", "request_context_middleware", "redact"]

_SECRET_KEYS = re.compile(r"(authorization|signature|secret|token|password|bitcoin[-_]transfer|privkey|private)", re.I)
_REQUEST_ID = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
_PROCESS_TAG = secrets.token_hex(6)  # unique per process; a counter makes ids unique within it
_counter = itertools.count(1)


def redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Last line of defence: drop any field whose name says it holds a secret or a signature."""
    for key in list(event):
        if _SECRET_KEYS.search(key):
            event[key] = "[redacted]"
    return event


def configure_logging(level: str = "info", stream: Any = None) -> None:
    logging.basicConfig(format="%(message)s", stream=stream or sys.stdout, level=level.upper(), force=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


access_log = structlog.get_logger("access")


@web.middleware
async def request_context_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Bind a request id (the client's X-Request-Id if sane, else a new one) and write one access line."""
    incoming = request.headers.get(P.REQUEST_ID, "")
    request_id = incoming if _REQUEST_ID.match(incoming) else f"{_PROCESS_TAG}-{next(_counter):x}"
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[P.REQUEST_ID] = request_id
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        access_log.info("request", method=request.method, path=request.path, status=status,
                        ms=round((time.perf_counter() - started) * 1000, 2))
