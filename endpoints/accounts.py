"""Account registration (with proof of key possession), account view and receipts for their owner."""
from aiohttp import web

from service import accounts, crypto
from service import protocol as P
from service.auth import authenticate, require_signature, verify_body_signature
from service.errors import Forbidden, NotFound
from service.inputs import query_int
from service.schemas import PayoutSchema, RegisterSchema, WithdrawalSchema, load_json
from service.state import ADDRESSES, LEDGER, PAYOUTS, SETTINGS

_register = RegisterSchema()
_payout = PayoutSchema()
_withdrawal = WithdrawalSchema()


async def register(request: web.Request) -> web.Response:
    signature = require_signature(request.headers.get(P.AUTHORIZATION))
    data = await load_json(request, _register)
    pubkey = crypto.parse_pubkey(data["pubkey"])
    verify_body_signature(pubkey, signature, await request.read(), request)
    body = await accounts.register(request.app[LEDGER], data["username"], pubkey)
    return web.json_response(body, status=201, headers={"Location": f"/v1/accounts/{data['username']}"})


async def show(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    if username != request.match_info["username"]:
        raise Forbidden("not_your_account", "an account can only be read by its owner")
    limit = query_int(request, "limit", 20, 1, 200)
    return web.json_response(await accounts.account_view(request.app[LEDGER], username, limit))


async def receipt(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    return web.json_response(await accounts.receipt_view(request.app[LEDGER], request.match_info["id"], username))


async def me(request: web.Request) -> web.Response:
    """Balance, pending holds, earnings by source, payout preference and withdrawals of the signed-in account."""
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    payouts = request.app[PAYOUTS]
    view = await accounts.account_view(request.app[LEDGER], username, 20)
    return web.json_response({**view, "earnings": await payouts.earnings(username),
                              "payout": await payouts.preference(username),
                              "withdrawals": await payouts.of(username)})


async def set_payout(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    data = await load_json(request, _payout)
    return web.json_response(await request.app[PAYOUTS].set_preference(username, data["payout"], data["minimum"]))


async def withdraw(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    data = await load_json(request, _withdrawal)
    wd = await request.app[PAYOUTS].withdraw(username, data["amount"], data["address"])
    return web.json_response(wd, status=201)


async def deposit_address(request: web.Request) -> web.Response:
    username = await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)
    book = request.app.get(ADDRESSES)
    if book is None:
        raise NotFound("deposits_disabled", "this server has no PAYEE_XPUB configured")
    s = request.app[SETTINGS]
    return web.json_response({"address": await book.deposit_address(username), "network": s.network,
                              "confirmations": s.deposit_confirmations})
