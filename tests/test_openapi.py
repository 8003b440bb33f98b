"""openapi.yaml is the contract: every app route is in it, prices agree, and it is valid OpenAPI 3.1."""
from __future__ import annotations

import yaml
from openapi_spec_validator import validate

from endpoints.marketplace import OPENAPI_PATH
from service.pricing import describe, price_book, route_rule


def spec() -> dict:
    return yaml.safe_load(OPENAPI_PATH.read_text())


def test_spec_is_valid_openapi_31():
    doc = spec()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_of_the_app_is_documented_and_nothing_else(make_app):
    app = make_app()
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(verb, path) for path, item in spec()["paths"].items() for verb in item
                  if verb in ("get", "post", "put", "delete", "patch")}
    assert served == documented


def test_prices_agree_with_the_price_book(make_app, settings):
    app = make_app()
    book = price_book(settings)
    paths = spec()["paths"]
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        op = paths[route.resource.canonical][route.method.lower()]
        marker = route_rule(route.handler)
        if marker is None:
            assert "x-price" not in op, f"{route.method} {route.resource.canonical} is free but documents a price"
        else:
            assert op["x-price"] == describe(marker.rule, book), route.resource.canonical


def test_21_marketplace_manifest_fields_are_kept():
    info = spec()["info"]
    assert info["x-21-category"] == "utilities" and info["x-21-keywords"]
    assert info["x-21-total-price"]["min"] <= info["x-21-total-price"]["max"]


async def test_served_spec_carries_the_operators_prices(aiohttp_server, make_app, http):
    server = await aiohttp_server(make_app(validate_base_price=7, validate_per_document=3))
    async with http.get(server.make_url("/openapi.yaml")) as r:
        assert r.status == 200
        served = yaml.safe_load(await r.text())
    price = served["paths"]["/v1/qa/validate"]["post"]["x-price"]
    assert (price["amount"], price["per_unit"]) == (7, 3)
    async with http.get(server.make_url("/v1/catalog")) as r:
        ops = {op["path"]: op for op in (await r.json())["operations"]}
    assert ops["/v1/qa/validate"]["price"] == price and ops["/v1/qa/validate"]["method"] == "POST"
    assert "schema" in ops["/v1/qa/runs"]["price"]["variants"]
    async with http.get(server.make_url("/.well-known/x402")) as r:
        items = {item["resource"].rsplit("/", 1)[-1]: item for item in (await r.json())["items"]}
    assert items["validate"]["type"] == "http" and items["validate"]["accepts"][0]["amount"] == "10"  # 7 + 3 * 1
    assert items["validate"]["x402Version"] == 2 and items["validate"]["metadata"]["method"] == "POST"
    assert "7 sat + 3 sat per document" in items["validate"]["description"]
