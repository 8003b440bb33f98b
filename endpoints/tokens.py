"""Spending tokens of the signed-in account: issue (secret shown once), list, revoke."""
from aiohttp import web

from service import tokens
from service.auth import authenticate
from service.schemas import TokenSchema, load_json
from service.state import LEDGER, SETTINGS

_token = TokenSchema()


async def _me(request: web.Request) -> str:
    return await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)


async def create(request: web.Request) -> web.Response:
    username = await _me(request)
    data = await load_json(request, _token)
    body = await tokens.issue(request.app[LEDGER], username, **data)
    return web.json_response(body, status=201, headers={"Cache-Control": "no-store"})


async def index(request: web.Request) -> web.Response:
    username = await _me(request)
    return web.json_response({"tokens": await tokens.list_for(request.app[LEDGER], username)})


async def revoke(request: web.Request) -> web.Response:
    username = await _me(request)
    return web.json_response(await tokens.revoke(request.app[LEDGER], username, request.match_info["id"]))
