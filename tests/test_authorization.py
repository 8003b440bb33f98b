"""Authorization matrix: every route × {anonymous, another user, the owner, the operator} gets the expected
status, and nothing the owner keeps private (marked with MARK) reaches anyone else."""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest

from service.client import PaidSession, PriceTooHigh
from service.payment_auth import receipt_reference
from tests.conftest import ADMIN_TOKEN

MARK = "private-7c1e"  # in every private thing the owner has: question, run manifests, token label, job title
MANIFEST = f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {MARK}}}\n"
ROLES = ("anonymous", "other", "owner", "admin")
P = 402      # priced: no role gets past the paywall without paying (the operator's token is not money)
NF = 404
ANY_OK = (200, 201, 204)
EVIDENCE = '<testsuites><testsuite><testcase name="e2e"/></testsuite></testsuites>'  # a crowd result's JUnit

# (method, path, body, {role: expected status or statuses}, private): `private` routes must not show MARK
# to anyone but the owner. Placeholders are filled from the world the fixture builds.
MATRIX: list[tuple[str, str, Any, dict[str, Any], bool]] = [
    ("GET", "/healthz", None, dict.fromkeys(ROLES, 200), False),
    ("GET", "/readyz", None, dict.fromkeys(ROLES, 200), False),
    ("GET", "/metrics", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/openapi.yaml", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/openapi.json", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/catalog", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/.well-known/x402", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/discovery/resources", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/qa/suites", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/charities", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/experts", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/experts/{expert}", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/lists", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/v1/lists/{list}", None, dict.fromkeys(ROLES, 200), True),
    # the owner's account, receipts, tokens: the owner only
    ("GET", "/v1/accounts/me", None, {"anonymous": 401, "other": 200, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/accounts/{owner}", None, {"anonymous": 401, "other": 403, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/receipts/{receipt}", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/accounts/me/tokens", None, {"anonymous": 401, "other": 200, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/accounts/me/deposit-address", None, {"anonymous": 401, "other": NF, "owner": NF, "admin": 401}, True),
    ("PUT", "/v1/accounts/me/payout", {"payout": "keep"},
     {"anonymous": 401, "other": 200, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/accounts/me/withdrawals", {"amount": 1}, {"anonymous": 401, "other": 422, "owner": 422, "admin": 401}, True),
    ("POST", "/v1/accounts/me/tokens", {"label": "ci", "max_total": 100},
     {"anonymous": 401, "other": 201, "owner": 201, "admin": 401}, False),
    ("DELETE", "/v1/accounts/me/tokens/{token}", None, {"anonymous": 401, "other": NF, "owner": ANY_OK, "admin": 401}, True),
    ("POST", "/v1/accounts", {"username": "x", "pubkey": "02" + "11" * 32},
     dict.fromkeys(ROLES, (401, 422)), True),
    # operator API: the admin token only
    ("POST", "/v1/admin/accounts", {"username": "admin-made", "pubkey": "02" + "11" * 32},
     {"anonymous": 401, "other": 401, "owner": 401, "admin": (201, 422)}, True),
    ("POST", "/v1/admin/credits", {"username": "{owner}", "amount": 1, "reason": "matrix"},
     {"anonymous": 401, "other": 401, "owner": 401, "admin": 201}, True),
    # QA: runs are read by their buyer only; priced routes answer 402 to all
    ("POST", "/v1/qa/validate", MANIFEST, dict.fromkeys(ROLES, P), True),
    ("POST", "/v1/qa/runs", {"suite": "schema", "manifests": MANIFEST}, dict.fromkeys(ROLES, P), True),
    ("GET", "/v1/qa/runs/{run}", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/qa/runs/{run}/junit.xml", None, {"anonymous": 401, "other": NF, "owner": (200, 409), "admin": 401}, True),
    # crowd QA: the buyer runs the job; runners act for themselves
    ("POST", "/v1/qa/runners", {"labels": {"arch": "arm64"}}, {"anonymous": 401, "other": 201, "owner": 201, "admin": 401}, False),
    ("POST", "/v1/qa/jobs", {"title": "t", "labels": {}, "reward": 1, "results_wanted": 1},
     {"anonymous": 401, "other": 201, "owner": 201, "admin": 401}, False),
    ("GET", "/v1/qa/jobs/{job}", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/qa/jobs/claim", {"runner": "{runner}", "wait": 0},
     {"anonymous": 401, "other": (200, 204), "owner": NF, "admin": 401}, True),
    ("POST", "/v1/qa/jobs/{job}/result", {"runner": "{runner}", "status": "passed", "junit": EVIDENCE},
     {"anonymous": 401, "other": (201, 409), "owner": NF, "admin": 401}, True),
    ("POST", "/v1/qa/jobs/{job}/results/{result}/reject", {"reason": "no"},
     {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/qa/jobs/{job}/results/{result}/accept", None,
     {"anonymous": 401, "other": NF, "owner": (200, 409), "admin": 401}, True),
    ("POST", "/v1/qa/jobs/{job}/close", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    # experts: a question is read by its asker and its expert only
    ("PUT", "/v1/experts/me", {"display_name": "X", "tags": ["k8s"], "price": 100, "reply_hours": 24},
     {"anonymous": 401, "other": 200, "owner": 200, "admin": 401}, False),
    ("GET", "/v1/experts/me/questions", None, {"anonymous": 401, "other": 200, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/experts/{expert}/questions", {"text": "q"}, dict.fromkeys(ROLES, P), True),
    ("POST", "/v1/experts/{expert}/hire-requests", {"text": "hire"}, dict.fromkeys(ROLES, P), True),
    ("POST", "/v1/lists/{list}/questions", {"text": "q", "max_responses": 1}, dict.fromkeys(ROLES, P), True),
    ("GET", "/v1/questions/{question}", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("GET", "/v1/questions/{question}/responses", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/questions/{question}/reply", {"text": "a"}, {"anonymous": 401, "other": NF, "owner": NF, "admin": 401}, True),
    ("POST", "/v1/questions/{question}/withdraw", None, {"anonymous": 401, "other": NF, "owner": 200, "admin": 401}, True),
    ("POST", "/v1/lists", {"name": "{fresh}", "description": "d", "price": 100},
     {"anonymous": 401, "other": 201, "owner": 201, "admin": 401}, False),
    ("POST", "/v1/lists/{list}/members/me", None, {"anonymous": 401, "other": ANY_OK, "owner": (200, 201, 409), "admin": 401}, True),
    ("POST", "/v1/lists/{list}/members/{other}/approve", None,
     {"anonymous": 401, "other": 403, "owner": 200, "admin": 401}, True),
    ("DELETE", "/v1/lists/{list}/members/me", None, {"anonymous": 401, "other": ANY_OK, "owner": (200, 204, 409), "admin": 401}, True),
    ("POST", "/v1/experts/me/github", {"gist": "aa5a315d61ae9438b18d"},
     {"anonymous": 401, "other": 422, "owner": 422, "admin": 401}, True),
    # the web pages: public, and a web ask is read only through its private link (a capability)
    ("GET", "/", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/experts", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/experts/{expert}", None, dict.fromkeys(ROLES, 200), True),
    ("POST", "/experts/{expert}/ask", {"text": "q"}, dict.fromkeys(ROLES, 422), True),  # a form, not JSON
    ("GET", "/asks/{capability}", None, dict.fromkeys(ROLES, NF), True),
    ("POST", "/asks/{capability}/refund", None, dict.fromkeys(ROLES, NF), True),
    ("GET", "/lists", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/lists/{list}", None, dict.fromkeys(ROLES, 200), True),
    ("GET", "/catalog", None, dict.fromkeys(ROLES, 200), True),
]


@pytest.fixture
async def world(http, base_url, funded) -> dict[str, Any]:
    """An owner with one of everything private, another user, and an expert."""
    owner, other, expert = await funded(20_000), await funded(20_000), await funded(0)
    w: dict[str, Any] = {"owner_wallet": owner, "other_wallet": other, "owner": owner.username,
                         "other": other.username, "expert": expert.username}
    async with PaidSession(expert, session=http) as s:
        status, _ = await s.signed("PUT", f"{base_url}/v1/experts/me",
                                   {"display_name": "E", "tags": ["k8s"], "price": 100, "reply_hours": 24,
                                    "available_for_hire": True})
        assert status == 200
    async with PaidSession(owner, max_price=5000, session=http) as s:
        status, token = await s.signed("POST", f"{base_url}/v1/accounts/me/tokens", {"label": MARK, "max_total": 500})
        assert status == 201, token
        w["token"] = token["id"]
        status, run, headers = await s.request("POST", f"{base_url}/v1/qa/runs",
                                               data=json.dumps({"suite": "schema", "manifests": MANIFEST}),
                                               headers={"Content-Type": "application/json"})
        assert status == 202, run
        w["run"], w["receipt"] = run["id"], receipt_reference(headers["Payment-Receipt"])
        status, job = await s.signed("POST", f"{base_url}/v1/qa/jobs",
                                     {"title": MARK, "labels": {"arch": "arm64"}, "reward": 10, "results_wanted": 2})
        assert status == 201, job
        w["job"] = job["id"]
        status, q, _ = await s.request("POST", f"{base_url}/v1/experts/{expert.username}/questions",
                                       data=json.dumps({"text": MARK}), headers={"Content-Type": "application/json"})
        assert status == 201, q
        w["question"] = q["id"]
        status, lst = await s.signed("POST", f"{base_url}/v1/lists",
                                     {"name": f"l{owner.username}", "description": "d", "price": 100,
                                      "approval_required": True})
        assert status == 201, lst
        w["list"] = lst["name"]
    async with PaidSession(other, session=http) as s:
        status, runner = await s.signed("POST", f"{base_url}/v1/qa/runners", {"labels": {"arch": "arm64"}})
        assert status == 201, runner
        w["runner"] = runner["id"]
        status, lease = await s.signed("POST", f"{base_url}/v1/qa/jobs/claim", {"runner": runner["id"], "wait": 0})
        assert status == 200, lease
        status, result = await s.signed("POST", f"{base_url}/v1/qa/jobs/{w['job']}/result",
                                        {"runner": runner["id"], "status": "passed", "junit": EVIDENCE})
        assert status == 201, result
        w["result"] = result["id"]
    return w


def fill(template: Any, w: dict[str, Any]) -> Any:
    if isinstance(template, str):
        out = template.replace("{fresh}", f"l{uuid.uuid4().hex[:12]}")
        out = out.replace("{capability}", "A" * 43)  # the shape of a private link, not one that exists
        for key in ("owner", "other", "expert", "token", "run", "receipt", "job", "question", "list", "runner", "result"):
            out = out.replace("{" + key + "}", str(w[key]))
        return out
    if isinstance(template, dict):
        return {k: fill(v, w) for k, v in template.items()}
    return template


async def call(http, base_url: str, w: dict[str, Any], role: str, method: str, path: str, body: Any) -> tuple[int, str]:
    url = f"{base_url}{path}"
    if role in ("owner", "other"):
        async with PaidSession(w[f"{role}_wallet"], session=http) as s:  # max_price 0: it never pays
            try:
                if isinstance(body, str):
                    status, payload, _ = await s.request(method, url, data=body)
                else:
                    status, payload = await s.signed(method, url, body)
            except PriceTooHigh:
                return 402, ""
        return status, payload if isinstance(payload, str) else json.dumps(payload)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if role == "admin" else {}
    kwargs = {"data": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    async with http.request(method, url, headers=headers, **kwargs) as r:
        return r.status, await r.text()


async def test_every_route_is_in_the_matrix(make_app):
    app = make_app()
    shape = re.compile(r"\{[^}]+\}")  # the matrix names its placeholders after what fills them
    routes = {(r.method, shape.sub("{}", r.resource.canonical)) for r in app.router.routes() if r.method != "HEAD"}
    assert routes == {(m, shape.sub("{}", p)) for m, p, *_ in MATRIX}


async def test_every_route_for_every_role(http, base_url, world):
    wrong = []
    for method, path, body, expected, private in MATRIX:
        for role in ("anonymous", "admin", "other", "owner"):  # the owner last: its calls may change state
            url_path, data = fill(path, world), fill(body, world)
            status, text = await call(http, base_url, world, role, method, url_path, data)
            want = expected[role]
            if status not in (want if isinstance(want, tuple) else (want,)):
                wrong.append(f"{role:9} {method} {path}: {status} (expected {want}) {text[:120]}")
            if private and role != "owner" and MARK in text:
                wrong.append(f"{role:9} {method} {path}: shows the owner's private data")
            if role != "owner" and status < 300 and world["owner"] in text and "{owner}" in path:
                wrong.append(f"{role:9} {method} {path}: shows the owner's account")
    assert not wrong, "\n".join(wrong)
