"""Maps the ApiError tree (and aiohttp's own HTTP errors, and Redis outages) to JSON error bodies."""
from __future__ import annotations

from typing import Awaitable, Callable

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from .challenge import render_refusal
from .deployment import absolute_url
from .errors import ApiError, PaymentRequired
from .state import SETTINGS

__all__ = ["error_middleware", "json_error"]

log = structlog.get_logger("errors")


def json_error(status: int, code: str, detail: object = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


def _allow(request: web.Request) -> dict[str, str]:
    """`Allow` for a 405 on a path that is a route of its own (`/v1/experts/me`): that route's methods only,
    not those of a templated route the path also matches (`/v1/experts/{username}`: an expert named "me")."""
    methods = {route.method for resource in request.app.router.resources()
               if resource.canonical == request.path and "{" not in resource.canonical for route in resource}
    return {"Allow": ",".join(sorted(methods))} if methods else {}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        render = getattr(request.match_info.handler, "render_error", None)  # an HTML page answers in HTML
        if render is not None:
            return render(request, exc)
        if isinstance(exc, PaymentRequired):  # every 402 in one shape (service/challenge.py), wherever raised
            return render_refusal(absolute_url(request.app[SETTINGS], request), exc.code, exc.detail, exc.headers)
        return json_error(exc.status, exc.code, exc.detail, exc.headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(413, "payload_too_large", exc.text)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if exc.status == 405:
            allow = _allow(request) or allow
        return json_error(exc.status, code, exc.text if exc.text and not exc.text.startswith(str(exc.status)) else None,
                          allow)
    except RedisError as exc:
        log.error("redis_unavailable", error=str(exc))
        return json_error(503, "ledger_unavailable", "the ledger cannot be reached or answered too late; if this "
                          "request moves money, look at your account (GET /v1/accounts/me) before retrying",
                          {"Retry-After": "1"})
    except Exception:
        log.exception("unhandled_error")
        return json_error(500, "internal_error", "an unexpected error occurred; nothing was charged")
