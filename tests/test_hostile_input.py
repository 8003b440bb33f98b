"""Hostile payment headers: random and mutated BitTransfers, tokens, raw transactions and x402 payloads
never cause a 5xx and never change the ledger."""
from __future__ import annotations

import base64
import json


import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from service.client import transfer_headers
from service.keys import user_account

MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"

text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=10)


def mutations(valid: dict[str, str]):
    transfer = json.loads(valid["Bitcoin-Transfer"])
    field = st.sampled_from(sorted(transfer))
    return st.one_of(
        # a valid transfer with one field replaced by anything
        st.tuples(field, json_values).map(lambda kv: {**valid, "Bitcoin-Transfer": json.dumps({**transfer, kv[0]: kv[1]})}),
        # raw garbage in each header
        st.fixed_dictionaries({"Bitcoin-Transfer": text, "Authorization": text}),
        st.fixed_dictionaries({"Authorization": text.map(lambda t: "Token " + t)}),
        st.fixed_dictionaries({"Authorization": st.just("Token tk_0123456789abcdef.") .map(lambda p: p) | text.map(
            lambda t: "Token tk_0123456789abcdef." + t)}),
        st.fixed_dictionaries({"PAYMENT-SIGNATURE": text}),
        st.fixed_dictionaries({"PAYMENT-SIGNATURE": json_values.map(lambda v: base64.b64encode(json.dumps(v).encode()).decode())}),
        st.fixed_dictionaries({"PAYMENT-SIGNATURE": st.builds(lambda a, p: base64.b64encode(json.dumps(
            {"x402Version": 2, "accepted": a, "payload": p}).encode()).decode(),
            st.dictionaries(text, json_values, max_size=3), st.dictionaries(text, json_values, max_size=3))}),
        st.fixed_dictionaries({"Bitcoin-Transaction": st.binary(max_size=300).map(bytes.hex)}),
        st.fixed_dictionaries({"Bitcoin-Transaction": text}),
        # a valid signature over a mutated transfer, and signature bytes flipped
        st.integers(0, 63).map(lambda i: {**valid, "Authorization": _flip(valid["Authorization"], i)}),
    )


def _flip(sig_b64: str, i: int) -> str:
    raw = bytearray(base64.b64decode(sig_b64))
    raw[i] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
async def test_hostile_payment_headers_never_5xx_never_move_money(http, base_url, funded, ledger, settings, data):
    if not hasattr(test_hostile_payment_headers_never_5xx_never_move_money, "wallet"):
        test_hostile_payment_headers_never_5xx_never_move_money.wallet = await funded(10_000)
    wallet = test_hostile_payment_headers_never_5xx_never_move_money.wallet
    url = f"{base_url}/v1/qa/validate"
    valid = transfer_headers(wallet, amount=120, payee_username=settings.payee_username,
                             payee_address=settings.payee_address, url=url)
    headers = data.draw(mutations(valid))
    journal = await ledger.redis.xlen(ledger.journal_key)
    balance = await ledger.balance(user_account(wallet.username))
    async with http.post(url, data=MANIFEST, headers=headers) as r:
        body = await r.json()
        assert r.status < 500, (headers, body)
        assert set(body) >= {"error", "detail"} or r.status == 200
    if r.status != 200:
        assert await ledger.redis.xlen(ledger.journal_key) == journal
        assert await ledger.balance(user_account(wallet.username)) == balance


@pytest.mark.parametrize("extra", [
    {"X-Big": "a" * 20_000},                          # one header over 8 KiB
    {f"X-H{i}": "v" for i in range(200)},             # more headers than the parser accepts
], ids=["header-too-long", "too-many-headers"])
async def test_oversized_headers_are_refused_before_the_app(http, base_url, manifest, funded, ledger, extra):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    pay = transfer_headers(wallet, amount=120, payee_username="microtasks",
                           payee_address="tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", url=url)
    journal = await ledger.redis.xlen(ledger.journal_key)
    async with http.post(url, data=manifest, headers={**pay, **extra}) as r:
        assert r.status == 400
    assert await ledger.redis.xlen(ledger.journal_key) == journal  # the payment attached was not taken


async def raw_request(base_url: str, method: str, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"") -> tuple[int, dict]:
    """One HTTP/1.1 request written byte for byte (a client library would refuse these headers)."""
    import asyncio

    from yarl import URL

    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: " + f"{url.host}:{url.port}".encode(),
             b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    lines += [k + b": " + v for k, v in headers]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = {"raw": payload[:200].decode("latin-1")}
    return status, parsed


@pytest.mark.parametrize("path", [b"/v1/admin/credits", b"/v1/admin/accounts"])
async def test_undecodable_bearer_on_admin_routes_is_401(base_url, ledger, path):
    journal = await ledger.redis.xlen(ledger.journal_key)
    status, body = await raw_request(base_url, "POST", path, [(b"Authorization", b"Bearer \xff\xfe"),
                                                              (b"Content-Type", b"application/json")], b"{}")
    assert status == 401, body
    assert await ledger.redis.xlen(ledger.journal_key) == journal


@pytest.mark.parametrize("value", ["someone:\u00b2:AAAA", "someone:\u0663\u0663:AAAA", "someone:１７００００００００:AAAA",
                                   "someone:99999999999999999999999999:AAAA", "someone:-5:AAAA", "someone: 17:AAAA"])
@pytest.mark.parametrize("method,path", [("GET", "/v1/accounts/me"), ("POST", "/v1/accounts/me/tokens"),
                                         ("GET", "/v1/experts/me/questions"), ("PUT", "/v1/experts/me")])
async def test_signed_route_with_a_foreign_numeral_timestamp_is_401(http, base_url, value, method, path):
    async with http.request(method, f"{base_url}{path}", json={},
                            headers={"Authorization": f"MT-Sig {value}"}) as r:
        assert r.status == 401, await r.text()
        assert (await r.json())["error"] == "malformed_auth"


async def test_undecodable_header_bytes_anywhere_are_4xx(base_url):
    for name in (b"Authorization", b"Bitcoin-Transfer", b"Idempotency-Key", b"X-Request-Id", b"Accept", b"X-Forwarded-For"):
        status, body = await raw_request(base_url, "POST", b"/v1/qa/validate", [(name, b"MT-Sig a:\xed\xa0\x80:\xff")])
        assert 400 <= status < 500, (name, status, body)
    status, body = await raw_request(base_url, "GET", b"/v1/accounts/me", [(b"Authorization", b"MT-Sig \xff:1:AA")])
    assert status == 401, body


@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "１", "0", "-1", "1e3", "9" * 40, "%ff", "1%0a"])
async def test_limit_query_with_foreign_numerals_is_400(http, base_url, funded, limit):
    from service.client import signed_headers

    from yarl import URL

    wallet = await funded(0)
    url = str(URL(f"{base_url}/v1/accounts/{wallet.username}?limit={limit}"))  # as sent: percent-encoded
    async with http.get(URL(url, encoded=True), headers=signed_headers(wallet, "GET", url)) as r:
        assert r.status == 400, await r.text()


async def test_invoice_with_a_foreign_numeral_is_refused_not_500(http, base_url, funded, settings):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    for invoice in ("inv_\u00b2_ab_cd", "inv_1_ab_\u00e9\u00e9", "inv_99999999999999999999999_a_b"):
        pay = transfer_headers(wallet, amount=120, payee_username=settings.payee_username,
                               payee_address=settings.payee_address, url=url, invoice=invoice)
        async with http.post(url, data=MANIFEST, headers=pay) as r:
            assert r.status < 500, (invoice, await r.text())
