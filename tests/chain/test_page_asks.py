"""Asking an expert from the web page: invoice (BIP21 + QR) → confirmed deposit → question delivered →
reply or refund on the private link. Unconfirmed coins never deliver (the escrow rule of payments/onchain.py)."""
from __future__ import annotations

import re
from urllib.parse import unquote

from service.chain.backends import Esplora
from service.chain.watcher import credit_deposits
from service.experts import Experts
from service.ledger import user_account

PRICE = 1500


async def _ask_from_page(rig, text: str, issue: str = "") -> tuple[str, str, str]:
    """(expert username, private link, page HTML) after submitting the expert page's form."""
    expert = await rig.user(0)
    status, _ = await rig.signed(expert, "PUT", "/v1/experts/me",
                                 {"display_name": "Ex", "price": PRICE, "reply_hours": 24})
    assert status == 200
    async with rig.http.get(f"{rig.url}/experts/{expert.username}") as r:
        assert '<form method="post"' in await r.text()
    async with rig.http.post(f"{rig.url}/experts/{expert.username}/ask", data={"text": text, "issue": issue},
                             allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        link = r.headers["Location"]
    assert re.fullmatch(r"/asks/[A-Za-z0-9_-]{43}", link)
    async with rig.http.get(f"{rig.url}{link}") as r:
        assert r.headers["Cache-Control"] == "no-store" and r.headers["Referrer-Policy"] == "no-referrer"
        return expert, link, await r.text()


async def _page(rig, link: str) -> str:
    async with rig.http.get(f"{rig.url}{link}") as r:
        assert r.status == 200
        return await r.text()


def _status(html: str) -> str:
    return re.search(r'id="status">([^<]+)<', html).group(1)


async def test_page_ask_is_delivered_once_the_payment_confirms_then_shows_the_reply(chain_rig, ledger):
    rig = await chain_rig(deposit_confirmations=2)
    issue = "https://github.com/kubernetes/kubernetes/issues/12345"
    expert, link, html = await _ask_from_page(rig, "Why <b>is</b> my pod pending?", issue)
    uri = unquote(re.search(r'id="bip21">([^<]+)<', html).group(1).replace("&amp;", "&"))
    address = re.search(r'id="address">([^<]+)<', html).group(1)
    assert uri.startswith(f"bitcoin:{address}?amount=0.000015&label=") and "<svg" in html and "Why &lt;b&gt;is" in html
    assert _status(html) == "awaiting payment" and f'href="{issue}"' in html
    assert f"microtasks ask {expert.username} &#39;Why &lt;b&gt;is&lt;/b&gt; my pod pending?&#39; --max-price {PRICE}" in html

    backend = Esplora(rig.esplora.url, timeout=5, retries=0)
    rig.esplora.deposit(address, PRICE + 100, height=None)  # in the mempool: not accepted for an escrow
    assert await credit_deposits(rig.book, backend, ledger, 2) == 0
    assert _status(await _page(rig, link)) == "awaiting payment"
    status, inbox = await rig.signed(expert, "GET", "/v1/experts/me/questions")
    assert inbox["questions"] == []

    txid = next(iter(rig.esplora.index))
    rig.esplora.mine(txid, confirmations=2)
    for tx in rig.esplora.txs[address]:
        tx["status"] = rig.esplora.index[txid]["status"]
    assert await credit_deposits(rig.book, backend, ledger, 2) == 1
    html = await _page(rig, link)  # the view advances it (the sweeper does too)
    assert _status(html) == "open"
    status, inbox = await rig.signed(expert, "GET", "/v1/experts/me/questions")
    [q] = inbox["questions"]
    assert q["text"] == "Why <b>is</b> my pod pending?" and q["issue"] == issue and q["money"]["escrow"] == PRICE
    status, _ = await rig.signed(expert, "POST", f"/v1/questions/{q['id']}/reply", {"text": "Requests > <node>."})
    assert status == 201
    html = await _page(rig, link)
    assert _status(html) == "answered" and "Requests &gt; &lt;node&gt;." in html
    assert 'http-equiv="refresh"' not in html
    # the 100 sat paid above the price stay with the ask: the link offers them back
    assert 'id="refund">100 sat' in html


async def test_unanswered_page_ask_is_refunded_and_withdrawn_from_the_link(chain_rig, ledger, settings):
    rig = await chain_rig(deposit_confirmations=1, minimum_withdrawal=1000)
    expert, link, html = await _ask_from_page(rig, "anyone?")
    address = re.search(r'id="address">([^<]+)<', html).group(1)
    rig.esplora.deposit(address, PRICE, height=rig.esplora.tip)
    assert await credit_deposits(rig.book, Esplora(rig.esplora.url, timeout=5, retries=0), ledger, 1) == 1
    assert _status(await _page(rig, link)) == "open"
    xp = Experts(ledger.redis, settings.redis_prefix, ledger, rig.payouts)
    [qid] = [q for q in await ledger.redis.zrange(xp._k("open"), 0, -1)]
    await xp.close(qid, "expired")
    html = await _page(rig, link)
    assert _status(html) == "expired" and f'id="refund">{PRICE} sat' in html
    async with rig.http.post(f"{rig.url}{link}/refund", data={"address": "not-an-address"}) as r:
        assert r.status == 422
    payout = "tb1qw508d6qejxtdg4y5r3zarvary0c5xw7kxpjzsx"
    async with rig.http.post(f"{rig.url}{link}/refund", data={"address": payout}) as r:
        html = await r.text()
    assert r.status == 200 and f"{PRICE} sat to <code>{payout}</code>, queued" in html
    asker = await ledger.balance(user_account(f"~ask-{re.search(r'q_web([0-9a-f]+)', qid).group(1)}"))
    assert asker.available == 0


async def test_the_private_link_is_needed_and_invalid_forms_are_refused(chain_rig):
    rig = await chain_rig()
    expert = await rig.user(0)
    await rig.signed(expert, "PUT", "/v1/experts/me", {"display_name": "Ex", "price": PRICE})
    async with rig.http.post(f"{rig.url}/experts/{expert.username}/ask",
                             data={"text": "x", "issue": "https://github.com/evil/k/issues/1"}) as r:
        text = await r.text()
        assert r.status == 422 and 'id="errors"' in text and "Kubernetes GitHub issue" in text
    async with rig.http.post(f"{rig.url}/experts/{expert.username}/ask", data={"text": ""}) as r:
        assert r.status == 422
    async with rig.http.get(f"{rig.url}/asks/{'x' * 43}") as r:
        assert r.status == 404


async def test_web_asks_are_rate_limited_per_ip(chain_rig):
    """Each web ask derives a deposit address: one client cannot make the server derive without bound."""
    from endpoints.pages import WEB_ASKS_PER_MINUTE

    rig = await chain_rig()
    expert = await rig.user(0)
    await rig.signed(expert, "PUT", "/v1/experts/me", {"display_name": "Ex", "price": PRICE})
    statuses = []
    for _ in range(WEB_ASKS_PER_MINUTE + 1):
        async with rig.http.post(f"{rig.url}/experts/{expert.username}/ask", data={"text": "q"},
                                 allow_redirects=False) as r:
            statuses.append(r.status)
    assert statuses == [303] * WEB_ASKS_PER_MINUTE + [429]


async def test_concurrent_deliveries_fund_the_escrow_once(chain_rig, ledger, settings):
    """The sweeper and page views may all advance one ask at once: one question, funded once."""
    import asyncio

    from service.page_asks import PageAsks

    rig = await chain_rig(deposit_confirmations=1)
    expert, link, html = await _ask_from_page(rig, "race")
    address = re.search(r'id="address">([^<]+)<', html).group(1)
    rig.esplora.deposit(address, PRICE * 3, height=rig.esplora.tip)
    assert await credit_deposits(rig.book, Esplora(rig.esplora.url, timeout=5, retries=0), ledger, 1) == 1
    xp = Experts(ledger.redis, settings.redis_prefix, ledger, rig.payouts)
    asks = PageAsks(ledger.redis, settings.redis_prefix, ledger, xp, rig.payouts, rig.book, confirmations=1)
    pages = await asyncio.gather(*[_page(rig, link) for _ in range(4)], asks.advance_all(), asks.advance_all())
    assert all(_status(p) == "open" for p in pages[:4])
    status, inbox = await rig.signed(expert, "GET", "/v1/experts/me/questions")
    [q] = inbox["questions"]
    assert q["money"]["escrow"] == PRICE
    ask_id = q["id"].removeprefix("q_web")
    assert (await ledger.balance(user_account(f"~ask-{ask_id}"))).available == PRICE * 2
