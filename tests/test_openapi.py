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


async def test_openapi_json_is_the_same_spec_with_mpp_discovery(aiohttp_server, make_app, http, tmp_path):
    """MPP discovery (draft-payment-discovery-01) reads GET /openapi.json: x-service-info on top, x-payment-info
    offers on every priced operation, from the same price as x-price; servers and quick-buy name PUBLIC_URL."""
    server = await aiohttp_server(make_app(validate_base_price=7, validate_per_document=3,
                                           public_url="https://qa.example.org"))
    async with http.get(server.make_url("/openapi.json")) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert r.headers["Cache-Control"] == "max-age=300"
        served = await r.json()
    async with http.get(server.make_url("/openapi.yaml")) as r:
        assert yaml.safe_load(await r.text()) == served
    assert served["servers"] == [{"url": "https://qa.example.org"}]
    assert served["info"]["x-21-quick-buy"].startswith("microtasks --server https://qa.example.org call POST "
                                                       "https://qa.example.org/v1/qa/validate")
    assert served["x-service-info"]["categories"] == ["developer-tools"]
    priced = [(path, op) for path, item in served["paths"].items() for op in item.values()
              if isinstance(op, dict) and "x-price" in op]
    assert priced and all("402" in op["responses"] for _, op in priced)
    for path, op in priced:
        (offer,) = op["x-payment-info"]["offers"]
        assert (offer["intent"], offer["method"], offer["currency"]) == ("charge", "bittransfer", "sat")
        fixed = op["x-price"]["formula"] == "fixed"
        assert offer["amount"] == (str(op["x-price"]["amount"]) if fixed else None), path
    validate = served["paths"]["/v1/qa/validate"]["post"]
    assert validate["x-payment-info"]["offers"][0]["description"].startswith("7 + 3 * documents")
    import jsonschema  # the draft's JSON Schema for one offer

    offer_schema = {"type": "object", "required": ["intent", "method", "amount"],
                    "properties": {"intent": {"enum": ["charge", "session"]}, "method": {"type": "string"},
                                   "amount": {"oneOf": [{"type": "null"}, {"type": "string",
                                                                          "pattern": "^(0|[1-9][0-9]*)$"}]},
                                   "currency": {"type": "string"}, "description": {"type": "string"}}}
    for _, op in priced:
        for offer in op["x-payment-info"]["offers"]:
            jsonschema.validate(offer, offer_schema)


def test_strict_parsers_accept_the_spec():
    """prance resolves every $ref (no self-referencing schema), a strict YAML loader finds no duplicate key
    (PyYAML silently keeps the last one), and info.license names its SPDX identifier."""
    import pytest

    prance = pytest.importorskip("prance", reason="prance is in the [test] extra")
    from ruamel.yaml import YAML

    strict = YAML(typ="safe")
    strict.allow_duplicate_keys = False
    strict.load(OPENAPI_PATH.read_text())
    parsed = prance.ResolvingParser(str(OPENAPI_PATH), backend="openapi-spec-validator")
    assert parsed.specification["paths"].keys() == spec()["paths"].keys()
    assert spec()["info"]["license"] == {"name": "MIT", "identifier": "MIT"}


def test_kubernetes_versions_in_the_spec_are_the_supported_ones():
    """The enum schemathesis and clients read is the list the server accepts (kubernetes-validate's)."""
    from service.qa.manifests import supported_versions

    doc = spec()
    query = next(p for p in doc["paths"]["/v1/qa/validate"]["post"]["parameters"] if p["name"] == "kubernetes_version")
    body = doc["paths"]["/v1/qa/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for schema in (query["schema"], body["properties"]["kubernetes_version"]):
        assert schema["enum"] == [""] + supported_versions()


def test_every_operation_declares_its_security():
    """redocly's recommended `security-defined`: public operations say `security: []`, others name a scheme."""
    doc = spec()
    schemes = doc["components"]["securitySchemes"]
    for path, item in doc["paths"].items():
        for verb, op in item.items():
            assert "security" in op, f"{verb.upper()} {path}"
            assert all(name in schemes for requirement in op["security"] for name in requirement), path
