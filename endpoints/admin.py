"""Operator API, guarded by ADMIN_TOKEN (absent token → the whole admin API answers 404)."""
import hmac

from aiohttp import web

from service import accounts, crypto
from service.errors import NotFound, Unauthorized
from service.schemas import CreditSchema, RegisterSchema, load_json
from service.state import LEDGER, SETTINGS

_register = RegisterSchema()
_credit = CreditSchema()


def _require_admin(request: web.Request) -> None:
    token = request.app[SETTINGS].admin_token
    if not token:
        raise NotFound("not_found", None)
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
        raise Unauthorized("admin_token_required", "Authorization: Bearer <ADMIN_TOKEN> is required",
                           headers={"WWW-Authenticate": "Bearer"})


async def create_account(request: web.Request) -> web.Response:
    _require_admin(request)
    data = await load_json(request, _register)
    body = await accounts.register(request.app[LEDGER], data["username"], crypto.parse_pubkey(data["pubkey"]))
    return web.json_response(body, status=201)


async def credit(request: web.Request) -> web.Response:
    _require_admin(request)
    data = await load_json(request, _credit)
    body = await accounts.credit(request.app[LEDGER], data["username"], data["amount"], data["reason"], data["id"])
    return web.json_response(body, status=200 if body["replayed"] else 201)
