"""Public HTML pages for people (server-rendered, no JavaScript): home, experts, lists, catalog, and asking
an expert from the browser. Handlers parse, call the same service functions as the JSON API, render.

Every user-supplied string reaches the page through Jinja2 autoescaping; the one inline `<style>` is
allowed by its hash in the Content-Security-Policy, and nothing else runs. A web ask's private link is a
capability: pages under it are `no-store` and every page sends `Referrer-Policy: no-referrer`, so the
link never leaks to the sites it links to (GitHub issues, profiles).
"""
from __future__ import annotations

import base64
import hashlib
import shlex
from decimal import Decimal
from functools import wraps
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import jinja2
import segno
from aiohttp import web
from marshmallow import ValidationError

from service.deployment import origin
from service.errors import ApiError
from service.experts import CHARITIES, ask_price
from service.ratelimit import client_ip
from service.rates import SATS_PER_BTC
from service.schemas import QuestionSchema
from service.state import ADDRESSES, EXPERTS, LIMITER, PAGE_ASKS, RATES, SETTINGS

from .marketplace import priced_operations

__all__ = ["setup", "CSP"]

_CSS = resources.files(__package__).joinpath("templates/style.css").read_text()
CSP = ("default-src 'none'; style-src 'sha256-" + base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
       + "'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
WEB_ASKS_PER_MINUTE = 5  # per client IP: each ask derives a deposit address
_question = QuestionSchema()
Page = Callable[[web.Request], Awaitable[dict[str, Any]]]


def _page(template: str, *, private: bool = False) -> Callable[[Page], Callable[[web.Request], Awaitable[web.Response]]]:
    """Render `template` with the handler's context; an ApiError becomes an HTML error page of its status."""

    def wrap(handler: Page) -> Callable[[web.Request], Awaitable[web.Response]]:
        @wraps(handler)
        async def render(request: web.Request) -> web.Response:
            try:
                ctx = await handler(request)
            except ApiError as exc:
                return render_error(request, exc)
            response = aiohttp_jinja2.render_template(template, request, {**_base(request), **ctx},
                                                      status=ctx.get("status_code", 200))
            return _secured(response, private)

        render.render_error = render_error  # type: ignore[attr-defined]  # web_errors: refusals before the handler
        return render

    return wrap


def render_error(request: web.Request, exc: ApiError) -> web.Response:
    """An ApiError as an HTML page of its status (its Retry-After and similar headers kept)."""
    response = aiohttp_jinja2.render_template("error.html", request, {
        **_base(request), "code": exc.code, "detail": exc.detail}, status=exc.status)
    response.headers.update(exc.headers or {})
    return _secured(response, True)


def _secured(response: web.StreamResponse, private: bool = False) -> web.StreamResponse:
    response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                             "Referrer-Policy": "no-referrer"})
    if private:
        response.headers["Cache-Control"] = "no-store"
    return response


def _base(request: web.Request) -> dict[str, Any]:
    return {"css": jinja2.utils.markupsafe.Markup(_CSS), "origin": origin(request.app[SETTINGS], request)}


async def _usd(request: web.Request, sats: int) -> str | None:
    """The dollar quote of a sat amount at the configured rate; None when no rate is available."""
    try:
        rate = await request.app[RATES].current()
    except ApiError:
        return None
    return f"{(Decimal(sats) * rate.usd_per_btc / SATS_PER_BTC).quantize(Decimal('0.01'))}"


# --- read-only pages ----------------------------------------------------------------------------------
@_page("index.html")
async def index(request: web.Request) -> dict[str, Any]:
    s = request.app[SETTINGS]
    return {"onchain": ADDRESSES in request.app, "confirmations": s.deposit_confirmations, "network": s.network,
            "experts": len(await request.app[EXPERTS].list_experts(None)), "lists": len(await request.app[EXPERTS].lists())}


@_page("experts.html")
async def experts(request: web.Request) -> dict[str, Any]:
    return {"experts": await request.app[EXPERTS].list_experts(None)}


async def _expert(request: web.Request) -> dict[str, Any]:
    profile = await request.app[EXPERTS].profile(request.match_info["username"])
    try:
        price = int(await ask_price(profile, request.app[RATES]))
    except ApiError:
        price = None
    mode = profile["payout"]
    return {"p": profile, "price": price, "usd": profile["price_usd"] or (price and await _usd(request, price)),
            "charity": CHARITIES.get(mode[8:], mode[8:]) if mode.startswith("charity:") else None,
            "onchain": ADDRESSES in request.app, "confirmations": request.app[SETTINGS].deposit_confirmations,
            "cli": f"microtasks ask {profile['username']} 'your question' --max-price {price or 'PRICE'}"}


@_page("expert.html")
async def expert(request: web.Request) -> dict[str, Any]:
    return await _expert(request)


@_page("lists.html")
async def lists(request: web.Request) -> dict[str, Any]:
    return {"lists": await request.app[EXPERTS].lists()}


@_page("list.html")
async def list_page(request: web.Request) -> dict[str, Any]:
    lst = await request.app[EXPERTS].get_list(request.match_info["name"])
    return {"l": lst, "usd": await _usd(request, lst["price"])}


@_page("catalog.html")
async def catalog(request: web.Request) -> dict[str, Any]:
    return {"operations": priced_operations(request.app)}


# --- asking from the page -----------------------------------------------------------------------------
@_page("expert.html")
async def ask(request: web.Request) -> dict[str, Any]:
    """The form's POST: validated like the API's ask, then recorded with its own payment address."""
    ctx = await _expert(request)
    form = await request.post()
    raw = {"text": str(form.get("text", "")).replace("\r\n", "\n")}
    if form.get("issue"):
        raw["issue"] = str(form["issue"]).strip()
    try:
        data = _question.load(raw)
    except ValidationError as exc:
        return {**ctx, "errors": exc.messages, "form": raw, "status_code": 422}
    if ctx["price"] is None:
        return {**ctx, "errors": {"price": ["no dollar rate is available right now; retry shortly"]}, "form": raw,
                "status_code": 503}
    s = request.app[SETTINGS]
    await request.app[LIMITER].check("web-ask", client_ip(request, s), WEB_ASKS_PER_MINUTE)
    capability = await request.app[PAGE_ASKS].create(ctx["p"]["username"], data["text"], data.get("issue"),
                                                     ctx["price"])
    raise web.HTTPSeeOther(f"/asks/{capability}")


def bip21(address: str, sats: int, label: str) -> str:
    """BIP21 URI: amount in BTC as a decimal without exponent or trailing zeros."""
    btc = format((Decimal(sats) / SATS_PER_BTC).normalize(), "f")
    return f"bitcoin:{address}?" + urlencode({"amount": btc, "label": label}, quote_via=quote)


@_page("ask.html", private=True)
async def ask_status(request: web.Request) -> dict[str, Any]:
    view = await request.app[PAGE_ASKS].view(request.match_info["capability"])
    due = max(view["price"] - view["credited"], 0)
    uri = bip21(view["address"], due or view["price"], f"k8s-microtasks ask {view['id']}")
    return {"a": view, "due": due, "capability": request.match_info["capability"], "uri": uri, "usd": await _usd(request, view["price"]),
            # a QR of our own URI (an address and an amount, no user text): safe to inline
            "qr": jinja2.utils.markupsafe.Markup(segno.make(uri, error="m").svg_inline(scale=4, title="payment QR")),
            "cli": f"microtasks ask {view['expert']} {shlex.quote(view['text'])} --max-price {view['price']}",
            "refresh": view["question"] is None or view["status"] in ("open", "expiring")}


@_page("ask.html", private=True)
async def refund(request: web.Request) -> dict[str, Any]:
    """Withdraw what the ask's account holds (a refund) to the address given, through the payout queue."""
    capability = request.match_info["capability"]
    form = await request.post()
    await request.app[PAGE_ASKS].withdraw_refund(capability, str(form.get("address", "")).strip()[:100])
    raise web.HTTPSeeOther(f"/asks/{capability}")


def setup(app: web.Application) -> None:
    """Templates (package data of `endpoints`, autoescaped) and the page routes, apart from /v1."""
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("endpoints", "templates"),
                         autoescape=jinja2.select_autoescape(["html"]))
    app.router.add_routes([
        web.get("/", index),
        web.get("/experts", experts),
        web.get("/experts/{username}", expert),
        web.post("/experts/{username}/ask", ask),
        web.get("/asks/{capability}", ask_status),
        web.post("/asks/{capability}/refund", refund),
        web.get("/lists", lists),
        web.get("/lists/{name}", list_page),
        web.get("/catalog", catalog),
    ])
