"""Discovery: the OpenAPI document (with live prices), the JSON catalog, and x402 Bazaar items."""
from __future__ import annotations

import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from service import protocol as P
from service.deployment import origin
from service.pricing import PriceRule, describe, route_rule
from service.state import METHODS, PRICES, SETTINGS

# the checkout's copy, or the one a wheel installs under <prefix>/share/microtasks (the container image)
OPENAPI_PATH = next((p for p in (Path(__file__).resolve().parent.parent / "openapi.yaml",
                                 Path(sys.prefix) / "share" / "microtasks" / "openapi.yaml") if p.exists()),
                    Path(__file__).resolve().parent.parent / "openapi.yaml")


@lru_cache(maxsize=1)
def _spec_on_disk() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI_PATH.read_text())


def priced_operations(app: web.Application) -> list[dict[str, Any]]:
    """Every priced route of the app with its live price rule."""
    book: dict[str, PriceRule] = app[PRICES]
    out = []
    for route in app.router.routes():
        marker = route_rule(route.handler)
        if marker is None:
            continue
        price = describe(marker.rule, book)
        description = book[marker.rule].description if marker.rule in book else route.handler.__doc__ or ""
        out.append({"method": route.method, "path": route.resource.canonical, "description": description.strip(),
                    "price": price})
    return out


async def openapi(request: web.Request) -> web.Response:
    """openapi.yaml with each x-price replaced by the operator's configured price, and this deployment's
    PUBLIC_URL as its server."""
    spec = _spec_on_disk()
    book: dict[str, PriceRule] = request.app[PRICES]
    live: dict[str, Any] = {"servers": [{"url": origin(request.app[SETTINGS], request)}], "paths": {}}
    for path, item in spec.get("paths", {}).items():
        live["paths"][path] = {}
        for verb, op in item.items():
            if isinstance(op, dict) and "x-price" in op:
                op = {**op, "x-price": describe(op["x-price"]["rule"], book)}
            live["paths"][path][verb] = op
    text = yaml.safe_dump({**spec, **live}, sort_keys=False, allow_unicode=True)
    return web.Response(text=text, content_type="application/yaml")


async def catalog(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({"payee": s.payee_username, "network": s.caip2, "currency": "sat",
                              "operations": priced_operations(request.app)})


async def x402_discovery(request: web.Request) -> web.Response:
    """x402 Bazaar-style items: one per priced operation, accepts quoted at its base price."""
    s = request.app[SETTINGS]
    base = origin(s, request)  # PUBLIC_URL, never the Host header
    items = []
    escrowed = {(r.method, r.resource.canonical) for r in request.app.router.routes()
                if (marker := route_rule(r.handler)) is not None and marker.credit is not None}
    for op in priced_operations(request.app):
        amount = op["price"].get("amount", min((v["amount"] for v in op["price"].get("variants", {}).values()), default=0))
        accepts = [entry for m in request.app[METHODS].methods  # an escrow takes no 0-conf coins
                   if not (m.name in (P.METHOD_ONCHAIN, P.METHOD_EXACT_BTC) and (op["method"], op["path"]) in escrowed)
                   and (entry := m.offer_template(amount)) is not None]
        items.append({
            "resource": base + op["path"], "type": "http", "x402Version": 2, "accepts": accepts,
            "lastUpdated": int(time.time()),
            "metadata": {"method": op["method"], "description": op["description"], "price": op["price"],
                         "payee": s.payee_username},
        })
    return web.json_response({"x402Version": 2, "items": items})
