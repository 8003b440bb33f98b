"""The expert marketplace's money paths over HTTP: pay on reply, refund on deadline, shares, charities."""
from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json

import pytest
from aiohttp import web

from service.client import PaidSession
from service.experts import Experts
from service.payouts import Payouts, charity_account
from service.ledger import user_account

PRICE = 500


async def signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def make_expert(http, base_url, wallet, **fields):
    profile = {"display_name": wallet.username.title(), "tags": ["networking"], "price": PRICE, "reply_hours": 24,
               **fields}
    status, body = await signed(http, wallet, "PUT", f"{base_url}/v1/experts/me", profile)
    assert status == 200, body
    return body


async def ask(http, base_url, asker, path, body, max_price=10_000):
    async with PaidSession(asker, max_price=max_price, session=http) as s:
        status, q, _ = await s.request("POST", f"{base_url}{path}", data=json.dumps(body),
                                       headers={"Content-Type": "application/json"})
    assert status == 201, q
    return q


@pytest.fixture
def xp(ledger, settings):
    return Experts(ledger.redis, settings.redis_prefix, ledger,
                   Payouts(ledger.redis, settings.redis_prefix, ledger, network=settings.network))


async def expire(xp: Experts, qid: str) -> None:
    """Move a question's deadline into the past, as if its time had run out."""
    await xp.redis.hset(xp._k("q", qid), "deadline", 1)
    await xp.redis.zadd(xp._k("open"), {qid: 1})


async def balances(ledger, *wallets):
    return [(await ledger.balance(user_account(w.username))).posted for w in wallets]


async def test_402_quotes_the_experts_price_and_reply_pays_once(http, base_url, funded, ledger):
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    async with http.post(f"{base_url}/v1/experts/{expert.username}/questions", json={"text": "CNI?"}) as r:
        assert r.status == 402 and r.headers["Price"] == str(PRICE)
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "Which CNI for bare metal?"})
    assert q["money"] == {"price_each": PRICE, "shares": 1, "paid": 0, "escrow": PRICE, "refund": None}
    assert await balances(ledger, asker, expert) == [1500, 0]
    status, inbox = await signed(http, expert, "GET", f"{base_url}/v1/experts/me/questions")
    assert [i["id"] for i in inbox["questions"]] == [q["id"]]
    status, rep = await signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply", {"text": "Cilium."})
    assert status == 201 and rep["paid"] == PRICE
    status, again = await signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply", {"text": "x"})
    assert (status, again["error"]) == (409, "already_replied")
    assert await balances(ledger, asker, expert) == [1500, PRICE]
    status, view = await signed(http, asker, "GET", f"{base_url}/v1/questions/{q['id']}")
    assert view["status"] == "answered" and view["replies"][0]["text"] == "Cilium." and view["money"]["escrow"] == 0
    status, profile = await signed(http, asker, "GET", f"{base_url}/v1/experts/{expert.username}")
    assert profile["stats"]["answered"] == 1
    assert (await ledger.reconcile()).ok


async def test_racing_replies_are_paid_once(http, base_url, funded, ledger):
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "race"})
    results = await asyncio.gather(*[signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply",
                                            {"text": f"answer {i}"}) for i in range(10)])
    assert sorted(status for status, _ in results) == [201] + [409] * 9
    assert await balances(ledger, asker, expert) == [1500, PRICE]
    assert (await ledger.reconcile()).ok


async def test_deadline_refunds_once_and_late_reply_is_refused(http, base_url, funded, ledger, xp):
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "slow"})
    await expire(xp, q["id"])
    assert await xp.expire_questions() == 1
    assert await xp.expire_questions() == 0
    await xp.close(q["id"], "expired")  # a second close moves nothing
    assert await balances(ledger, asker, expert) == [2000, 0]
    status, late = await signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply", {"text": "late"})
    assert (status, late["error"]) == (409, "question_closed")
    assert (await xp.profile(expert.username))["stats"]["expired"] == 1
    assert (await ledger.reconcile()).ok


async def test_reply_and_sweeper_race_exactly_one_wins(http, base_url, funded, ledger, xp):
    for _ in range(5):
        asker, expert = await funded(2000), await funded(0)
        await make_expert(http, base_url, expert)
        q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "race"})
        # the reply passed its deadline check just before the sweeper ran: both scripts race in Redis
        reply, refund = await asyncio.gather(xp.reply(q["id"], expert.username, "mine", None),
                                             xp.close(q["id"], "expired"), return_exceptions=True)
        got = await balances(ledger, asker, expert)
        assert got in ([1500, PRICE], [2000, 0]), got
        assert (got == [1500, PRICE]) == (not isinstance(reply, Exception))
    assert (await ledger.reconcile()).ok


async def test_list_question_pays_at_most_n_and_refunds_the_rest(http, base_url, funded, ledger, xp):
    owner, asker = await funded(0), await funded(10_000)
    members = [await funded(0) for _ in range(5)]
    status, lst = await signed(http, owner, "POST", f"{base_url}/v1/lists",
                               {"name": f"k8s-{owner.username}", "price": 100, "description": "Kubernetes"})
    assert status == 201
    for m in members:
        await signed(http, m, "POST", f"{base_url}/v1/lists/{lst['name']}/members/me")
    q = await ask(http, base_url, asker, f"/v1/lists/{lst['name']}/questions", {"text": "HPA?", "max_responses": 3})
    assert q["money"]["escrow"] == 300
    replies = await asyncio.gather(*[signed(http, m, "POST", f"{base_url}/v1/questions/{q['id']}/reply",
                                            {"text": "use KEDA"}) for m in members])
    codes = sorted((status, body.get("error", "")) for status, body in replies)
    assert codes == [(201, "")] * 3 + [(409, "no_paid_shares_left")] * 2
    assert sorted(await balances(ledger, *members)) == [0, 0, 100, 100, 100]
    # a second question: 2 of 3 shares earned, the third goes back at the deadline
    q2 = await ask(http, base_url, asker, f"/v1/lists/{lst['name']}/questions", {"text": "VPA?", "max_responses": 3})
    for m in members[:2]:
        await signed(http, m, "POST", f"{base_url}/v1/questions/{q2['id']}/reply", {"text": "maybe"})
    await expire(xp, q2["id"])
    await xp.expire_questions()
    assert (await ledger.balance(user_account(asker.username))).posted == 10_000 - 300 - 200
    status, view = await signed(http, asker, "GET", f"{base_url}/v1/questions/{q2['id']}")
    assert view["money"]["paid"] == 2 and view["money"]["escrow"] == 0 and view["money"]["refund"]
    assert (await ledger.reconcile()).ok


async def test_charity_payout_lands_on_the_charity(http, base_url, funded, ledger):
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert, payout="charity:black-girls-code")
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "?"})
    before = (await ledger.balance(charity_account("black-girls-code"))).posted
    await signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply", {"text": "!"})
    assert (await ledger.balance(charity_account("black-girls-code"))).posted == before + PRICE
    assert await balances(ledger, expert) == [0]
    async with http.get(f"{base_url}/v1/charities") as r:
        names = {c["id"] for c in (await r.json())["charities"]}
    assert names >= {"coincenter", "black-girls-code", "folding-at-home", "code-to-inspire"}


async def test_unknown_charity_is_refused(http, base_url, funded):
    expert = await funded(0)
    status, body = await signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                {"display_name": "x", "price": 5, "payout": "charity:nope"})
    assert status == 422 and "payout" in body["detail"]


async def test_withdraw_before_a_reply_refunds_and_after_is_refused(http, base_url, funded, ledger):
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "never mind"})
    status, view = await signed(http, asker, "POST", f"{base_url}/v1/questions/{q['id']}/withdraw")
    assert status == 200 and view["status"] == "withdrawn"
    assert await balances(ledger, asker) == [2000]
    q2 = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "keep"})
    await signed(http, expert, "POST", f"{base_url}/v1/questions/{q2['id']}/reply", {"text": "done"})
    status, body = await signed(http, asker, "POST", f"{base_url}/v1/questions/{q2['id']}/withdraw")
    assert (status, body["error"]) == (409, "already_answered")
    assert (await ledger.reconcile()).ok


async def test_survey_replies_are_validated_and_exported(http, base_url, funded):
    owner, asker, member = await funded(0), await funded(5000), await funded(0)
    status, lst = await signed(http, owner, "POST", f"{base_url}/v1/lists",
                               {"name": f"survey-{owner.username}", "price": 50, "approval_required": True})
    status, joined = await signed(http, member, "POST", f"{base_url}/v1/lists/{lst['name']}/members/me")
    assert joined["state"] == "pending"
    await signed(http, owner, "POST", f"{base_url}/v1/lists/{lst['name']}/members/{member.username}/approve")
    form = [{"id": "version", "type": "choice", "label": "Which version?", "options": ["1.30", "1.31"]},
            {"id": "nodes", "type": "number", "label": "How many nodes?"}]
    q = await ask(http, base_url, asker, f"/v1/lists/{lst['name']}/questions",
                  {"text": "Cluster survey", "max_responses": 2, "form": form})
    status, bad = await signed(http, member, "POST", f"{base_url}/v1/questions/{q['id']}/reply",
                               {"text": "hi", "answers": {"version": "1.12", "nodes": "many"}})
    assert status == 422 and set(bad["detail"]["answers"]) == {"version", "nodes"}
    status, _ = await signed(http, member, "POST", f"{base_url}/v1/questions/{q['id']}/reply",
                             {"text": "ok", "answers": {"version": "1.31", "nodes": 12}})
    assert status == 201
    status, text = await signed(http, asker, "GET", f"{base_url}/v1/questions/{q['id']}/responses?format=csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["by", "at", "version", "nodes", "text"] and rows[1][2:] == ["1.31", "12", "ok"]


async def test_hire_request_only_when_available(http, base_url, funded):
    asker, busy, free = await funded(5000), await funded(0), await funded(0)
    await make_expert(http, base_url, busy)
    await make_expert(http, base_url, free, available_for_hire=True)
    async with http.post(f"{base_url}/v1/experts/{busy.username}/hire-requests", json={"text": "job?"}) as r:
        assert r.status == 400 and (await r.json())["error"] == "not_for_hire"
    q = await ask(http, base_url, asker, f"/v1/experts/{free.username}/hire-requests", {"text": "job?"})
    assert q["kind"] == "hire" and q["money"]["escrow"] == PRICE


async def test_new_question_webhook_is_signed(http, make_app, funded, aiohttp_server):
    # the receiver is on loopback: the operator's allow-list lets webhooks reach it (SSRF rules otherwise)
    base_url = str((await aiohttp_server(make_app(webhook_allow=("127.0.0.0/8",), webhook_allow_http=True)))
                   .make_url("")).rstrip("/")
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Microtasks-Signature"]))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    asker, expert = await funded(2000), await funded(0)
    profile = await make_expert(http, base_url, expert, webhook=str(receiver.make_url("/hook")))
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "ping"})
    for _ in range(50):
        if received:
            break
        await asyncio.sleep(0.05)
    body, signature = received[0]
    expected = hmac.new(profile["webhook_secret"].encode(), body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}" and json.loads(body)["id"] == q["id"]


async def test_experts_are_listed_by_tag(http, base_url, funded):
    a, b = await funded(0), await funded(0)
    await make_expert(http, base_url, a, tags=["storage"])
    await make_expert(http, base_url, b, tags=["golang"])
    async with http.get(f"{base_url}/v1/experts?tag=storage") as r:
        names = [e["username"] for e in (await r.json())["experts"]]
    assert names == [a.username]


async def _failed_ask(http, base_url, asker, expert):
    async with PaidSession(asker, max_price=10_000, session=http) as s:
        status, body, _ = await s.request("POST", f"{base_url}/v1/experts/{expert.username}/questions",
                                          data=json.dumps({"text": "CNI?"}),
                                          headers={"Content-Type": "application/json"})
    assert status == 503, body
    return body


async def test_an_ask_whose_delivery_fails_after_the_capture_is_refunded_and_cannot_be_replied_to(
        http, base_url, funded, ledger, xp):
    """Escrow stuck after a Redis error: the ask is captured into the question's escrow before it is
    delivered. If delivering fails (injected: the expert's inbox key is made the wrong type), the asker
    has the price back at once, the escrow is empty, and the undelivered question takes no reply."""
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    await xp.redis.set(xp._k("inbox", expert.username), "not an inbox")
    await _failed_ask(http, base_url, asker, expert)
    [qid] = await xp.redis.zrange(xp._k("asked", asker.username), 0, -1)
    assert await balances(ledger, asker, expert) == [2000, 0]
    assert (await ledger.balance(Experts.escrow(qid))).posted == 0
    status, body = await signed(http, expert, "POST", f"{base_url}/v1/questions/{qid}/reply", {"text": "Cilium."})
    assert (status, body["error"]) == (404, "unknown_question")
    status, body = await signed(http, asker, "GET", f"{base_url}/v1/questions/{qid}")
    assert (status, body["error"]) == (404, "unknown_question")  # undelivered: as if never asked
    await xp.redis.delete(xp._k("inbox", expert.username))
    await expire(xp, qid)
    await xp.expire_questions()  # the deadline sweeper closes it; nothing is left to refund
    assert await balances(ledger, asker, expert) == [2000, 0]
    q = await ask(http, base_url, asker, f"/v1/experts/{expert.username}/questions", {"text": "again?"})
    status, rep = await signed(http, expert, "POST", f"{base_url}/v1/questions/{q['id']}/reply", {"text": "Cilium."})
    assert status == 201 and await balances(ledger, asker, expert) == [1500, PRICE]
    assert (await ledger.reconcile()).ok


async def test_an_ask_whose_record_cannot_be_written_is_not_charged(http, base_url, funded, ledger, xp):
    """The question's record (with its deadline, so the sweeper can always refund its escrow) is written
    before the payment is captured: if that write fails, the hold is voided and nothing is charged."""
    asker, expert = await funded(2000), await funded(0)
    await make_expert(http, base_url, expert)
    await xp.redis.set(xp._k("asked", asker.username), "not a zset")
    await _failed_ask(http, base_url, asker, expert)
    balance = await ledger.balance(user_account(asker.username))
    assert (balance.posted, balance.pending_debits) == (2000, 0)
    status, inbox = await signed(http, expert, "GET", f"{base_url}/v1/experts/me/questions")
    assert inbox["questions"] == []
    assert (await ledger.reconcile()).ok
