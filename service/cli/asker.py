"""Asker: find an expert, ask (paid into the question's escrow, released on a reply, refunded at the
deadline), send a hire request, read the question and its replies, withdraw an unanswered one."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from ..client import PaidSession
from .config import Config
from .output import EXIT_OK, Out, command, reply

__all__ = ["add_commands", "paid_post", "show_question"]


async def paid_post(cfg: Config, args: argparse.Namespace, out: Out, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST a priced JSON request, paying up to --max-price (and --budget)."""
    server = cfg.need_server()
    async with cfg.payer(args.max_price, getattr(args, "budget", None)) as s:
        status, payload, _ = await s.request("POST", f"{server}{path}", data=json.dumps(body),
                                             headers={"Content-Type": "application/json"})
    if status == 201:
        out.line(f"asked {payload['to']}: question {payload['id']}, {s.spent} sat held until a reply or "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(payload['deadline']))}")
    return status, payload


def show_question(out: Out, q: dict[str, Any]) -> None:
    deadline = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(q["deadline"]))
    money = q.get("money") or {}
    out.line(f"{q['id']} ({q['kind']} to {q['to']}, asked by {q['asker']}): {q['status']}, deadline {deadline}")
    out.line(f"money: {money.get('price_each')} sat each, {money.get('paid')} of {money.get('shares')} paid, "
             f"{money.get('escrow')} in escrow, refund {money.get('refund') or 'none'}")
    out.line(f"question: {q['text']}")
    for r in q.get("replies", []):
        out.line(f"reply from {r['by']}: {r['text']}" + (f" answers {json.dumps(r['answers'])}" if r.get("answers") else ""))


async def cmd_ask(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    """Ask an expert (or a list with --list): the price is held in escrow until a reply or the deadline."""
    if args.list:
        path, body = f"/v1/lists/{args.target}/questions", {"text": args.question, "max_responses": args.max_responses}
    else:
        path, body = f"/v1/experts/{args.target}/questions", {"text": args.question}
    status, q = await paid_post(cfg, args, out, path, body)
    if status == 201 and args.wait:
        async with cfg.signer() as s:
            while not q["replies"] and q["status"] == "open":
                await asyncio.sleep(2)
                _, q = await s.signed_get(f"{cfg.need_server()}/v1/questions/{q['id']}")
    return reply(out, status, q, lambda: show_question(out, q))


async def cmd_hire(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    status, q = await paid_post(cfg, args, out, f"/v1/experts/{args.expert}/hire-requests", {"text": args.text})
    return reply(out, status, q, lambda: show_question(out, q))


async def cmd_question(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        if args.action == "withdraw":
            status, q = await s.signed("POST", f"{server}/v1/questions/{args.id}/withdraw")
            if status >= 300:
                return reply(out, status, q)
        status, q = await s.signed_get(f"{server}/v1/questions/{args.id}")
    return reply(out, status, q, lambda: show_question(out, q))


async def cmd_experts(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with PaidSession() as s:
        status, body, _ = await s.request("GET", f"{server}/v1/experts" + (f"?tag={args.tag}" if args.tag else ""))
    rows = [{**e, "price": f"${e['price_usd']}" if e.get("price_usd") else e.get("price"),
             "hire": "yes" if e.get("available_for_hire") else "", "tags": ",".join(e.get("tags", []))}
            for e in (body.get("experts", []) if isinstance(body, dict) else [])]
    return reply(out, status, body, lambda: out.table(rows, [
        ("USERNAME", "username"), ("PRICE (sat)", "price"), ("REPLY HOURS", "reply_hours"), ("HIRE", "hire"),
        ("TAGS", "tags"), ("NAME", "display_name")]))


def add_commands(sub: Any) -> None:
    e = command(sub, "experts", cmd_experts, "experts, their prices and tags")
    e.add_argument("--tag", help="only experts with this tag")
    ask = command(sub, "ask", cmd_ask, "ask an expert (or a list with --list); paid into escrow, released on reply")
    ask.add_argument("target", help="expert username, or list name with --list")
    ask.add_argument("question")
    ask.add_argument("--list", action="store_true", help="ask every member of a list (see `survey ask` for forms)")
    ask.add_argument("--max-responses", type=int, default=1, help="with --list: replies paid (price x this held)")
    ask.add_argument("--max-price", type=int, required=True, help="refuse to pay more than this many sat")
    ask.add_argument("--budget", type=int)
    ask.add_argument("--wait", action="store_true", help="wait for the reply")
    h = command(sub, "hire", cmd_hire, "a paid hire request to an expert available for hire")
    h.add_argument("expert")
    h.add_argument("text", help="what you want done, how to reach you")
    h.add_argument("--max-price", type=int, required=True)
    q = command(sub, "question", None, "your questions: show one, withdraw an unanswered one")
    qsub = q.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("show", "the question, its replies and where its money is"),
                       ("withdraw", "close an open question: the unpaid escrow goes back to you")):
        command(qsub, name, cmd_question, text).add_argument("id")
