"""Expert marketplace handlers: profiles, charities, lists, paid questions, replies, surveys."""
from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web

from service.auth import authenticate
from service.errors import BadRequest, Forbidden, Unprocessable
from service.inputs import identifier
from service.experts import Experts, ask_price
from service.paywall import PAYMENT, commit
from service.pricing import priced
from service.profile_links import verify_github
from service.schemas import (TAG_RE, GithubProofSchema, ListQuestionSchema, ListSchema, ProfileSchema, QuestionSchema, ReplySchema,
                             load_json)
from service.state import EXPERTS, LEDGER, RATES, SETTINGS

_profile, _question, _list_q, _list, _reply = (ProfileSchema(), QuestionSchema(), ListQuestionSchema(),
                                               ListSchema(), ReplySchema())
_proof = GithubProofSchema()
_ASK = web.RequestKey("xp_ask", dict)
_TAG = re.compile(TAG_RE)


async def _me(request: web.Request) -> str:
    return await authenticate(request, request.app[LEDGER], request.app[SETTINGS].auth_window)


def _xp(request: web.Request) -> Experts:
    return request.app[EXPERTS]


async def charities(request: web.Request) -> web.Response:
    return web.json_response({"charities": await _xp(request).charities()})


async def put_profile(request: web.Request) -> web.Response:
    username = await _me(request)
    data = await load_json(request, _profile)
    return web.json_response(await _xp(request).put_profile(username, data))


async def github_proof(request: web.Request) -> web.Response:
    """Link the profile's GitHub handle for good: the gist's signed statement is checked (profile_links)."""
    username = await _me(request)
    data = await load_json(request, _proof)
    github = (await _xp(request).profile(username))["accounts"].get("github")
    if not github:
        raise Unprocessable("validation_error", {"github": ["set a GitHub handle on your profile first"]})
    gist_id = await verify_github(request.app[SETTINGS].github_api_url, request.app[LEDGER], username,
                                  github["handle"], data["gist"])
    return web.json_response(await _xp(request).set_github_proof(username, github["handle"], gist_id))


async def list_experts(request: web.Request) -> web.Response:
    tag = request.query.get("tag")
    if tag is not None:
        try:
            tag = identifier(tag, _TAG, "tag")  # a key part: whole and canonical, like the tags it is compared to
        except Unprocessable:
            raise BadRequest("invalid_parameter", "tag: lowercase letters, digits, '.', '+', '-'") from None
    return web.json_response({"experts": await _xp(request).list_experts(tag)})


async def show_expert(request: web.Request) -> web.Response:
    return web.json_response(await _xp(request).profile(request.match_info["username"]))


async def my_questions(request: web.Request) -> web.Response:
    return web.json_response({"questions": await _xp(request).inbox(await _me(request))})


# --- asking: the price is the expert's (or the list's × N); the money goes into the question's escrow ---
async def _ask(request: web.Request) -> dict[str, Any]:
    """Parse and price an ask once: body, target, question id (its escrow account is named after it)."""
    if _ASK not in request:
        xp = _xp(request)
        if "name" in request.match_info:
            data = await load_json(request, _list_q)
            lst = await xp.get_list(request.match_info["name"])
            ctx = {"kind": "list", "target": lst["name"], "price_each": lst["price"],
                   "shares": data["max_responses"], "hours": data["hours"], "form": data["form"],
                   "recipients": lst["members"]}
        else:
            data = await load_json(request, _question)
            profile = await xp.profile(request.match_info["username"])
            hire = request.path.endswith("/hire-requests")
            if hire and not profile["available_for_hire"]:
                raise BadRequest("not_for_hire", f"{profile['username']} is not available for hire")
            price = await ask_price(profile, request.app[RATES])  # dollars → sats now; the invoice shows the rate
            ctx = {"kind": "hire" if hire else "expert", "target": profile["username"], "price_each": price,
                   "shares": 1, "hours": profile["reply_hours"], "form": None, "recipients": [profile["username"]]}
        ctx["text"], ctx["id"], ctx["issue"] = data["text"], f"q_{secrets.token_hex(10)}", data.get("issue")
        request[_ASK] = ctx
    return request[_ASK]


async def _ask_amount(request: web.Request) -> int:
    ctx = await _ask(request)
    return ctx["price_each"] if ctx["shares"] == 1 else ctx["price_each"] * ctx["shares"]


async def _ask_escrow(request: web.Request) -> str:
    return Experts.escrow((await _ask(request))["id"])


def _others(ctx: dict[str, Any], asker: str) -> list[str]:
    return [r for r in ctx["recipients"] if r != asker]


async def _recipients(request: web.Request, asker: str) -> None:
    """Checked before the payment is held: a refused ask leaves nothing on the ledger (no escrow)."""
    if not _others(await _ask(request), asker):
        raise Forbidden("no_recipient", "you cannot ask yourself (or a list with no other approved member)")


async def _store(request: web.Request) -> web.Response:
    ctx = await _ask(request)
    asker = request[PAYMENT].payer
    await _recipients(request, asker)  # the paywall checked it before the hold; kept for payers it did not see
    recipients = _others(ctx, asker)
    # recorded (unpublished, its deadline set: the sweeper refunds its escrow whatever fails later), then
    # paid, then delivered: no path leaves the price in an escrow nobody can release
    await _xp(request).prepare_question(ctx["id"], asker, kind=ctx["kind"], target=ctx["target"], text=ctx["text"],
                                        price_each=int(ctx["price_each"]), shares=ctx["shares"], hours=ctx["hours"],
                                        recipients=recipients, form=ctx["form"], issue=ctx["issue"])
    await commit(request)
    q = await _xp(request).publish_question(ctx["id"], asker)
    return web.json_response(q, status=201, headers={"Location": f"/v1/questions/{q['id']}"})


@priced("experts.question", amount=_ask_amount, credit=_ask_escrow, requires_account=True, payer_check=_recipients)
async def ask_expert(request: web.Request) -> web.Response:
    """Ask an expert: the price sits in the question's escrow until the expert replies or the deadline passes."""
    return await _store(request)


@priced("experts.hire", amount=_ask_amount, credit=_ask_escrow, requires_account=True, payer_check=_recipients)
async def hire_request(request: web.Request) -> web.Response:
    """A priced contact request to an expert available for hire, delivered and paid like a question."""
    return await _store(request)


@priced("lists.question", amount=_ask_amount, credit=_ask_escrow, requires_account=True, payer_check=_recipients)
async def ask_list(request: web.Request) -> web.Response:
    """Ask a list: price × max_responses in escrow; each member's first reply is paid one share."""
    return await _store(request)


# --- questions ----------------------------------------------------------------------------------------
async def show_question(request: web.Request) -> web.Response:
    return web.json_response(await _xp(request).question(request.match_info["id"], await _me(request)))


async def reply(request: web.Request) -> web.Response:
    username = await _me(request)
    data = await load_json(request, _reply)
    record = await _xp(request).reply(request.match_info["id"], username, data["text"], data["answers"])
    return web.json_response(record, status=201)


async def withdraw(request: web.Request) -> web.Response:
    asker = await _me(request)
    return web.json_response(await _xp(request).close(request.match_info["id"], "withdrawn", asker=asker))


async def responses(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("invalid_parameter", "format must be json or csv")
    body, content_type = await _xp(request).responses(request.match_info["id"], await _me(request), fmt)
    return web.Response(text=body, content_type=content_type)


# --- lists --------------------------------------------------------------------------------------------
async def lists(request: web.Request) -> web.Response:
    return web.json_response({"lists": await _xp(request).lists()})


async def create_list(request: web.Request) -> web.Response:
    owner = await _me(request)
    d = await load_json(request, _list)
    created = await _xp(request).create_list(owner, d["name"], d["description"], d["price"], d["approval_required"])
    return web.json_response(created, status=201)


async def show_list(request: web.Request) -> web.Response:
    return web.json_response(await _xp(request).get_list(request.match_info["name"]))


async def join(request: web.Request) -> web.Response:
    return web.json_response(await _xp(request).join(request.match_info["name"], await _me(request)))


async def leave(request: web.Request) -> web.Response:
    return web.json_response(await _xp(request).leave(request.match_info["name"], await _me(request)))


async def approve(request: web.Request) -> web.Response:
    owner = await _me(request)
    return web.json_response(await _xp(request).approve(request.match_info["name"], owner,
                                                        request.match_info["username"]))
