"""GET /metrics: what an operator's Prometheus scrapes moves with what clients do (deltas: counters are
per process and shared by the tests of this session)."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.client import PaidSession
from service.keys import REVENUE


async def scrape(http: Any, url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    async with http.get(f"{url}/metrics", headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_paid_calls_move_the_counters(http, base_url, failing_url, funded, manifest):
    wallet = await funded(1000)
    before = await scrape(http, base_url)
    async with http.post(f"{base_url}/v1/qa/validate", data=manifest) as r:
        assert r.status == 402
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, _, _ = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
        assert status == 200
        status, _, _ = await s.request("POST", f"{failing_url}/test/unavailable", data=b"{}")
        assert status == 503
    async with http.get(f"{base_url}/v1/accounts/{wallet.username}") as r:
        assert r.status in (200, 401)
    after = await scrape(http, base_url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("microtasks_payment_required_total", route="/v1/qa/validate", reason="payment_required") == 2
    assert delta("microtasks_payments_total", method="bittransfer", outcome="captured") == 1
    assert delta("microtasks_payments_total", method="bittransfer", outcome="voided") == 1
    assert delta("microtasks_sats_total", flow="captured") == 120
    assert delta("microtasks_sats_total", flow="voided") == 100
    assert delta("microtasks_http_requests_total", route="/v1/qa/validate", method="POST", status="402") >= 2
    assert delta("microtasks_http_requests_total", route="/v1/qa/validate", method="POST", status="200") == 1
    # route templates, never raw paths: one series for every account name
    assert delta("microtasks_http_requests_total", route="/v1/accounts/{username}", method="GET", status="200") \
        + delta("microtasks_http_requests_total", route="/v1/accounts/{username}", method="GET", status="401") == 1
    assert not any(wallet.username in dict(labels).get("route", "") for _, labels in after)
    assert value(after, "microtasks_holds_pending") == 0 and value(after, "microtasks_ledger_ready") == 1
    assert value(after, "microtasks_redis_ping_seconds_count") >= 1
    assert ("microtasks_queue_depth", (("queue", "qa_runs"),)) in after


async def test_a_pending_hold_shows_with_its_age(http, base_url, ledger):
    from service.ledger import GRANTS, user_account  # noqa: PLC0415
    from service.ledger import AccountKind  # noqa: PLC0415

    await ledger.open_account(user_account("metrics-payer"), AccountKind.USER)
    await ledger.post("grant-1", GRANTS, user_account("metrics-payer"), 500)
    await ledger.hold("h-1", user_account("metrics-payer"), REVENUE, 200, timeout=60)
    samples = await scrape(http, base_url)
    assert value(samples, "microtasks_holds_pending") == 1
    assert 0 <= value(samples, "microtasks_hold_oldest_age_seconds") < 60


async def test_metrics_token_guards_the_scrape_when_set(aiohttp_server, make_app, http):
    server = await aiohttp_server(make_app(metrics_token="scrape-secret"))
    url = str(server.make_url("")).rstrip("/")
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 401 and (await r.json())["error"] == "metrics_token_required"
    samples = await scrape(http, url, Authorization="Bearer scrape-secret")
    assert value(samples, "microtasks_ledger_ready") == 1
