"""Account holder: the key (wallet), registration, balance, spending tokens, payout preference,
withdrawals and the deposit address."""
from __future__ import annotations

import argparse
import time
from typing import Any

from .config import Config, parse_duration, save_config
from .output import EXIT_FINDINGS, EXIT_OK, Out, UsageError, command, reply

__all__ = ["add_commands"]


def cmd_wallet(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    from ..client import Wallet  # noqa: PLC0415

    if args.action == "init":
        if cfg.wallet_path.exists() and not args.force:
            raise UsageError(f"{cfg.wallet_path} exists; use --force to replace it (the old key is lost)")
        wallet = Wallet.generate(args.username)
        wallet.save(cfg.wallet_path)
    else:
        wallet = cfg.wallet()
    out.data({"username": wallet.username, "pubkey": wallet.pubkey.hex(), "wallet": str(cfg.wallet_path)})
    return EXIT_OK


async def cmd_register(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server, wallet = cfg.need_server(), cfg.wallet()
    if args.username and args.username != wallet.username:
        raise UsageError(f"the wallet belongs to {wallet.username!r}; run `microtasks wallet init {args.username} --force`")
    async with cfg.signer() as s:
        status, body = await s.register(server)
    if status == 201:
        save_config(server=server)
    return reply(out, status, body, lambda: out.line(f"registered {body['username']} at {server}"))


def _journal(out: Out, view: dict[str, Any]) -> None:
    out.line(f"{view['username']}: balance {view['balance']} sat, available {view['available']}, "
             f"pending {view['pending']}")
    if view.get("journal"):
        out.table([{**e, "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(e["created"]))}
                   for e in view["journal"]],
                  [("WHEN (UTC)", "created"), ("AMOUNT", "amount"), ("STATE", "state"),
                   ("COUNTERPARTY", "counterparty"), ("FOR", "resource"), ("REASON", "reason")])


async def cmd_balance(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server, wallet = cfg.need_server(), cfg.wallet()
    async with cfg.signer() as s:
        status, body = await s.signed_get(f"{server}/v1/accounts/{wallet.username}")
    return reply(out, status, body, lambda: _journal(out, body))


async def cmd_token(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        if args.action == "create":
            body: dict[str, Any] = {"max_total": args.max_total, "routes": args.route or [], "label": args.label or ""}
            if args.max_per_call:
                body["max_per_call"] = args.max_per_call
            if args.expires_in:
                body["expires_at"] = int(time.time()) + parse_duration(args.expires_in)
            status, payload = await s.signed("POST", f"{server}/v1/accounts/me/tokens", body)
            return reply(out, status, payload)
        if args.action == "list":
            status, payload = await s.signed("GET", f"{server}/v1/accounts/me/tokens")
            return reply(out, status, payload, lambda: out.table(payload.get("tokens", []), [
                ("ID", "id"), ("LABEL", "label"), ("SPENT", "spent"), ("MAX TOTAL", "max_total"),
                ("ROUTES", "routes")]))
        status, payload = await s.signed("DELETE", f"{server}/v1/accounts/me/tokens/{args.id}")
    return reply(out, status, payload, lambda: out.line(f"revoked {args.id}"))


async def cmd_account(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    """The signed-in account: balance, earnings by source, payout preference, withdrawals."""
    server = cfg.need_server()
    async with cfg.signer() as s:
        status, body = await s.signed_get(f"{server}/v1/accounts/me")

    def human() -> None:
        _journal(out, body)
        out.fields(body, ["payout", "earnings"])
        if body.get("withdrawals"):
            out.table(body["withdrawals"], [("ID", "id"), ("AMOUNT", "amount"), ("STATE", "state"),
                                            ("ADDRESS", "address")])
    return reply(out, status, body, human)


async def cmd_payout(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    body: dict[str, Any] = {"payout": args.payout}
    if args.minimum:
        body["minimum"] = args.minimum
    async with cfg.signer() as s:
        status, payload = await s.signed("PUT", f"{server}/v1/accounts/me/payout", body)
    return reply(out, status, payload)


async def cmd_withdraw(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        status, payload = await s.signed("POST", f"{server}/v1/accounts/me/withdrawals",
                                         {"amount": args.amount, "address": args.address})
    return reply(out, status, payload)


async def cmd_deposit_address(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        status, payload = await s.signed_get(f"{server}/v1/accounts/me/deposit-address")
    return reply(out, status, payload, lambda: out.line(
        f"{payload['address']} ({payload['network']}; credited after {payload['confirmations']} confirmations)"))


def add_commands(sub: Any) -> None:
    w = command(sub, "wallet", cmd_wallet, "create or show the key (a 0600 file in the config dir)")
    wsub = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    wi = command(wsub, "init", cmd_wallet, "generate a key for USERNAME")
    wi.add_argument("username")
    wi.add_argument("--force", action="store_true", help="replace an existing wallet (its key is lost)")
    command(wsub, "show", cmd_wallet, "the wallet's username and public key")
    r = command(sub, "register", cmd_register, "register the wallet's username and key with the server")
    r.add_argument("username", nargs="?")
    command(sub, "balance", cmd_balance, "balance and recent journal entries")
    command(sub, "account", cmd_account, "balance, earnings, payout preference and withdrawals")
    t = command(sub, "token", cmd_token, "spending tokens for CI")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = command(tsub, "create", cmd_token, "a token that may spend up to --max-total")
    tc.add_argument("--max-total", type=int, required=True)
    tc.add_argument("--max-per-call", type=int)
    tc.add_argument("--expires-in", help="e.g. 30d, 12h, 3600")
    tc.add_argument("--route", action="append", help="allowed path prefix (repeatable)")
    tc.add_argument("--label")
    command(tsub, "list", cmd_token, "your tokens and what each has spent")
    tr = command(tsub, "revoke", cmd_token, "revoke a token by id")
    tr.add_argument("id")
    p = command(sub, "payout", None, "what happens to what you earn")
    psub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ps = command(psub, "set", cmd_payout, "keep, charity:<id> or address:<bitcoin address>")
    ps.add_argument("payout", help="keep | charity:<id> | address:<bitcoin address>")
    ps.add_argument("--minimum", type=int, help="pay out to the address once this many sat are earned")
    wd = command(sub, "withdraw", cmd_withdraw, "queue a withdrawal of AMOUNT sat to a bitcoin ADDRESS")
    wd.add_argument("amount", type=int)
    wd.add_argument("address")
    command(sub, "deposit-address", cmd_deposit_address, "your on-chain deposit address (needs PAYEE_XPUB on the server)")
