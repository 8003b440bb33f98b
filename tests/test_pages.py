"""The public HTML pages over HTTP: content from the same sources as the JSON API, every user string
escaped, the CSP header, no secrets, errors as HTML, and no collision with /v1 or the paywall."""
from __future__ import annotations

import json

from service.client import PaidSession

HOSTILE = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'


async def signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def make_expert(http, base_url, wallet, **fields):
    profile = {"display_name": wallet.username.title(), "tags": ["networking"], "price": 500, "reply_hours": 24,
               **fields}
    status, body = await signed(http, wallet, "PUT", f"{base_url}/v1/experts/me", profile)
    assert status == 200, body
    return body


async def page(http, url, status=200):
    async with http.get(url) as r:
        text = await r.text()
        assert r.status == status, text
        assert r.content_type == "text/html"
        assert "script-src" not in r.headers["Content-Security-Policy"]  # default-src 'none': no script runs
        assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert r.headers["Referrer-Policy"] == "no-referrer"
        return text


async def test_home_experts_lists_and_catalog_render(http, base_url, funded):
    expert = await funded(0)
    await make_expert(http, base_url, expert, price=None, price_usd="0.50", payout="charity:coincenter",
                      available_for_hire=True, github="octo-cat", twitter="octo_cat", linkedin="octo-cat-1")
    status, _ = await signed(http, expert, "POST", f"{base_url}/v1/lists",
                             {"name": "kubernetes", "description": "K8s experts", "price": 700})
    assert status == 201
    home = await page(http, f"{base_url}/")
    assert "Two ways to pay" in home and "1 expert" in home and "1 list" in home
    listing = await page(http, f"{base_url}/experts")
    assert f'href="/experts/{expert.username}"' in listing and "$0.50" in listing
    profile = await page(http, f"{base_url}/experts/{expert.username}")
    # $0.50 at the fixed test rate of 60000 USD/BTC: ceil(0.50e8 / 60000) = 834 sat
    assert "834 sat" in profile and "≈ $0.50" in profile and "Coin Center (charity)" in profile
    assert "https://github.com/octo-cat" in profile and 'id="github-unverified"' in profile
    assert "https://x.com/octo_cat" in profile and "https://www.linkedin.com/in/octo-cat-1" in profile
    assert f"microtasks ask {expert.username} &#39;your question&#39; --max-price 834" in profile
    assert "hire-requests" in profile
    lists = await page(http, f"{base_url}/lists")
    assert 'href="/lists/kubernetes"' in lists and "700 sat" in lists
    one = await page(http, f"{base_url}/lists/kubernetes")
    assert expert.username in one and "members/me" in one
    async with http.get(f"{base_url}/v1/catalog") as r:
        ops = (await r.json())["operations"]
    catalog = await page(http, f"{base_url}/catalog")
    for op in ops:
        assert f"{op['method']} {op['path']}" in catalog


async def test_hostile_profile_and_list_text_is_escaped(http, base_url, funded):
    expert = await funded(0)
    await make_expert(http, base_url, expert, display_name=HOSTILE, bio=HOSTILE + "\nsecond line",
                      links={HOSTILE[:32]: "https://example.org/?q=<script>"})
    await signed(http, expert, "POST", f"{base_url}/v1/lists", {"name": "evil", "description": HOSTILE, "price": 5})
    for path in ("/experts", f"/experts/{expert.username}", "/lists", "/lists/evil"):
        text = await page(http, f"{base_url}{path}")
        assert "<script>" not in text and "<img src=x" not in text, path
        assert "&lt;script&gt;" in text, path


async def test_no_secrets_and_errors_are_html_pages(http, base_url, funded, settings):
    expert = await funded(0)
    body = await make_expert(http, base_url, expert)
    text = await page(http, f"{base_url}/experts/{expert.username}")
    for secret in (body["webhook_secret"], settings.invoice_secret, settings.admin_token):
        assert secret not in text
    missing = await page(http, f"{base_url}/experts/nobody-here", status=404)
    assert "unknown expert" in missing
    await page(http, f"{base_url}/asks/{'A' * 43}", status=404)
    async with http.get(f"{base_url}/asks/short") as r:  # not a capability's shape: refused before the handler, in HTML
        assert r.status == 404 and r.content_type == "text/html"


async def test_pages_do_not_shadow_the_json_api_or_the_paywall(http, base_url, funded):
    expert = await funded(0)
    await make_expert(http, base_url, expert)
    async with http.get(f"{base_url}/v1/experts/{expert.username}") as r:
        assert r.status == 200 and r.content_type == "application/json"
    async with http.post(f"{base_url}/v1/experts/{expert.username}/questions", json={"text": "hi"}) as r:
        assert r.status == 402  # the API's paywall is untouched
    async with http.get(f"{base_url}/catalog") as r:
        assert r.status == 200 and "Payment" not in r.headers and "WWW-Authenticate" not in r.headers


async def test_without_an_xpub_the_page_offers_only_the_cli(http, base_url, funded):
    expert = await funded(0)
    await make_expert(http, base_url, expert)
    text = await page(http, f"{base_url}/experts/{expert.username}")
    assert "takes no on-chain payments" in text and "<form" not in text
    async with http.post(f"{base_url}/experts/{expert.username}/ask", data={"text": "q"}) as r:
        assert r.status == 503 and "onchain unavailable" in await r.text()


async def test_question_carries_a_kubernetes_issue_url(http, base_url, funded):
    asker, expert = await funded(5000), await funded(0)
    await make_expert(http, base_url, expert)
    url = f"{base_url}/v1/experts/{expert.username}/questions"
    async with PaidSession(asker, max_price=1000, session=http) as s:
        evil = json.dumps({"text": "t", "issue": "https://github.com/evil/x/issues/1"})
        status, q, _ = await s.request("POST", url, data=evil, headers={"Content-Type": "application/json"})
        assert status == 422 and "issue" in q["detail"]
        issue = "https://github.com/kubernetes-sigs/kind/pull/3456"
        status, q, _ = await s.request("POST", url, data=json.dumps({"text": "t", "issue": issue}),
                                       headers={"Content-Type": "application/json"})
    assert status == 201 and q["issue"] == issue
    status, inbox = await signed(http, expert, "GET", f"{base_url}/v1/experts/me/questions")
    assert inbox["questions"][0]["issue"] == issue


def test_every_page_route_is_outside_v1_and_unpriced(make_app):
    from service.pricing import route_rule

    app = make_app()
    pages = [r for r in app.router.routes() if getattr(r.handler, "__module__", "") == "endpoints.pages"]
    assert {r.resource.canonical for r in pages} == {"/", "/experts", "/experts/{username}", "/experts/{username}/ask",
                                                    "/asks/{capability}", "/asks/{capability}/refund", "/lists",
                                                    "/lists/{name}", "/catalog"}
    for route in pages:
        assert not route.resource.canonical.startswith("/v1") and route_rule(route.handler) is None
