"""Payout preferences, withdrawals (held for the operator's signer) and the owner's account view."""
from __future__ import annotations

from service.client import PaidSession
from service.ledger import BITCOIN, user_account
from service.payouts import Payouts

ADDRESS = "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"  # testnet: the test settings' network


async def signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def test_withdrawal_beyond_the_balance_moves_nothing(http, base_url, funded, ledger):
    user = await funded(20_000)
    journal = await ledger.redis.xlen(ledger.journal_key)
    status, body = await signed(http, user, "POST", f"{base_url}/v1/accounts/me/withdrawals",
                                {"amount": 20_001, "address": ADDRESS})
    assert (status, body["error"]) == (402, "insufficient_funds")
    assert (await ledger.balance(user_account(user.username))).available == 20_000
    assert await ledger.redis.xlen(ledger.journal_key) == journal


async def test_withdrawal_is_held_then_settled_by_the_operator(http, base_url, funded, ledger, settings):
    user = await funded(50_000)
    status, wd = await signed(http, user, "POST", f"{base_url}/v1/accounts/me/withdrawals",
                              {"amount": 30_000, "address": ADDRESS})
    assert status == 201 and wd["state"] == "queued"
    balance = await ledger.balance(user_account(user.username))
    assert (balance.posted, balance.available) == (50_000, 20_000)
    payouts = Payouts(ledger.redis, settings.redis_prefix, ledger, network=settings.network)
    assert [w["id"] for w in await payouts.queued()] == [wd["id"]]
    await payouts.settle(wd["id"], "ab" * 32)
    assert (await ledger.balance(user_account(user.username))).posted == 20_000
    assert (await ledger.balance(BITCOIN)).posted == 30_000
    assert (await ledger.reconcile()).ok


async def test_bad_withdrawals_name_the_field(http, base_url, funded):
    user = await funded(50_000)
    for body, field in [({"amount": 30_000, "address": "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"}, "address"),
                        ({"amount": 100, "address": ADDRESS}, "amount"),
                        ({"amount": 1.5, "address": ADDRESS}, "amount")]:
        status, got = await signed(http, user, "POST", f"{base_url}/v1/accounts/me/withdrawals", body)
        assert status == 422 and field in got["detail"], got


async def test_address_payout_withdraws_automatically_above_the_minimum(http, base_url, funded, ledger, settings,
                                                                         admin_post):
    user = await funded(5_000)
    status, pref = await signed(http, user, "PUT", f"{base_url}/v1/accounts/me/payout",
                                {"payout": f"address:{ADDRESS}", "minimum": 12_000})
    assert status == 200 and pref == {"mode": f"address:{ADDRESS}", "minimum": 12_000}
    payouts = Payouts(ledger.redis, settings.redis_prefix, ledger, network=settings.network)
    assert await payouts.auto_withdraw() == 0
    await admin_post("/v1/admin/credits", {"username": user.username, "amount": 8_000, "reason": "bounty"})
    assert await payouts.auto_withdraw() == 1
    [wd] = await payouts.of(user.username)
    assert (wd["amount"], wd["address"]) == (13_000, ADDRESS)
    assert (await ledger.balance(user_account(user.username))).available == 0


async def test_account_me_shows_pending_earnings_and_payout(http, base_url, funded):
    user = await funded(50_000)
    await signed(http, user, "POST", f"{base_url}/v1/accounts/me/withdrawals", {"amount": 10_000, "address": ADDRESS})
    status, me = await signed(http, user, "GET", f"{base_url}/v1/accounts/me")
    assert status == 200
    assert (me["balance"], me["pending"], me["available"]) == (50_000, 10_000, 40_000)
    assert me["earnings"] == {"grants": 50_000} and me["payout"]["mode"] == "keep"
    assert me["withdrawals"][0]["state"] == "queued"


async def test_unknown_charity_or_bad_address_payout_is_refused(http, base_url, funded):
    user = await funded(0)
    for payout in ("charity:nope", "address:1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"):
        status, got = await signed(http, user, "PUT", f"{base_url}/v1/accounts/me/payout", {"payout": payout})
        assert status == 422 and "payout" in got["detail"]


async def test_concurrent_withdrawals_never_hold_more_than_the_balance(http, base_url, funded, ledger):
    """Withdrawal race: 20 withdrawals of 50,000 at once from 200,000 → exactly 4 queued, the rest 402."""
    import asyncio

    user = await funded(200_000)
    async with PaidSession(user, session=http) as s:
        results = await asyncio.gather(*[
            s.signed("POST", f"{base_url}/v1/accounts/me/withdrawals", {"amount": 50_000, "address": ADDRESS})
            for _ in range(20)])
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] * 4 + [402] * 16, statuses
    balance = await ledger.balance(user_account(user.username))
    assert (balance.posted, balance.available) == (200_000, 0)
    status, listed = await signed(http, user, "GET", f"{base_url}/v1/accounts/me")
    assert status == 200 and len([w for w in listed["withdrawals"] if w["state"] == "queued"]) == 4
    assert (await ledger.reconcile()).ok
