"""The paying client: an aiohttp session that answers 402s with a signed BitTransfer or a spending
token, within a per-call cap and a per-session budget. Needs only aiohttp and coincurve (no Redis,
no server code); the `microtasks` CLI is built on it."""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp

from . import crypto
from . import protocol as P
from .payment_auth import receipt_reference

__all__ = [
    "Wallet", "PaidSession", "PaymentError", "PriceTooHigh", "BudgetExceeded", "PaymentRejected",
    "transfer_headers", "signed_headers", "Operation", "Paid",
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
    """Authorization for account routes: MT-Sig <username>:<ts>:<signature of the request>, bound to the
    origin of `url` (the deployment it is sent to)."""
    parts = urlsplit(url)
    path_qs = parts.path + (f"?{parts.query}" if parts.query else "")
    ts = str(int(time.time()))
    nonce = secrets.token_urlsafe(12)  # the server refuses a state-changing request it has seen
    sig = wallet.sign(P.request_message(method, path_qs, ts, body, nonce, origin=P.origin_of(url)))
    return {P.AUTHORIZATION: f"{P.SIG_SCHEME} {wallet.username}:{ts}:{sig}", P.NONCE: nonce}


@dataclass
class Paid:
    receipt: str
    amount: int
    url: str


@dataclass(frozen=True)
class Operation:
    """A priced operation as the server's catalog describes it."""

    method: str
    path: str
    description: str
    price: dict[str, Any]

    def fixed_price(self) -> int | None:
        """The price when it does not depend on the request (pay-first is possible), else None."""
        return None if self.price.get("per_unit") or "variants" in self.price else int(self.price["amount"])


@dataclass
class PaidSession:
    """Pays 402s up to `max_price` per call and `budget` per session, with a key (`wallet`, signed
    BitTransfers), a spending `token`, or on chain through `onchain_signer` (the caller's wallet signs a
    transaction paying the invoice's address); `payments` lists what was paid."""

    wallet: Wallet | None = None
    max_price: int = 0
    budget: int | None = None
    token: str | None = None
    session: aiohttp.ClientSession | None = None
    payments: list[Paid] = field(default_factory=list)
    onchain_signer: Callable[[str, int], Awaitable[str]] | None = None  # (address, amount) -> signed raw tx hex

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
        """Refuse before paying: the caps are the client's promise to its user."""
        if price > self.max_price:
            raise PriceTooHigh(price, self.max_price)
        if self.budget is not None and price > self.budget - self.spent:
            raise BudgetExceeded(price, self.budget - self.spent)

    async def _payment_headers(self, url: str, price: int, payee: str, address: str,
                               invoice: str | None, method: str = "GET", body: bytes | None = None) -> dict[str, str]:
        if self.onchain_signer is not None:  # names its invoice; signed when there is a wallet (the payer)
            headers = {P.BITCOIN_TRANSACTION: await self.onchain_signer(address, price)}
            if invoice:
                headers[P.PAYMENT_INVOICE] = invoice
            if self.wallet is not None:
                headers.update(signed_headers(self.wallet, method, url, body or b""))
            return headers
        if self.token:
            return {P.AUTHORIZATION: f"{P.TOKEN_SCHEME} {self.token}", P.IDEMPOTENCY_KEY: secrets.token_hex(16),
                    P.PAYMENT_AMOUNT: str(price)}
        if self.wallet is None:
            raise PaymentError("no way to pay: give PaidSession a wallet or a token")
        return transfer_headers(self.wallet, amount=price, payee_username=payee, payee_address=address, url=url,
                                invoice=invoice)

    async def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str], *,
                    unpaid: bool = False) -> tuple[int, Any, dict[str, str]]:
        """One request. An unpaid one (no money attached) is retried once when the connection breaks, e.g.
        a server process behind the port was restarted; a paid one never is here (the caller decides)."""
        assert self.session is not None, "use `async with PaidSession(...)`"
        try:
            return await self._send_once(method, url, body, headers)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            if not unpaid:
                raise
        return await self._send_once(method, url, body, headers)

    async def _send_once(self, method: str, url: str, body: bytes | None,
                         headers: dict[str, str]) -> tuple[int, Any, dict[str, str]]:
        async with self.session.request(method, url, data=body, headers=headers) as resp:
            return resp.status, await _body(resp), dict(resp.headers)

    async def request(self, method: str, url: str, *, data: bytes | str | None = None,
                      headers: dict[str, str] | None = None, price: int | None = None,
                      payee: tuple[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        """Send; on 402 check the caps, pay the quoted price and resend once. Returns (status, body, headers).

        With `price` (and `payee` = (username, address), for BitTransfers) the payment goes with the first
        request: one round trip. A 402 that still follows is handled like any other."""
        body = data.encode() if isinstance(data, str) else data
        headers = dict(headers or {})
        if price is not None and (self.token or payee):
            self._check_price(price)
            username, address = payee or ("", "")
            first = {**headers, **await self._payment_headers(url, price, username, address, None)}
            status, payload, rheaders = await self._send(method, url, body, first)
            if status != 402:
                return self._settled(status, payload, rheaders, price, url)
        else:
            status, payload, rheaders = await self._send(method, url, body, headers, unpaid=True)
            if status != 402:
                return status, payload, rheaders
        if P.PRICE not in rheaders:
            raise PaymentRejected(status, "no_price", "the 402 names no Price header")
        price = int(rheaders[P.PRICE])
        self._check_price(price)
        invoice = payload.get("invoice", {}).get("id") if isinstance(payload, dict) else None
        pay = await self._payment_headers(url, price, rheaders.get(P.USERNAME, ""),
                                          rheaders.get(P.BITCOIN_ADDRESS, ""), invoice, method, body)
        status, payload, rheaders = await self._send(method, url, body, {**headers, **pay})
        return self._settled(status, payload, rheaders, price, url)

    def _settled(self, status: int, payload: Any, rheaders: dict[str, str], price: int,
                 url: str) -> tuple[int, Any, dict[str, str]]:
        if P.PAYMENT_RECEIPT in rheaders:  # base64url JSON (the IETF Payment scheme's); `reference` is the id
            self.payments.append(Paid(receipt_reference(rheaders[P.PAYMENT_RECEIPT]), price, url))
        elif status in (400, 401, 402, 403, 409):
            reason = payload.get("error") if isinstance(payload, dict) else str(status)
            raise PaymentRejected(status, reason, payload.get("detail") if isinstance(payload, dict) else payload)
        return status, payload, rheaders

    async def register(self, server: str) -> tuple[int, Any]:
        """Register the wallet's username and key, proving possession by signing the server's origin and the body."""
        if self.wallet is None:
            raise PaymentError("registering needs a wallet")
        body = json.dumps({"username": self.wallet.username, "pubkey": self.wallet.pubkey.hex()}).encode()
        status, payload, _ = await self._send("POST", f"{server.rstrip('/')}/v1/accounts", body,
                                              {P.AUTHORIZATION: self.wallet.sign(P.registration_message(
                                                  P.origin_of(server), body)),
                                               "Content-Type": "application/json"})
        return status, payload

    async def signed(self, method: str, url: str, json_body: Any = None) -> tuple[int, Any]:
        """A request signed with the wallet's key (account, receipts, tokens)."""
        if self.wallet is None:
            raise PaymentError("signed requests need a wallet")
        body = json.dumps(json_body).encode() if json_body is not None else b""
        headers = signed_headers(self.wallet, method, url, body)
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        status, payload, _ = await self._send(method, url, body or None, headers)
        return status, payload

    async def signed_get(self, url: str) -> tuple[int, Any]:
        return await self.signed("GET", url)

    async def owner_get(self, url: str, accept: str = "application/json") -> tuple[int, Any]:
        """GET what this session's account owns (runs, results): with the token when there is one."""
        if self.token:
            status, payload, _ = await self._send("GET", url, None, {P.AUTHORIZATION: f"{P.TOKEN_SCHEME} {self.token}",
                                                                  "Accept": accept})
            return status, payload
        if self.wallet is None:
            raise PaymentError("reading results needs a wallet or a token")
        status, payload, _ = await self._send("GET", url, None, {**signed_headers(self.wallet, "GET", url),
                                                                "Accept": accept})
        return status, payload

    async def discover(self, server: str) -> list[Operation]:
        """The server's priced operations, from /v1/catalog (or openapi.yaml's x-price when there is none)."""
        server = server.rstrip("/")
        status, payload, _ = await self._send("GET", f"{server}/v1/catalog", None, {})
        if status == 200 and isinstance(payload, dict):
            return [Operation(o["method"], o["path"], o.get("description", ""), o["price"])
                    for o in payload.get("operations", [])]
        status, payload, _ = await self._send("GET", f"{server}/openapi.yaml", None, {})
        if status != 200:
            raise PaymentError(f"{server} publishes neither /v1/catalog nor /openapi.yaml")
        import yaml  # noqa: PLC0415  (only for servers without a catalog)

        spec = yaml.safe_load(payload)
        return [Operation(verb.upper(), path, op.get("summary", ""), op["x-price"])
                for path, item in spec.get("paths", {}).items() for verb, op in item.items()
                if isinstance(op, dict) and "x-price" in op]


async def _body(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    if resp.content_type == "application/json":
        return json.loads(raw)
    return raw.decode(errors="replace")
