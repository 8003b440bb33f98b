"""A document's `kind` and `apiVersion` (from which the schema file name is built) are checked against
Kubernetes' own patterns and lengths before any file is looked up: a 300-character, NUL, path-like or
non-ASCII one is that document's validation error, charged like any invalid document, never a 5xx, and
never an "infrastructure" failure that retries and refunds a paid run."""
from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET

import pytest

from service.client import PaidSession, signed_headers
from service.ledger import user_account

GOOD = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n"
HOSTILE = {
    "long kind": (b"apiVersion: v1\nkind: " + b"A" * 300 + b"\nmetadata: {name: x}\n", "kind"),
    "NUL in kind": (b'apiVersion: v1\nkind: "Config\\0Map"\nmetadata: {name: x}\n', "kind"),
    "non-ASCII kind": ('apiVersion: v1\nkind: "Kïnd"\nmetadata: {name: x}\n'.encode(), "kind"),
    "path in apiVersion": (b"apiVersion: ../../../../etc/v1\nkind: passwd\nmetadata: {name: x}\n", "apiVersion"),
    "long apiVersion": (b"apiVersion: " + b"g" * 300 + b".io/v1\nkind: Widget\nmetadata: {name: x}\n", "apiVersion"),
    "slash in kind": (b"apiVersion: v1\nkind: a/b\nmetadata: {name: x}\n", "kind"),
}
PRICE_2_DOCS = 100 + 2 * 20  # /v1/qa/validate: base + per document


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_kind_or_api_version_is_a_charged_validation_error(http, base_url, funded, ledger, case):
    body, field = HOSTILE[case]
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, result, _ = await s.request("POST", f"{base_url}/v1/qa/validate", data=GOOD + b"---\n" + body)
    assert status == 200, result
    good, hostile = result["documents"]
    assert good["valid"] is True
    assert hostile["valid"] is False and [e["path"] for e in hostile["errors"]] == [field], hostile
    assert result["summary"]["invalid"] == 1 and result["valid"] is False
    spent = 1000 - (await ledger.balance(user_account(wallet.username))).posted
    assert spent == s.spent > 0  # charged like any invalid document


@pytest.mark.parametrize("case", ["long kind", "NUL in kind", "path in apiVersion"])
async def test_a_paid_run_with_a_hostile_kind_fails_on_the_document_and_is_not_refunded(http, base_url, funded,
                                                                                       ledger, case):
    wallet = await funded(1000)
    manifests = (GOOD + b"---\n" + HOSTILE[case][0]).decode()
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, created, _ = await s.request("POST", f"{base_url}/v1/qa/runs",
                                             data=json.dumps({"suite": "schema", "manifests": manifests}),
                                             headers={"Content-Type": "application/json"})
        assert status == 202, created
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, run = await s.signed_get(f"{base_url}/v1/qa/runs/{created['id']}")
            if run["status"] in ("passed", "failed", "error"):
                break
            await asyncio.sleep(0.1)
    assert run["status"] == "failed", run  # the user's document failed, not the worker
    assert any(f["path"] == HOSTILE[case][1] for f in run["findings"]), run["findings"]
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - created["price"]
    url = f"{base_url}{run['junit']}"
    async with http.get(url, headers=signed_headers(wallet, "GET", url)) as r:  # CI can still read the report
        assert r.status == 200
        suite = ET.fromstring(await r.text()).find("testsuite")
    assert suite.get("failures") == "1"
