"""Twins of real and reserved names: every identifier is matched whole and canonical before it becomes a
key (`$` also matched before a final newline: "admin\\n" was registered and paid calls)."""
from __future__ import annotations

import pytest
from yarl import URL

from service.client import PaidSession, Wallet
from service.keys import user_account

TWINS = ["{v}\n", "{v}\r", "{v}\r\n", "{V}", "{v}\u200b", "\u200b{v}", "{v}\u0000", "{v} ", " {v}", "{v}\t",
         "{fw}", "{cyr}", "{v}\u202e", "{v}\x1b[0m"]
CYRILLIC = str.maketrans("aeopcx", "аеорсх")  # Latin → Cyrillic look-alikes


def twins(name: str) -> list[str]:
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in name)
    cyr = name.translate(CYRILLIC) if name.translate(CYRILLIC) != name else "\u0430" + name[1:]
    return [t.format(v=name, V=name.upper(), fw=fullwidth, cyr=cyr) for t in TWINS]


async def register(http, base_url, username: str) -> tuple[int, dict]:
    async with PaidSession(Wallet.generate(username), session=http) as s:
        return await s.register(base_url)


@pytest.mark.parametrize("reserved", ["admin", "microtasks", "root", "system", "me"])
async def test_no_twin_of_a_reserved_name_registers(http, base_url, admin_post, reserved):
    for name in [reserved, *twins(reserved)]:
        status, body = await register(http, base_url, name)
        assert status == 422 and "username" in body["detail"], (name, body)
        status, body = await admin_post("/v1/admin/accounts", {"username": name, "pubkey": "02" + "11" * 32})
        assert status == 422, (name, body)


async def test_no_twin_of_a_registered_user_registers_or_is_credited(http, base_url, funded, admin_post, ledger):
    victim = await funded(0)
    for name in twins(victim.username):
        status, body = await register(http, base_url, name)
        assert status == 422, (name, body)
        status, body = await admin_post("/v1/admin/credits", {"username": name, "amount": 5, "reason": "x"})
        assert status == 422, (name, body)
    assert (await ledger.balance(user_account(victim.username))).posted == 0


async def _signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def test_identifiers_in_bodies_are_validated_whole(http, base_url, funded, admin_post):
    owner = await funded(1000)
    status, body = await _signed(http, owner, "POST", f"{base_url}/v1/lists", {"name": "sre-team", "price": 10})
    assert status == 201, body
    cases = [
        ("POST", "/v1/lists", lambda v: {"name": v, "price": 10}, "name", twins("sre-team")),
        ("PUT", "/v1/accounts/me/payout", lambda v: {"payout": v}, "payout", ["keep\n", "keep\r", "KEEP", "charity:coincenter\n"]),
        ("PUT", "/v1/experts/me", lambda v: {"display_name": "X", "price": 5, "payout": v}, "payout", ["keep\n"]),
        ("PUT", "/v1/experts/me", lambda v: {"display_name": "X", "price": 5, "tags": [v]}, "tags", twins("golang")),
        ("POST", "/v1/accounts/me/tokens", lambda v: {"max_total": 10, "routes": [v]}, "routes",
         ["/v1/qa/validate\n", "/v1/qa/validate\r", "/v1/qa/validate\u200b"]),
        ("POST", "/v1/qa/runners", lambda v: {"labels": {v: "x"}}, "labels", twins("arch")),
    ]
    for method, path, make, field, values in cases:
        for value in values:
            status, body = await _signed(http, owner, method, f"{base_url}{path}", make(value))
            assert status == 422 and field in body["detail"], (path, value, body)
    for cid in ["abc\n", "abc\r", "abc\u200b"]:
        status, body = await admin_post("/v1/admin/credits", {"username": owner.username, "amount": 1, "reason": "x",
                                                              "id": cid})
        assert status == 422 and "id" in body["detail"], (cid, body)


async def test_path_parameters_are_validated_whole(http, base_url, funded):
    expert = await funded(0)
    status, body = await _signed(http, expert, "PUT", f"{base_url}/v1/experts/me", {"display_name": "E", "price": 5})
    assert status == 200, body
    for name in twins(expert.username):
        url = URL(f"{base_url}/v1/experts/") / name
        async with http.get(url) as r:
            assert r.status == 404, (name, await r.text())
    async with http.get(URL(f"{base_url}/v1/experts/{expert.username}")) as r:
        assert r.status == 200


async def test_a_tag_query_is_validated_whole(http, base_url):
    for tag in ["go\n", "GO", "g\u200bo", "go\r", "ｇｏ"]:
        async with http.get(URL(f"{base_url}/v1/experts").with_query(tag=tag)) as r:
            assert r.status == 400, (tag, await r.text())
    async with http.get(URL(f"{base_url}/v1/experts").with_query(tag="go")) as r:
        assert r.status == 200
