"""QA endpoints: the suites on offer, synchronous validation, and paid asynchronous runs."""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from service.auth import READ_TOKEN, authenticate
from service.errors import BadRequest, NotFound, TooManyRequests
from service.paywall import PAYMENT, commit
from service.pricing import priced
from service.qa import manifests, suites
from service.qa.bundle import from_archive_async
from service.schemas import RunSchema, load_json
from service.state import LEDGER, PRICES, RUNS, SETTINGS

_DOCS = web.RequestKey("qa_documents", tuple)
_RUN = web.RequestKey("qa_run_request", dict)
_run_schema = RunSchema()


async def _parse(request: web.Request, body: bytes | str, billed: int) -> list[dict]:
    """The paid full parse; never serves more documents than the count that set the price."""
    limit = request.app[SETTINGS].max_documents
    docs = await asyncio.get_running_loop().run_in_executor(
        None, lambda: manifests.parse_manifests(body, max_documents=limit))
    if len(docs) > billed:
        raise BadRequest("document_count_mismatch", f"the body parses into {len(docs)} documents but counts "
                                                    f"{billed} by the published rule ({manifests.DOCUMENT_RULE}); "
                                                    "you were not charged")
    return docs


def _count(request: web.Request, text: str) -> int:
    """The billed document count (manifests.DOCUMENT_RULE), cheap enough for every unpaid quote: no YAML
    parser runs before a payment is held, so unpaid requests cannot take the parser's CPU from paid ones."""
    limit = request.app[SETTINGS].max_documents
    count = manifests.count_documents(text, stop_after=limit)
    if count == 0:
        raise BadRequest("no_documents", "the body holds no YAML document")
    if count > limit:
        raise BadRequest("too_many_documents", f"more than {limit} documents (or {2 * limit + 2} document markers); "
                                               f"at most {limit} per request")
    return count


async def _parsed(request: web.Request) -> tuple[str, int, str, bool]:
    """Checked once per request (the price depends on it): text, billed document count, Kubernetes
    version, strict. The YAML itself is parsed by the paid handler."""
    if _DOCS not in request:
        version = manifests.resolve_version(request.query.get("kubernetes_version"))
        strict = request.query.get("strict", "false").lower()
        if strict not in ("true", "false", "1", "0"):
            raise BadRequest("invalid_parameter", "strict must be true or false")
        text = manifests.decode(await request.read())
        request[_DOCS] = (text, _count(request, text), version, strict in ("true", "1"))
    return request[_DOCS]


async def _document_count(request: web.Request) -> int:
    return (await _parsed(request))[1]


@priced("qa.validate", units=_document_count)
async def validate(request: web.Request) -> web.Response:
    text, billed, version, strict = await _parsed(request)
    docs = await _parse(request, text, billed)  # paid (held): a 400 here voids the hold
    results = await asyncio.get_running_loop().run_in_executor(
        None, lambda: manifests.validate_documents(docs, version, strict=strict))
    invalid = sum(1 for r in results if r["valid"] is False)
    unchecked = sum(1 for r in results if r["valid"] is None)
    return web.json_response({
        "kubernetes_version": version, "strict": strict,
        "summary": {"documents": len(results), "valid": len(results) - invalid - unchecked,
                    "invalid": invalid, "unchecked": unchecked},
        "valid": invalid == 0,
        "documents": results,
    })


async def list_suites(request: web.Request) -> web.Response:
    book = request.app[PRICES]
    return web.json_response({"suites": [
        {"id": s.id, "description": s.description, "version": s.version,
         "price": book[f"qa.run.{s.id}"].describe(),
         "inputs": {"manifests": "YAML text (multi-document)", "archive": "base64 .tar.gz of .yaml/.yml files",
                    "kubernetes_version": manifests.supported_versions(), "strict": "boolean"}}
        for s in suites.SUITES.values()]})


async def _run_request(request: web.Request) -> dict[str, Any]:
    """The validated run request with its parsed documents, computed once (the price depends on it)."""
    if _RUN not in request:
        data = await load_json(request, _run_schema)
        if suites.get(data["suite"]) is None:
            raise BadRequest("unknown_suite", f"suite {data['suite']!r} is not offered; see GET /v1/qa/suites")
        data["kubernetes_version"] = manifests.resolve_version(data["kubernetes_version"])
        text = data["manifests"] if data["archive"] is None else await from_archive_async(
            data["archive"], max_bytes=request.app[SETTINGS].max_body)
        data["text"], data["count"] = text, _count(request, text)
        request[_RUN] = data
    return request[_RUN]


async def _run_suite(request: web.Request) -> str:
    return (await _run_request(request))["suite"]


async def _run_documents(request: web.Request) -> int:
    return (await _run_request(request))["count"]


@priced("qa.run", units=_run_documents, variant=_run_suite, requires_account=True)
async def create_run(request: web.Request) -> web.Response:
    """Buy a QA run: 202 with the run id; the payment is captured when the run is accepted here."""
    data = await _run_request(request)
    docs = await _parse(request, data["text"], data["count"])  # paid (held): a 400 here voids the hold
    payment = request[PAYMENT]
    store = request.app[RUNS]
    limit = request.app[SETTINGS].qa_max_active
    if await store.active(payment.payer) >= limit:
        raise TooManyRequests("too_many_runs", f"at most {limit} runs queued or running per account; you were not charged",
                              headers={"Retry-After": "10"})
    await commit(request)  # paid before the run is queued: an uncharged request queues nothing
    run = await store.submit(owner=payment.payer, suite=data["suite"], k8s=data["kubernetes_version"],
                             strict=data["strict"], body=data["text"], documents=len(docs),
                             price=payment.amount, receipt=payment.transfer_id, webhook=data["webhook"])
    location = f"/v1/qa/runs/{run['id']}"
    body = {"id": run["id"], "status": run["status"], "location": location, "price": run["price"],
            "receipt": run["receipt"]}
    if run.get("webhook_secret"):  # shown once: the key to check the webhook's X-Microtasks-Signature
        body["webhook_secret"] = run["webhook_secret"]
    return web.json_response(body, status=202, headers={"Location": location})


async def _owner(request: web.Request) -> str:
    return await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window, allow_token=True)


async def _readable_run(request: web.Request) -> tuple[str, dict[str, Any]]:
    """(owner, run) when the caller may read it: the owner's signature, or the very token that paid for it
    (another token of the same owner gets the same 404 as for an unknown id)."""
    owner = await _owner(request)
    run = await request.app[RUNS].view(request.match_info["id"], owner)
    token_id = request.get(READ_TOKEN)
    if token_id is not None:
        paid = await request.app[LEDGER].transfer(run["receipt"]) if run.get("receipt") else None
        if paid is None or paid.get("token") != token_id:
            raise NotFound("unknown_run", "no run with this id for this account")
    return owner, run


async def show_run(request: web.Request) -> web.Response:
    owner, run = await _readable_run(request)
    if "application/xml" in request.headers.get("Accept", ""):
        return await junit(request)
    return web.json_response(run)


async def junit(request: web.Request) -> web.Response:
    owner, _ = await _readable_run(request)
    xml = await request.app[RUNS].junit(request.match_info["id"], owner)
    return web.Response(text=xml, content_type="application/xml")
