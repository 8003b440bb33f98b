"""No signature, token secret, admin token or private material in any log line; a request id on each."""
from __future__ import annotations

import io
import json

import pytest

from service.client import PaidSession
from service.logs import configure_logging


@pytest.fixture
def captured():
    stream = io.StringIO()
    configure_logging("debug", stream=stream)
    yield stream
    configure_logging("info")


async def test_logs_hold_no_secrets(captured, http, base_url, funded, manifest, admin_post):
    wallet = await funded(5000)
    secrets: list[str] = []
    async with PaidSession(wallet, max_price=500, session=http) as s:
        _, token = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"max_total": 1000})
        secrets.append(token["token"].split(".")[1])
        status, _, headers = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
        assert status == 200
    async with PaidSession(max_price=500, token=token["token"], session=http) as s:
        await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
    async with http.post(f"{base_url}/v1/qa/validate", data=manifest,
                         headers={"Bitcoin-Transfer": "{}", "Authorization": "c2lnbmF0dXJl"}) as r:
        assert r.status == 400
    lines = [json.loads(line) for line in captured.getvalue().splitlines() if line.startswith("{")]
    text = captured.getvalue()
    assert lines and all(line.get("request_id") for line in lines if line["event"] == "request")
    for secret in [*secrets, "test-admin-token-3f9a", wallet.private_key.hex(), "c2lnbmF0dXJl", "payer_pubkey"]:
        assert secret not in text, secret
    assert any(line["event"] == "payment_captured" for line in lines)
