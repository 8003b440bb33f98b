"""Hostile payment headers: random and mutated BitTransfers, tokens, raw transactions and x402 payloads
never cause a 5xx and never change the ledger."""
from __future__ import annotations

import base64
import json


import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from service.client import transfer_headers

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
    balance = await ledger.balance("u:" + wallet.username)
    async with http.post(url, data=MANIFEST, headers=headers) as r:
        body = await r.json()
        assert r.status < 500, (headers, body)
        assert set(body) >= {"error", "detail"} or r.status == 200
    if r.status != 200:
        assert await ledger.redis.xlen(ledger.journal_key) == journal
        assert await ledger.balance("u:" + wallet.username) == balance


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
