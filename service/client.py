"""A small paying client: an aiohttp session that answers 402s with a signed BitTransfer up to a cap.

Needs only aiohttp and coincurve (no Redis, no server code). Also a CLI for the README's walk-through:
`python -m service.client keygen|register|balance|call ...`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from . import crypto
from . import protocol as P

__all__ = [
    "Wallet", "PaidSession", "PaymentError", "PriceTooHigh", "BudgetExceeded", "PaymentRejected",
    "transfer_headers", "signed_headers",
]


class PaymentError(Exception):
    """The client refused to pay, or the server refused the payment."""


class PriceTooHigh(PaymentError):
    def __init__(self, price: int, max_price: int) -> None:
        super().__init__(f"price {price} sat exceeds max_price {max_price} sat")
        self.price, self.max_price = price, max_price


class BudgetExceeded(PaymentError):
    def __init__(self, price: int, remaining: int) -> None:
        super().__init__(f"price {price} sat exceeds the remaining budget of {remaining} sat")
        self.price, self.remaining = price, remaining


class PaymentRejected(PaymentError):
    def __init__(self, status: int, reason: str, detail: Any = None) -> None:
        super().__init__(f"payment rejected ({status} {reason}): {detail}")
        self.status, self.reason, self.detail = status, reason, detail


@dataclass
class Wallet:
    """A username and its secp256k1 private key (hex in a 0600 JSON file)."""

    username: str
    private_key: bytes

    @classmethod
    def generate(cls, username: str) -> "Wallet":
        return cls(username, secrets.token_bytes(32))

    @classmethod
    def load(cls, path: str | Path) -> "Wallet":
        data = json.loads(Path(path).read_text())
        return cls(data["username"], bytes.fromhex(data["private_key"]))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"username": self.username, "private_key": self.private_key.hex(),
                       "pubkey": self.pubkey.hex()}, f)

    @property
    def pubkey(self) -> bytes:
        return crypto.pubkey_of(self.private_key)

    def sign(self, message: bytes) -> str:
        return crypto.sign(self.private_key, message)


def transfer_headers(wallet: Wallet, *, amount: int, payee_username: str, payee_address: str, url: str,
                     invoice: str | None = None) -> dict[str, str]:
    """two1's BitTransfer headers (same keys and signature format), plus our optional invoice binding."""
    body: dict[str, Any] = {
        "payer": wallet.username,
        "payer_pubkey": crypto.b64encode(wallet.pubkey) + "\n",
        "payee_address": payee_address,
        "payee_username": payee_username,
        "amount": amount,
        "timestamp": time.time(),
        "description": url,
        "nonce": secrets.token_hex(8),
    }
    if invoice:
        body["invoice"] = invoice
    transfer = json.dumps(body)
    return {P.BITCOIN_TRANSFER: transfer, P.AUTHORIZATION: wallet.sign(transfer.encode())}


def signed_headers(wallet: Wallet, method: str, url: str, body: bytes = b"") -> dict[str, str]:
    """Authorization for account routes: MT-Sig <username>:<ts>:<signature of the request>."""
    parts = urlsplit(url)
    path_qs = parts.path + (f"?{parts.query}" if parts.query else "")
    ts = str(int(time.time()))
    sig = wallet.sign(P.request_message(method, path_qs, ts, body))
    return {P.AUTHORIZATION: f"{P.SIG_SCHEME} {wallet.username}:{ts}:{sig}"}


@dataclass
class Paid:
    receipt: str
    amount: int
    url: str


@dataclass
class PaidSession:
    """Pays 402s up to `max_price` per call and `budget` per session; `payments` lists what was paid."""

    wallet: Wallet
    max_price: int
    budget: int | None = None
    session: aiohttp.ClientSession | None = None
    payments: list[Paid] = field(default_factory=list)

    async def __aenter__(self) -> "PaidSession":
        if self.session is None:
            self.session = aiohttp.ClientSession()
            self._own = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        if getattr(self, "_own", False) and self.session:
            await self.session.close()

    @property
    def spent(self) -> int:
        return sum(p.amount for p in self.payments)

    def _check_price(self, price: int) -> None:
        if price > self.max_price:
            raise PriceTooHigh(price, self.max_price)
        if self.budget is not None and price > self.budget - self.spent:
            raise BudgetExceeded(price, self.budget - self.spent)

    async def request(self, method: str, url: str, *, data: bytes | str | None = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """Send; on 402 pay the quoted price (after the caps) and resend once. Returns (status, body, headers)."""
        assert self.session is not None, "use `async with PaidSession(...)`"
        body = data.encode() if isinstance(data, str) else data
        async with self.session.request(method, url, data=body, headers=headers) as resp:
            status, payload, rheaders = resp.status, await _body(resp), dict(resp.headers)
        if status != 402:
            return status, payload, rheaders
        price = int(rheaders[P.PRICE])
        self._check_price(price)
        invoice = payload.get("invoice", {}).get("id") if isinstance(payload, dict) else None
        pay = transfer_headers(self.wallet, amount=price, payee_username=rheaders[P.USERNAME],
                               payee_address=rheaders[P.BITCOIN_ADDRESS], url=url, invoice=invoice)
        async with self.session.request(method, url, data=body, headers={**(headers or {}), **pay}) as resp:
            status, payload, rheaders = resp.status, await _body(resp), dict(resp.headers)
        if P.PAYMENT_RECEIPT in rheaders:
            self.payments.append(Paid(rheaders[P.PAYMENT_RECEIPT], price, url))
        elif status in (400, 401, 402, 409):
            reason = payload.get("error") if isinstance(payload, dict) else str(status)
            raise PaymentRejected(status, reason, payload.get("detail") if isinstance(payload, dict) else payload)
        return status, payload, rheaders

    async def register(self, server: str) -> tuple[int, Any]:
        body = json.dumps({"username": self.wallet.username, "pubkey": self.wallet.pubkey.hex()}).encode()
        assert self.session is not None
        async with self.session.post(f"{server}/v1/accounts", data=body,
                                     headers={P.AUTHORIZATION: self.wallet.sign(body),
                                              "Content-Type": "application/json"}) as resp:
            return resp.status, await _body(resp)

    async def signed_get(self, url: str) -> tuple[int, Any]:
        assert self.session is not None
        async with self.session.get(url, headers=signed_headers(self.wallet, "GET", url)) as resp:
            return resp.status, await _body(resp)


async def _body(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    if resp.content_type == "application/json":
        return json.loads(raw)
    return raw.decode(errors="replace")


# --- CLI ---------------------------------------------------------------------------------------------
def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.client", description="pay-per-call client")
    p.add_argument("--wallet", default=os.environ.get("MICROTASKS_WALLET", "wallet.json"))
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="create a wallet file (0600)")
    k.add_argument("username")
    r = sub.add_parser("register", help="register the wallet's username and key")
    r.add_argument("server")
    b = sub.add_parser("balance", help="show the account (signed request)")
    b.add_argument("server")
    c = sub.add_parser("call", help="call a URL, paying a 402 up to --max-price")
    c.add_argument("method")
    c.add_argument("url")
    c.add_argument("--data", help="request body, or @FILE")
    c.add_argument("--max-price", type=int, required=True)
    args = p.parse_args(argv)

    if args.cmd == "keygen":
        if Path(args.wallet).exists():
            print(f"{args.wallet} exists; not overwriting", file=sys.stderr)
            return 2
        w = Wallet.generate(args.username)
        w.save(args.wallet)
        print(json.dumps({"username": w.username, "pubkey": w.pubkey.hex(), "wallet": args.wallet}))
        return 0

    wallet = Wallet.load(args.wallet)

    async def run() -> int:
        async with PaidSession(wallet, max_price=getattr(args, "max_price", 0)) as s:
            if args.cmd == "register":
                status, body = await s.register(args.server.rstrip("/"))
            elif args.cmd == "balance":
                status, body = await s.signed_get(f"{args.server.rstrip('/')}/v1/accounts/{wallet.username}")
            else:
                data = Path(args.data[1:]).read_bytes() if args.data and args.data.startswith("@") else args.data
                try:
                    status, body, headers = await s.request(args.method.upper(), args.url, data=data)
                except PaymentError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                if P.PAYMENT_RECEIPT in headers:
                    print(f"paid {s.spent} sat, receipt {headers[P.PAYMENT_RECEIPT]}", file=sys.stderr)
            print(json.dumps(body, indent=2) if not isinstance(body, str) else body)
            return 0 if status < 400 else 1

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(_cli())
