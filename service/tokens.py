"""Spending-token use cases: an account owner issues, lists and revokes tokens for CI jobs."""
from __future__ import annotations

import time
from typing import Any

from .errors import NotFound, Unprocessable
from .ledger import Ledger, user_account
from .payments.token import new_token, secret_hash

__all__ = ["issue", "list_for", "revoke", "MAX_TOKENS_PER_ACCOUNT"]

MAX_TOKENS_PER_ACCOUNT = 100


def _public(t: dict[str, Any]) -> dict[str, Any]:
    """What an owner may see of a token: never the secret or its hash."""
    return {
        "id": t["id"], "label": t["label"], "max_total": t["max_total"],
        "max_per_call": t["max_per_call"] or None, "expires_at": t["expires_at"] or None,
        "routes": t["routes"], "spent": t["spent"], "remaining": max(0, t["max_total"] - t["spent"]),
        "revoked": t["revoked"], "created": t["created"],
        "expired": bool(t["expires_at"]) and t["expires_at"] <= time.time(),
    }


async def issue(ledger: Ledger, username: str, *, max_total: int, max_per_call: int | None,
                expires_at: int | None, routes: list[str], label: str) -> dict[str, Any]:
    """Create a token; the secret is returned here once and never again."""
    if expires_at is not None and expires_at <= time.time():
        raise Unprocessable("validation_error", {"expires_at": ["must be in the future"]})
    if max_per_call is not None and max_per_call > max_total:
        raise Unprocessable("validation_error", {"max_per_call": ["must not exceed max_total"]})
    owner = user_account(username)
    token_id, secret = new_token()
    created = await ledger.create_token(token_id, owner, secret_hash(secret), max_total=max_total,
                                        max_per_call=max_per_call or 0, expires_at=expires_at or 0, routes=routes,
                                        label=label, cap=MAX_TOKENS_PER_ACCOUNT)
    if not created:  # the cap counts live tokens, in the same script as the write
        raise Unprocessable("too_many_tokens", f"at most {MAX_TOKENS_PER_ACCOUNT} live (unrevoked, unexpired) "
                                               "tokens per account; revoke some")
    record = await ledger.token(token_id)
    assert record is not None
    return {**_public(record), "token": f"{token_id}.{secret}"}


async def list_for(ledger: Ledger, username: str) -> list[dict[str, Any]]:
    return [_public(t) for t in await ledger.tokens_of(user_account(username))]


async def revoke(ledger: Ledger, username: str, token_id: str) -> dict[str, Any]:
    """Revoke one of the caller's own tokens; another account's token is reported as unknown."""
    record = await ledger.token(token_id)
    if record is None or record["owner"] != user_account(username):
        raise NotFound("unknown_token", "no token with this id on your account")
    await ledger.revoke_token(token_id)
    return {**_public(record), "revoked": True}
