"""Signed requests ("Authorization: MT-Sig <username>:<unix ts>:<base64 sig>") with the account's key.

The signed message is protocol.request_message(method, path_qs, ts, body, nonce, origin=...): this
deployment's origin (deployment.signing_origins: PUBLIC_URL, never the Host header), method, path with query,
timestamp, body hash and the optional MT-Nonce header, so a signature cannot be moved to another request or
another deployment, and it ages out after AUTH_WINDOW seconds. A request that changes state is also
single-use: the signed message's hash is remembered (SET NX) for twice the window, and a replay is 409
`request_replayed`.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Callable

from aiohttp import web

from . import crypto
from . import protocol as P
from .deployment import signing_origins
from .errors import Conflict, Forbidden, Unauthorized
from .inputs import ascii_int, undecodable
from .keys import user_account, username_of
from .ledger import Ledger, route_allows

__all__ = ["authenticate", "require_signature", "verify_body_signature", "READ_TOKEN"]

# Set when a read was authorized by a spending token (its id): the route then shows only what that token paid.
READ_TOKEN = web.RequestKey("read_token", str)

_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def authenticate(request: web.Request, ledger: Ledger, window: int, *, allow_token: bool = False) -> str:
    """The username whose key signed this request (or, with allow_token, who issued its spending
    token: a CI job reads what it bought); Unauthorized with the reason otherwise."""
    scheme, _, value = request.headers.get(P.AUTHORIZATION, "").partition(" ")
    if allow_token and scheme == P.TOKEN_SCHEME:
        return await _token_owner(ledger, value.strip(), request)
    if scheme != P.SIG_SCHEME:
        raise Unauthorized("auth_required", f"sign the request: Authorization: {P.SIG_SCHEME} <username>:<unix ts>:<signature>")
    parts = value.strip().split(":", 2)
    stamp = ascii_int(parts[1], 12) if len(parts) == 3 else None
    if stamp is None or undecodable(value):
        raise Unauthorized("malformed_auth", f"expected {P.SIG_SCHEME} <username>:<unix ts>:<signature>")
    username, ts, signature = parts
    if abs(time.time() - stamp) > window:
        raise Unauthorized("stale_auth", f"the timestamp must be within {window} s of the server's clock")
    pubkey_hex = await ledger.account_meta(user_account(username), "pubkey")
    if pubkey_hex is None:
        raise Unauthorized("unknown_user", "no account is registered under this username")
    nonce = request.headers.get(P.NONCE, "")
    if nonce and not _NONCE.fullmatch(nonce):
        raise Unauthorized("malformed_auth", f"{P.NONCE}: 8-64 characters A-Z a-z 0-9 _ -")
    body = await request.read() if request.body_exists else b""
    origins = _origins(request)
    try:
        message = _verified(bytes.fromhex(pubkey_hex), signature, origins, lambda origin: P.request_message(
            request.method, request.path_qs, ts, body, nonce, origin=origin))
    except crypto.KeyError_:
        message = None
    if message is None:
        raise Unauthorized("bad_signature", f"the request signature does not verify (it signs this deployment's "
                                            f"origin {origins[0]}, method, path, timestamp and body)")
    if request.method in _STATE_CHANGING:
        await _first_use(ledger, username, message, window)
    return username


async def _first_use(ledger: Ledger, username: str, message: bytes, window: int) -> None:
    """Remember the signed message (not the signature: ECDSA signatures are malleable) past its window."""
    digest = hashlib.sha256(username.encode() + b"\n" + message).hexdigest()
    if not await ledger.redis.set(ledger.keys.seen(digest), 1, nx=True, ex=max(1, window * 2)):
        raise Conflict("request_replayed", "this signed request was already used; sign it again (a fresh "
                                           f"timestamp or {P.NONCE}) to repeat it")


def require_signature(signature: str | None) -> str:
    """A registration without its proof is refused before its body is even read."""
    if not signature:
        raise Unauthorized("signature_required", "Authorization must hold the signature of the request body")
    return signature


def verify_body_signature(pubkey: bytes, signature: str | None, body: bytes, request: web.Request) -> None:
    """Proof of key possession at registration: the Authorization header signs this deployment's origin and
    the exact body bytes (protocol.registration_message), so it registers the key on this deployment only."""
    signature = require_signature(signature)
    origins = _origins(request)
    try:
        message = _verified(pubkey, signature, origins, lambda origin: P.registration_message(origin, body))
    except crypto.KeyError_ as exc:
        raise Unauthorized("malformed_signature", f"Authorization: {exc}") from None
    if message is None:
        raise Unauthorized("bad_signature", "the signature does not verify for this pubkey over this deployment's "
                                            f"origin ({origins[0]}), a newline and the body")


def _origins(request: web.Request) -> list[str]:
    from .state import SETTINGS  # noqa: PLC0415  (state imports the payment methods, which import this module)

    return signing_origins(request.config_dict[SETTINGS], request)


def _verified(pubkey: bytes, signature: str, origins: list[str], message_for: Callable[[str], bytes]) -> bytes | None:
    """The message, for one of this deployment's origins, that `signature` signs; None if it signs none
    (crypto.KeyError_ if the signature cannot be decoded)."""
    for origin in origins:
        message = message_for(origin)
        if crypto.verify(pubkey, signature, message):
            return message
    return None


async def _token_owner(ledger: Ledger, value: str, request: web.Request) -> str:
    """The owner of a valid token (secret compared in constant time) whose route caveat allows this path;
    the token's id is left in request[READ_TOKEN] so the route shows only what this token paid for."""
    from .payments.token import TOKEN_RE, secret_hash  # noqa: PLC0415

    match = TOKEN_RE.match(value)
    record = await ledger.token(match.group(1)) if match else None
    if record is None or not hmac.compare_digest(record["secret_hash"], secret_hash(match.group(2))):
        raise Unauthorized("token_invalid", "unknown token, or wrong secret")
    if record["revoked"] or (record["expires_at"] and record["expires_at"] <= time.time()):
        raise Unauthorized("token_expired", "this token is revoked or expired")
    if record["routes"] and not any(route_allows(prefix, request.path) for prefix in record["routes"]):
        raise Forbidden("token_route", "this token may not be used on this route")
    request[READ_TOKEN] = record["id"]
    return username_of(record["owner"])
