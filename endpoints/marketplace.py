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
from service.challenge import bazaar_extension
from service.errors import Unprocessable
from service.inputs import ascii_int
from service.deployment import origin
from service.payments.mpp import payment_info, service_info
from service.pricing import PriceRule, describe, route_rule
from service.state import METHODS, PRICES, SETTINGS

# the checkout's copy, or the one a wheel installs under <prefix>/share/microtasks (the container image)
OPENAPI_PATH = next((p for p in (Path(__file__).resolve().parent.parent / "openapi.yaml",
                                 Path(sys.prefix) / "share" / "microtasks" / "openapi.yaml") if p.exists()),
                    Path(__file__).resolve().parent.parent / "openapi.yaml")


SPEC_ORIGIN = "http://127.0.0.1:8402"  # the origin openapi.yaml names; served copies name the deployment's


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


def live_spec(request: web.Request) -> dict[str, Any]:
    """openapi.yaml with each x-price replaced by the operator's configured price, the IETF Payment scheme's
    discovery annotations (x-service-info, x-payment-info) derived from the same price, and this
    deployment's PUBLIC_URL as its server and in x-21-quick-buy."""
    spec = _spec_on_disk()
    book: dict[str, PriceRule] = request.app[PRICES]
    base = origin(request.app[SETTINGS], request)
    info = {**spec["info"], "x-21-quick-buy": spec["info"]["x-21-quick-buy"].replace(SPEC_ORIGIN, base)}
    live: dict[str, Any] = {"info": info, "servers": [{"url": base}], "paths": {},
                            "x-service-info": service_info(base)}
    for path, item in spec.get("paths", {}).items():
        live["paths"][path] = {}
        for verb, op in item.items():
            if isinstance(op, dict) and "x-price" in op:
                price = describe(op["x-price"]["rule"], book)
                op = {**op, "x-price": price, "x-payment-info": payment_info(price)}
            live["paths"][path][verb] = op
    return {**spec, **live}


async def openapi(request: web.Request) -> web.Response:
    text = yaml.safe_dump(live_spec(request), sort_keys=False, allow_unicode=True)
    return web.Response(text=text, content_type="application/yaml", headers={"Cache-Control": "max-age=300"})


async def openapi_json(request: web.Request) -> web.Response:
    """The same document as JSON, where MPP's discovery draft (draft-payment-discovery) looks for it."""
    return web.json_response(live_spec(request), headers={"Cache-Control": "max-age=300"})


async def catalog(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({"payee": s.payee_username, "network": s.caip2, "currency": "sat",
                              "operations": priced_operations(request.app)})


_STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # the prices are the process's settings


def _smallest_price(price: dict[str, Any]) -> tuple[int, str]:
    """(what the 402 asks for the smallest request, how the price grows): base + one unit when priced per
    unit (a 402 for one document asks 120 where the base is 100), the cheapest variant's otherwise."""
    rules = list(price["variants"].values()) if "variants" in price else [price]
    amounts = [(r["amount"] + r.get("per_unit", 0), r) for r in rules]
    amount, rule = min(amounts, key=lambda pair: pair[0])
    if rule.get("per_unit"):
        return amount, f"{rule['amount']} sat + {rule['per_unit']} sat per {rule['unit']}, from {amount} sat"
    return amount, f"{amount} sat" + (", the cheapest variant" if "variants" in price else "")


def discovery_items(request: web.Request) -> list[dict[str, Any]]:
    """One Bazaar item (the SDK's DiscoveryResource) per priced operation with a concrete URL: a route whose
    price a third party sets per path (an expert, a list) has no one amount to list and is left out."""
    s = request.app[SETTINGS]
    base = origin(s, request)  # PUBLIC_URL, never the Host header
    escrowed = {(r.method, r.resource.canonical) for r in request.app.router.routes()
                if (marker := route_rule(r.handler)) is not None and marker.credit is not None}
    items = []
    for op in priced_operations(request.app):
        if "{" in op["path"]:
            continue
        amount, how = _smallest_price(op["price"])
        accepts = [entry for m in request.app[METHODS].methods  # an escrow takes no 0-conf coins
                   if not (m.name == P.METHOD_EXACT_BTC and (op["method"], op["path"]) in escrowed)
                   and (entry := m.offer_template(amount)) is not None]  # None: not an x402 scheme
        items.append({
            "resource": base + op["path"], "type": "http", "x402Version": P.X402_VERSION, "accepts": accepts,
            "lastUpdated": _STARTED, "description": f"{op['description']} ({how})",
            "mimeType": "application/json", "serviceName": "K8s Community Microtasks",
            "tags": ["kubernetes", op["path"].split("/")[2]],
            "extensions": bazaar_extension(op["method"]),
            "metadata": {"method": op["method"], "price": op["price"], "payee": s.payee_username},
        })
    return items


async def x402_discovery(request: web.Request) -> web.Response:
    """The Bazaar list shape (x402 v2 §8.2): items, paged by `limit` (1-100) and `offset`."""
    limit = ascii_int(request.query.get("limit", "100"), 3)
    offset = ascii_int(request.query.get("offset", "0"), 9)
    if limit is None or offset is None or not 1 <= limit <= 100:
        raise Unprocessable("validation_error", {"limit": ["1-100"], "offset": [">= 0"]})
    items = discovery_items(request)
    return web.json_response({"x402Version": P.X402_VERSION, "items": items[offset:offset + limit],
                              "pagination": {"limit": limit, "offset": offset, "total": len(items)}})
