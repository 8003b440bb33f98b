"""Quoting a price costs the server almost nothing: an unpaid request never runs the YAML parser (the
document count that sets the price is a linear scan), so a flood of unpaid 1 MiB bodies cannot take the
parser's CPU from paying clients. The paid request parses; malformed YAML then is 400 and not charged."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import tarfile
from typing import Any

import pytest
import yaml

from service.client import PaidSession, PaymentRejected
from service.ledger import user_account
from service.qa import manifests

DOC = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {"
       + ", ".join(f"k{i}: v" for i in range(30)) + "}\n")


def big_body(limit: int = 1000_000, max_docs: int = 500) -> tuple[bytes, int]:
    """Close to MAX_BODY of valid YAML (the attack's body), and its document count."""
    count = min(max_docs, limit // (len(DOC) + 4))
    text = "---\n".join([DOC] * count)
    pad = limit - len(text) - 1
    return (text + "#" * max(pad, 0) + "\n").encode(), count


@pytest.fixture
def yaml_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every YAML parse the server makes (all parsing goes through yaml.load_all)."""
    calls: list[int] = []
    real = yaml.load_all

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(yaml, "load_all", counting)
    return calls


def _archive(files: dict[str, str]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


async def test_unpaid_validate_quotes_without_parsing_yaml(http, base_url, yaml_calls):
    body, count = big_body()
    results = await asyncio.gather(*[_post(http, f"{base_url}/v1/qa/validate", body) for _ in range(20)])
    for status, got, headers in results:
        assert status == 402, got
        assert int(headers["Price"]) == 100 + 20 * count
    assert yaml_calls == []  # twenty 1 MiB unpaid requests: not one YAML parse


async def test_unpaid_runs_quote_without_parsing_yaml(http, base_url, yaml_calls):
    text, count = big_body(limit=600_000)
    for payload in ({"suite": "schema", "manifests": text.decode()},
                    {"suite": "policy", "archive": _archive({"a.yaml": DOC, "b/c.yml": DOC + "---\n" + DOC,
                                                             "notes.txt": "---\nx: 1\n"})}):
        async with http.post(f"{base_url}/v1/qa/runs", json=payload) as r:
            got = await r.json()
            assert r.status == 402, got
            expected = 100 + 20 * count if payload["suite"] == "schema" else 200 + 30 * 3
            assert int(r.headers["Price"]) == expected
    assert yaml_calls == []


async def _post(http, url: str, body: bytes) -> tuple[int, Any, Any]:
    async with http.post(url, data=body) as r:
        return r.status, await r.json(), r.headers


async def test_paid_request_is_charged_the_quoted_count_and_parses(http, base_url, funded, ledger, yaml_calls):
    text = "# leading comment\n---\n" + DOC + "...\n---\n# only a comment\n---\n" + DOC + "--- \n\n"
    assert manifests.count_documents(text) == 2
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        status, got, headers = await s.request("POST", f"{base_url}/v1/qa/validate", data=text.encode())
    assert status == 200, got
    assert got["summary"]["documents"] == 2 and got["valid"] is True
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - (100 + 2 * 20)
    assert yaml_calls  # the paid request did parse


@pytest.mark.parametrize("body,code", [
    (b"kind: [unclosed", "invalid_yaml"),
    (b"apiVersion: v1\nmetadata: {}\n", "invalid_manifest"),
    (b"- 1\n- 2\n", "invalid_manifest"),
])
async def test_malformed_yaml_is_refused_after_payment_and_not_charged(http, base_url, funded, ledger, body, code):
    wallet = await funded(1000)
    async with http.post(f"{base_url}/v1/qa/validate", data=body) as r:
        assert r.status == 402  # quoted by the count; no parse
    async with PaidSession(wallet, max_price=500, session=http) as s:
        with pytest.raises(PaymentRejected) as refused:
            await s.request("POST", f"{base_url}/v1/qa/validate", data=body)
    assert (refused.value.status, refused.value.reason) == (400, code)
    bal = await ledger.balance(user_account(wallet.username))
    assert (bal.posted, bal.available) == (1000, 1000)


async def test_malformed_run_is_refused_after_payment_and_not_charged(http, base_url, funded, ledger):
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        with pytest.raises(PaymentRejected) as refused:
            await s.request("POST", f"{base_url}/v1/qa/runs",
                            data=json.dumps({"suite": "schema", "manifests": "kind: [unclosed"}),
                            headers={"Content-Type": "application/json"})
    assert (refused.value.status, refused.value.reason) == (400, "invalid_yaml")
    bal = await ledger.balance(user_account(wallet.username))
    assert (bal.posted, bal.available) == (1000, 1000)


@pytest.mark.parametrize("body,status,code", [
    (b"a" * (1024 * 1024 + 1), 413, "payload_too_large"),
    (b"", 400, "no_documents"),
    (b"---\n# nothing\n...\n", 400, "no_documents"),
    (b"\xff\xfe", 400, "invalid_encoding"),
    ("---\n".join(["a: 1\n"] * 501).encode(), 400, "too_many_documents"),
    (b"---\n" * 200_000 + b"a: 1\n", 400, "too_many_documents"),  # markers bound the count's work
])
async def test_cheaply_bad_input_is_refused_before_any_invoice(http, base_url, yaml_calls, body, status, code):
    async with http.post(f"{base_url}/v1/qa/validate", data=body) as r:
        got = await r.json()
        assert (r.status, got["error"]) == (status, code)
        assert "Price" not in r.headers and "invoice" not in got
    assert yaml_calls == []


@pytest.mark.parametrize("text,count", [
    ("", 0), ("---\n---\n", 0), ("a: 1\n", 1), ("---\na: 1\n---\nb: 2\n", 2),
    ("# c\n---\na: 1\n...\n---\n# only\n", 1), ("%YAML 1.2\n---\na: 1\n", 1), ("--- {a: 1}\n--- # x\n", 1),
    ("a: |\n  ---\n  x\n", 1), ("----\n", 1), ("a: 1\r\n---\r\nb: 2\r\n", 2),
])
def test_document_count_rule(text, count):
    """The published rule (x-price.counts) on its edge cases; it agrees with the parser on each of these."""
    assert manifests.count_documents(text) == count
    assert count == len([d for d in yaml.safe_load_all(text) if d is not None])


def test_document_end_marker_starts_a_new_billed_document():
    """YAML 1.2 lets a bare document follow '...': it is billed (the parser then decides if it is valid)."""
    assert manifests.count_documents("a: 1\n...\nb: 2\n") == 2


@pytest.mark.parametrize("brk", ["\r", "\r\n", "\x85", "\u2028", "\u2029"], ids=["cr", "crlf", "nel", "ls", "ps"])
def test_every_yaml_line_break_separates_billed_documents(brk):
    """YAML breaks lines at CR, NEL, LS and PS too: the count must see the same documents as the parser."""
    text = brk.join(["a: 1", "---", "b: 2", "---", "c: 3", ""])
    assert manifests.count_documents(text) == 3 == len(list(yaml.safe_load_all(text)))


@pytest.mark.parametrize("brk", ["\r", "\x85", "\u2028", "\u2029"], ids=["cr", "nel", "ls", "ps"])
async def test_documents_split_by_other_line_breaks_are_billed_in_full(http, base_url, funded, ledger, brk):
    """The second review's attack: 300 documents separated by '\\r---\\r' were quoted and charged as one."""
    body = f"{brk}---{brk}".join([DOC.replace("\n", brk)] * 300).encode()
    async with http.post(f"{base_url}/v1/qa/validate", data=body) as r:
        assert r.status == 402 and int(r.headers["Price"]) == 100 + 20 * 300
    wallet = await funded(10_000)
    async with PaidSession(wallet, max_price=10_000, session=http) as s:
        status, got, _ = await s.request("POST", f"{base_url}/v1/qa/validate", data=body)
    assert status == 200 and got["summary"]["documents"] == 300
    assert (await ledger.balance(user_account(wallet.username))).posted == 10_000 - (100 + 20 * 300)


async def test_more_documents_parsed_than_billed_are_refused_and_not_charged(http, base_url, funded, ledger,
                                                                             monkeypatch):
    """Defence in depth: should the count and the parser ever disagree upward, the paid request is
    refused (400) and its hold voided, never served for less than its documents cost."""
    monkeypatch.setattr(manifests, "count_documents", lambda text, stop_after=None: 1)
    body = "---\n".join([DOC] * 3).encode()
    wallet = await funded(1000)
    async with PaidSession(wallet, max_price=500, session=http) as s:
        with pytest.raises(PaymentRejected) as refused:
            await s.request("POST", f"{base_url}/v1/qa/validate", data=body)
    assert (refused.value.status, refused.value.reason) == (400, "document_count_mismatch")
    bal = await ledger.balance(user_account(wallet.username))
    assert (bal.posted, bal.available) == (1000, 1000)
