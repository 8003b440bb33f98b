"""QA endpoints: synchronous manifest validation (priced per document)."""
from __future__ import annotations

import asyncio

from aiohttp import web

from service.errors import BadRequest
from service.pricing import priced
from service.qa import manifests
from service.state import SETTINGS

_DOCS = web.RequestKey("qa_documents", tuple)


async def _parsed(request: web.Request) -> tuple[list[dict], str, bool]:
    """Parse once per request (the price depends on it): documents, Kubernetes version, strict."""
    if _DOCS not in request:
        version = manifests.resolve_version(request.query.get("kubernetes_version"))
        strict = request.query.get("strict", "false").lower()
        if strict not in ("true", "false", "1", "0"):
            raise BadRequest("invalid_parameter", "strict must be true or false")
        body = await request.read()
        docs = await asyncio.get_running_loop().run_in_executor(
            None, lambda: manifests.parse_manifests(body, max_documents=request.app[SETTINGS].max_documents))
        request[_DOCS] = (docs, version, strict in ("true", "1"))
    return request[_DOCS]


async def _document_count(request: web.Request) -> int:
    docs, _, _ = await _parsed(request)
    return len(docs)


@priced("qa.validate", units=_document_count)
async def validate(request: web.Request) -> web.Response:
    docs, version, strict = await _parsed(request)
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
