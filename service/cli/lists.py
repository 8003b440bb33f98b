"""List owner (create a list, approve members, see who is on it) and member (join, leave; replies are
`microtasks reply`): a list is asked as one, each member's first reply paid one share."""
from __future__ import annotations

import argparse
from typing import Any

from ..client import PaidSession
from .config import Config
from .output import Out, command, reply

__all__ = ["add_commands"]


async def cmd_list(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    if args.action in ("show", "members", "all"):
        async with PaidSession() as s:
            status, body, _ = await s.request("GET", f"{server}/v1/lists" + (f"/{args.name}" if args.action != "all" else ""))
        if args.action == "all":
            return reply(out, status, body, lambda: out.table(body["lists"], [
                ("NAME", "name"), ("OWNER", "owner"), ("PRICE (sat)", "price"), ("DESCRIPTION", "description")]))
        if args.action == "members":
            rows = [{"member": m, "state": "approved"} for m in body.get("members", [])] + \
                   [{"member": m, "state": "pending"} for m in body.get("pending", [])] if status == 200 else []
            return reply(out, status, body, lambda: out.table(rows, [("MEMBER", "member"), ("STATE", "state")]))
        return reply(out, status, body)
    async with cfg.signer() as s:
        if args.action == "create":
            status, body = await s.signed("POST", f"{server}/v1/lists", {
                "name": args.name, "description": args.description, "price": args.price,
                "approval_required": args.approval})
        elif args.action == "approve":
            status, body = await s.signed("POST", f"{server}/v1/lists/{args.name}/members/{args.username}/approve")
        else:
            status, body = await s.signed("POST" if args.action == "join" else "DELETE",
                                          f"{server}/v1/lists/{args.name}/members/me")
    return reply(out, status, body)


def add_commands(sub: Any) -> None:
    p = command(sub, "list", None, "expert lists: create, join, approve, members")
    lsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(lsub, "all", cmd_list, "every list")
    c = command(lsub, "create", cmd_list, "create a list you own")
    c.add_argument("name")
    c.add_argument("--price", type=int, required=True, help="sat each member's reply is paid")
    c.add_argument("--description", default="")
    c.add_argument("--approval", action="store_true", help="members join only once you approve them")
    for name, text in (("show", "a list: owner, price, members, pending"), ("members", "who is on a list"),
                       ("join", "join a list (pending until approved when the list requires it)"),
                       ("leave", "leave a list")):
        command(lsub, name, cmd_list, text).add_argument("name")
    a = command(lsub, "approve", cmd_list, "approve a pending member of your list")
    a.add_argument("name")
    a.add_argument("username")
