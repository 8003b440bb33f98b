"""Expert (and list member): the public profile (price, tags, links, hire availability, payout), the inbox
of questions and hire requests, and replies (each paid one share on the spot)."""
from __future__ import annotations

import argparse
from typing import Any

from ..client import PaidSession
from .asker import show_question
from .config import Config, load_document
from .output import EXIT_OK, Out, UsageError, command, reply

__all__ = ["add_commands"]

HANDLES = ("github", "twitter", "linkedin")  # profile fields; the server shows each with its URL (GitHub verifiable)
_KEPT = ("display_name", "bio", "tags", "price", "price_usd", "reply_hours", "links", "available_for_hire")


def _profile_body(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The current profile with the flags given applied: PUT replaces the whole profile."""
    body = {k: current[k] for k in _KEPT if current.get(k) is not None}
    for flag in ("display_name", "bio", "price", "price_usd", "reply_hours", "payout", "webhook"):
        if getattr(args, flag) is not None:
            body[flag] = getattr(args, flag)
    if args.price is not None:
        body.pop("price_usd", None)
    if args.price_usd is not None:
        body.pop("price", None)
    if args.tag is not None:
        body["tags"] = args.tag
    if args.hire is not None:
        body["available_for_hire"] = args.hire
    links = dict(body.get("links") or {})
    for item in args.link or []:
        name, sep, url = item.partition("=")
        if not sep:
            raise UsageError(f"--link wants NAME=URL, got {item!r}")
        links[name] = url
    body["links"] = links
    for name in HANDLES:  # the handles kept from the current profile, or the flag's
        handle = getattr(args, name) or (current.get("accounts") or {}).get(name, {}).get("handle")
        if handle:
            body[name] = handle.lstrip("@")
    if "display_name" not in body:
        raise UsageError("a new profile needs --display-name")
    return body


async def cmd_profile(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    username = getattr(args, "username", None) or cfg.wallet().username
    async with PaidSession() as anonymous:
        status, current, _ = await anonymous.request("GET", f"{server}/v1/experts/{username}")
    if args.action == "show":
        return reply(out, status, current, lambda: _show(out, current))
    if args.action == "verify-github":
        async with cfg.signer() as s:
            status, body = await s.signed("POST", f"{server}/v1/experts/me/github", {"gist": args.gist})
        return reply(out, status, body, lambda: _show(out, body))
    if status not in (200, 404):
        return reply(out, status, current)
    async with cfg.signer() as s:
        status, body = await s.signed("PUT", f"{server}/v1/experts/me",
                                      _profile_body(current if status == 200 else {}, args))
    return reply(out, status, body, lambda: _show(out, body))


def _show(out: Out, p: dict[str, Any]) -> None:
    price = f"${p['price_usd']}" if p.get("price_usd") else f"{p.get('price')} sat"
    out.line(f"{p['username']}: {p['display_name']}, {price} per question, replies within {p['reply_hours']} h")
    out.fields(p, ["bio", "tags", "accounts", "links", "available_for_hire", "payout", "stats", "webhook_secret"])


async def cmd_inbox(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    async with cfg.signer() as s:
        status, body = await s.signed_get(f"{cfg.need_server()}/v1/experts/me/questions")
    questions = body.get("questions", []) if isinstance(body, dict) else []
    if args.hire:
        questions = [q for q in questions if q["kind"] == "hire"]
        body = {"questions": questions}
    rows = [{**q, "price": q["money"]["price_each"], "form": "form" if q.get("form") else ""} for q in questions]
    return reply(out, status, body, lambda: out.table(rows, [
        ("ID", "id"), ("KIND", "kind"), ("FROM", "asker"), ("PAYS (sat)", "price"), ("FORM", "form"),
        ("QUESTION", "text")]))


async def cmd_reply(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    body: dict[str, Any] = {"text": args.text}
    if args.answers:
        body["answers"] = load_document(args.answers)
    async with cfg.signer() as s:
        status, record = await s.signed("POST", f"{cfg.need_server()}/v1/questions/{args.id}/reply", body)
    return reply(out, status, record, lambda: out.line(
        f"replied to {args.id}: {record.get('paid')} sat paid to {record.get('paid_to')}"))


async def cmd_charities(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    async with PaidSession() as s:
        status, body, _ = await s.request("GET", f"{cfg.need_server()}/v1/charities")
    return reply(out, status, body, lambda: out.table(body["charities"], [
        ("ID", "id"), ("RECEIVED (sat)", "received"), ("NAME", "name")]))


def add_commands(sub: Any) -> None:
    p = command(sub, "profile", None, "your expert profile: what askers see and pay")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = command(psub, "show", cmd_profile, "an expert's profile (default: yours)")
    show.add_argument("username", nargs="?")
    s = command(psub, "set", cmd_profile, "create or change your profile: flags not given keep their value "
                                          "(but --webhook, which is never shown back)")
    s.add_argument("--display-name")
    s.add_argument("--bio")
    s.add_argument("--tag", action="append", help="a tag such as kubernetes or networking (repeatable; replaces all)")
    s.add_argument("--price", type=int, help="sat per question")
    s.add_argument("--price-usd", help="dollars per question (e.g. 5 or 0.50), charged in sat at the current rate")
    s.add_argument("--reply-hours", type=int, help="hours you promise to reply within (the refund deadline)")
    s.add_argument("--payout", help="keep | charity:<id> (see `microtasks charities`)")
    s.add_argument("--link", action="append", help="NAME=URL shown on the profile (repeatable)")
    for name in HANDLES:
        s.add_argument(f"--{name}", metavar="HANDLE", help=f"your {name} handle, shown on your profile and page"
                                                           + (" (verify it: profile verify-github)" if name == "github" else ""))
    v = command(psub, "verify-github", cmd_profile, "prove your GitHub handle: publish a public gist with the "
                                                    "statement signed by your key (see the README), then give its URL")
    v.add_argument("gist", help="the gist's URL or id")
    s.add_argument("--hire", dest="hire", action="store_true", default=None, help="available for hire")
    s.add_argument("--no-hire", dest="hire", action="store_false")
    s.add_argument("--webhook", help="https URL told of each question and reply")
    i = command(sub, "inbox", cmd_inbox, "questions and hire requests waiting for your reply")
    i.add_argument("--hire", action="store_true", help="only hire requests")
    r = command(sub, "reply", cmd_reply, "reply to a question (an expert's, or a list's as a member): paid on the spot")
    r.add_argument("id")
    r.add_argument("text")
    r.add_argument("--answers", help="YAML/JSON file answering the question's form: {field id: value}")
    command(sub, "charities", cmd_charities, "charities an expert can give earnings to")
