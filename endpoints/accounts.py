"""Account registration (with proof of key possession), account view and receipts for their owner."""
from aiohttp import web

from service import accounts, crypto
from service import protocol as P
from service.auth import authenticate, verify_body_signature
from service.errors import Forbidden
from service.schemas import RegisterSchema, load_json
from service.state import LEDGER, SETTINGS

_register = RegisterSchema()


async def register(request: web.Request) -> web.Response:
    data = await load_json(request, _register)
    pubkey = crypto.parse_pubkey(data["pubkey"])
    verify_body_signature(pubkey, request.headers.get(P.AUTHORIZATION), await request.read())
    body = await accounts.register(request.app[LEDGER], data["username"], pubkey)
    return web.json_response(body, status=201, headers={"Location": f"/v1/accounts/{data['username']}"})


async def show(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    if username != request.match_info["username"]:
        raise Forbidden("not_your_account", "an account can only be read by its owner")
    raw = request.query.get("limit", "20")
    limit = min(int(raw), 200) if raw.isdigit() and int(raw) > 0 else 20
    return web.json_response(await accounts.account_view(request.app[LEDGER], username, limit))


async def receipt(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    return web.json_response(await accounts.receipt_view(request.app[LEDGER], request.match_info["id"], username))
