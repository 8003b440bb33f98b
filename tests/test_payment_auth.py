"""The IETF "Payment" HTTP authentication scheme (MPP) against a client no one here wrote: PyPI `pympp` parses
our challenge, verifies its id with its own HMAC, builds the credential with its own classes and pays through
its own httpx transport; the payment settles once, a replay is never charged, failures are 402 problems."""
from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from mpp import Challenge, Credential, Receipt, _body_digest, generate_challenge_id
from mpp.client import Mpp
from mpp.methods import Method
from mpp.runtime import ClientMethod

from service import payment_auth as W
from service.client import PaidSession, signed_headers, transfer_headers
from service.invoices import Invoices
from service.ledger import REVENUE, user_account
from service.payments.mpp import challenge_key

PRICE_ONE_DOC = 120
REPLAYED = "Idempotent-Replayed"


def _key(settings: Any) -> str:
    return challenge_key(Invoices(settings.invoice_secret.encode(), ttl=1, payee="", address=""))


async def _challenge(http: Any, url: str, body: bytes) -> tuple[Challenge, dict[str, Any], dict[str, str]]:
    async with http.post(url, data=body) as r:
        assert r.status == 402
        return Challenge.from_www_authenticate(r.headers["WWW-Authenticate"]), await r.json(), dict(r.headers)


def _credential(wallet: Any, challenge: Challenge, url: str, **changes: Any) -> dict[str, str]:
    """pympp's Credential for our challenge, paying with a BitTransfer; header as the challenge asks."""
    details = challenge.request["methodDetails"]
    bt = transfer_headers(wallet, amount=int(challenge.request["amount"]), payee_username=challenge.request["recipient"],
                          payee_address=details["address"], url=url, invoice=details["invoice"])
    payload = {"transfer": bt["Bitcoin-Transfer"], "signature": bt["Authorization"], **changes}
    credential = Credential(challenge=challenge.to_echo(), payload=payload, source=f"microtasks:{wallet.username}")
    return {challenge.credential_header: credential.to_authorization()}


def test_challenge_id_is_pympps_computation() -> None:
    request = {"amount": "120", "currency": "sat", "recipient": "microtasks", "methodDetails": {"invoice": "inv_1"}}
    for header, digest in ((None, None), ("Payment-Authorization", "sha-256=abc"), ("Authorization", None)):
        theirs = generate_challenge_id(secret_key="k", realm="api.example:8402", method="bittransfer", intent="charge",
                                       request=request, expires="2026-12-01T00:00:00Z", digest=digest, header=header)
        ours = W.challenge_id("k", realm="api.example:8402", method="bittransfer", intent="charge",
                              request_b64=W.canonical_b64url(request), expires="2026-12-01T00:00:00Z",
                              digest=digest or "", header=header or "")
        assert ours == theirs


async def test_402_carries_a_payment_challenge_pympp_verifies(http, base_url, manifest, settings):
    url = f"{base_url}/v1/qa/validate"
    challenge, body, headers = await _challenge(http, url, manifest)
    assert (challenge.method, challenge.intent, challenge.header) == ("bittransfer", "charge", "Payment-Authorization")
    assert challenge.realm == base_url.split("://")[1]
    assert challenge.verify(_key(settings), challenge.realm)  # pympp's own HMAC check of our stateless id
    assert challenge.request == {"amount": str(PRICE_ONE_DOC), "currency": "sat", "recipient": settings.payee_username,
                                 "methodDetails": {"address": settings.payee_address, "invoice": body["invoice"]["id"],
                                                   "network": settings.caip2}}
    assert challenge.digest == _body_digest.compute(manifest)
    assert W.parse_rfc3339(challenge.expires) == body["invoice"]["expires_at"]
    # same 402 as 21's headers and x402's body; the body is also an RFC 9457 problem
    assert headers["Price"] == str(PRICE_ONE_DOC) and headers["Cache-Control"] == "no-store"
    assert json.loads(base64.b64decode(headers["PAYMENT-REQUIRED"])) == body
    assert (body["type"], body["status"]) == ("https://paymentauth.org/problems/payment-required", 402)
    assert [entry["scheme"] for entry in body["accepts"]] == ["bittransfer"]  # the Payment scheme: no x402 entry
    async with http.get(f"{base_url}/v1/qa/suites") as r:  # free routes: no challenge
        assert r.status == 200 and "WWW-Authenticate" not in r.headers


async def test_pympp_client_pays_once_and_a_replay_is_never_charged(http, base_url, manifest, funded, ledger,
                                                                    settings):
    """pympp's own transport answers our 402 with its own credential (Payment-Authorization, as advertised)."""
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    sent: list[dict[str, str]] = []

    class Details(BaseModel):
        amount: str

    async def create(params: Any) -> str:
        headers = _credential(wallet, params.challenge, url)
        sent.append(headers)
        return next(iter(headers.values()))

    method = ClientMethod(method=Method(name="bittransfer", intent="charge", request_model=Details,
                                        payload_model=Details), create_credential=create)
    async with Mpp(methods=[method]) as mpp:
        response = await mpp.fetch(url, method="POST", content=manifest)
    assert response.status_code == 200, response.text
    assert response.json()["valid"] is True
    receipt = Receipt.from_payment_receipt(response.headers["Payment-Receipt"])  # pympp parses our receipt
    assert (receipt.status, receipt.method) == ("success", "bittransfer")
    assert receipt.reference.startswith("bt_") and response.headers["Cache-Control"] == "private"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC
    # the same credential again: the kept response, not a second charge
    async with http.post(url, data=manifest, headers=sent[0]) as r:
        assert (r.status, r.headers[REPLAYED]) == (200, "true")
        assert W.receipt_reference(r.headers["Payment-Receipt"]) == receipt.reference
    # ... and for another request: its challenge does not match
    async with http.post(url, data=manifest + b"\n# other", headers=sent[0]) as r:
        body = await r.json()
        assert (r.status, body["type"]) == (402, "https://paymentauth.org/problems/invalid-challenge")
        assert "WWW-Authenticate" in r.headers
    status, view = await PaidSession(wallet, session=http).signed_get(f"{base_url}/v1/receipts/{receipt.reference}")
    assert status == 200 and view["amount"] == PRICE_ONE_DOC and view["state"] == "posted"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC
    assert (await ledger.balance(REVENUE)).posted == PRICE_ONE_DOC


async def test_one_credential_sent_20_times_concurrently_settles_once(http, base_url, manifest, funded, ledger):
    wallet = await funded(10_000)
    url = f"{base_url}/v1/qa/validate"
    challenge, _, _ = await _challenge(http, url, manifest)
    headers = _credential(wallet, challenge, url)

    async def send() -> tuple[int, str]:
        async with http.post(url, data=manifest, headers=headers) as r:
            return r.status, r.headers.get(REPLAYED, "first") if r.status == 200 else (await r.json())["error"]

    results = await asyncio.gather(*[send() for _ in range(20)])
    assert results.count((200, "first")) == 1
    assert set(results) <= {(200, "first"), (200, "true"), (409, "request_in_progress")}, results
    assert (await ledger.balance(user_account(wallet.username))).posted == 10_000 - PRICE_ONE_DOC
    assert (await ledger.reconcile()).ok


async def test_credential_in_authorization_is_accepted_too(http, base_url, manifest, funded, ledger):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    challenge, _, _ = await _challenge(http, url, manifest)
    value = next(iter(_credential(wallet, challenge, url).values()))
    async with http.post(url, data=manifest, headers={"Authorization": value}) as r:
        assert r.status == 200, await r.text()
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


def _forge(headers: dict[str, str], **echo: str) -> dict[str, str]:
    (name, value), = headers.items()
    data = json.loads(W.unb64url(value.split(" ", 1)[1]))
    data["challenge"].update(echo)
    return {name: "Payment " + W.b64url(json.dumps(data).encode())}


@pytest.mark.parametrize("case,problem", [
    ("garbage", "malformed-credential"),
    ("no_payload", "malformed-credential"),
    ("cheaper", "invalid-challenge"),       # the request echo changed: the id no longer matches
    ("other_realm", "invalid-challenge"),
    ("forged_id", "invalid-challenge"),
    ("bad_signature", "verification-failed"),
    ("wrong_amount", "verification-failed"),
])
async def test_refused_credentials_are_402_problems_with_a_fresh_challenge(http, base_url, manifest, funded, ledger,
                                                                           settings, case, problem):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    challenge, _, _ = await _challenge(http, url, manifest)
    good = _credential(wallet, challenge, url)
    cheaper = {**challenge.request, "amount": "1"}
    headers = {
        "garbage": {"Payment-Authorization": "Payment !!!"},
        "no_payload": {"Payment-Authorization": "Payment " + W.b64url(b'{"challenge": {}}')},
        "cheaper": _forge(good, request=W.canonical_b64url(cheaper)),
        "other_realm": _forge(good, realm="evil.example"),
        "forged_id": _forge(good, id=W.b64url(b"x" * 32)),
        "bad_signature": _credential(wallet, challenge, url, signature=wallet.sign(b"something else")),
        "wrong_amount": _credential(await funded(0), challenge, url, transfer=json.dumps({"amount": 1})),
    }[case]
    async with http.post(url, data=manifest, headers=headers) as r:
        body = await r.json()
        assert r.status == 402 and body["type"] == f"https://paymentauth.org/problems/{problem}", body
        fresh = Challenge.from_www_authenticate(r.headers["WWW-Authenticate"])
        assert fresh.id != challenge.id and fresh.verify(_key(settings), fresh.realm)
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000
    assert (await ledger.reconcile()).ok


async def test_an_expired_challenge_is_payment_expired(aiohttp_server, make_app, http, manifest, funded, ledger):
    server = await aiohttp_server(make_app(invoice_ttl=1))
    url = str(server.make_url("/v1/qa/validate"))
    wallet = await funded(0)
    challenge, _, _ = await _challenge(http, url, manifest)
    await asyncio.sleep(1.2)
    async with http.post(url, data=manifest, headers=_credential(wallet, challenge, url)) as r:
        assert (r.status, (await r.json())["type"]) == (402, "https://paymentauth.org/problems/payment-expired")


async def test_two_payments_in_one_request_are_400(http, base_url, manifest, funded, settings):
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    challenge, _, _ = await _challenge(http, url, manifest)
    credential = _credential(wallet, challenge, url)
    both = {**credential, **transfer_headers(wallet, amount=PRICE_ONE_DOC, payee_username=settings.payee_username,
                                             payee_address=settings.payee_address, url=url)}
    token = {**credential, "Authorization": "Token tk_0123456789abcdef.abcdefghijklmnopqrstuvwxyz"}
    for headers in (both, token):
        async with http.post(url, data=manifest, headers=headers) as r:
            assert (r.status, (await r.json())["error"]) == (400, "multiple_credentials")


async def test_ordinary_auth_first_401_before_402(http, base_url, manifest, funded, ledger):
    """An MT-Sig next to the credential is checked first: a bad one is 401, another signer is 403."""
    wallet, other = await funded(1000), await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    challenge, _, _ = await _challenge(http, url, manifest)
    credential = _credential(wallet, challenge, url)
    bad = {**credential, "Authorization": f"MT-Sig {wallet.username}:1:AAAA"}
    async with http.post(url, data=manifest, headers=bad) as r:
        assert r.status == 401
    async with http.post(url, data=manifest, headers={**credential, **signed_headers(other, "POST", url, manifest)}) as r:
        assert (r.status, (await r.json())["error"]) == (403, "payer_mismatch")
    async with http.post(url, data=manifest, headers={**credential, **signed_headers(wallet, "POST", url, manifest)}) as r:
        assert r.status == 200
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC
    assert (await ledger.balance(user_account(other.username))).posted == 1000


async def test_idempotency_key_makes_a_resigned_retry_pay_once(http, base_url, manifest, funded, ledger):
    """POST with Idempotency-Key: a retry with a new challenge and a new credential gets the first result."""
    wallet = await funded(1000)
    url = f"{base_url}/v1/qa/validate"
    results = []
    for _ in range(2):
        challenge, _, _ = await _challenge(http, url, manifest)
        headers = {**_credential(wallet, challenge, url), "Idempotency-Key": "job-42"}
        async with http.post(url, data=manifest, headers=headers) as r:
            results.append((r.status, r.headers.get(REPLAYED), W.receipt_reference(r.headers["Payment-Receipt"])))
    assert results[0][:2] == (200, None) and results[1] == (200, "true", results[0][2])
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - PRICE_ONE_DOC


async def test_receipt_of_every_method_is_the_schemes_format(http, base_url, manifest, funded):
    """21's headers pay as before; the receipt they get is the same base64url JSON, `reference` the id."""
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, _, headers = await s.request("POST", f"{base_url}/v1/qa/validate", data=manifest)
    receipt = W.decode_receipt(headers["Payment-Receipt"])
    assert status == 200 and receipt["reference"] == s.payments[0].receipt and receipt["status"] == "success"
    assert receipt["method"] == "bittransfer" and Receipt.from_payment_receipt(headers["Payment-Receipt"])
