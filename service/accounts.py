"""Account use cases: register a key, operator credits, and what an account owner may see."""
from __future__ import annotations

import uuid
from typing import Any

from .errors import Conflict, NotFound
from .ledger import GRANTS, AccountKind, Ledger, Outcome, user_account

__all__ = ["register", "credit", "account_view", "receipt_view"]


async def register(ledger: Ledger, username: str, pubkey: bytes) -> dict[str, Any]:
    """Open the user's ledger account with its key (atomic; a taken name changes nothing)."""
    outcome = await ledger.open_account(user_account(username), AccountKind.USER, pubkey=pubkey.hex())
    if outcome is Outcome.EXISTS:
        raise Conflict("username_taken", f"an account named {username!r} exists already")
    return {"username": username, "pubkey": pubkey.hex(), "balance": 0}


async def credit(ledger: Ledger, username: str, amount: int, reason: str, credit_id: str | None = None) -> dict[str, Any]:
    """Grant satoshis from the operator (sys:grants). Idempotent by id: a retry returns the first result."""
    transfer_id = f"credit:{credit_id or uuid.uuid4().hex}"
    result = await ledger.post(transfer_id, GRANTS, user_account(username), amount, reason=reason)
    if result.outcome is Outcome.NO_CREDIT_ACCOUNT:
        raise NotFound("unknown_account", f"no account named {username!r}")
    if result.outcome is Outcome.REPLAYED:
        first = result.transfer
        if first.get("credit") != user_account(username) or int(first.get("amount", -1)) != amount:
            raise Conflict("id_reused", f"credit id {credit_id!r} was used for a different credit")
        return {"id": transfer_id, "username": username, "amount": amount, "replayed": True}
    if not result.ok:
        raise Conflict(result.outcome.value, "the credit was refused")
    return {"id": transfer_id, "username": username, "amount": amount, "replayed": False}


async def account_view(ledger: Ledger, username: str, limit: int = 20) -> dict[str, Any]:
    name = user_account(username)
    balance = await ledger.balance(name)
    if balance is None:
        raise NotFound("unknown_account", f"no account named {username!r}")
    return {
        "username": username,
        "balance": balance.posted,
        "available": balance.available,
        "pending": balance.pending_debits,
        "currency": "sat",
        "journal": [_entry(t, name) for t in await ledger.history(name, limit)],
    }


def _entry(t: dict[str, Any], account: str) -> dict[str, Any]:
    amount = int(t["amount"])
    return {
        "id": t["id"], "state": t["state"], "amount": amount if t["credit"] == account else -amount,
        "counterparty": t["debit"] if t["credit"] == account else t["credit"],
        "resource": t["meta"].get("resource"), "reason": t["meta"].get("reason"),
        "created": int(t["created"]) / 1000,
    }


async def receipt_view(ledger: Ledger, receipt_id: str, username: str) -> dict[str, Any]:
    """A payment as its payer sees it; anyone else gets the same 404 as for an unknown id."""
    t = await ledger.transfer(receipt_id)
    if not t or t.get("debit") != user_account(username) or "method" not in t["meta"]:
        raise NotFound("unknown_receipt", "no receipt with this id for this account")
    return {
        "id": t["id"], "payer": username, "payee": t["credit"], "amount": int(t["amount"]), "currency": "sat",
        "state": t["state"], "resource": t["meta"].get("resource"), "method": t["meta"].get("method"),
        "request_hash": t["meta"].get("request_hash"), "created": int(t["created"]) / 1000,
        "settled": int(t["resolved"]) / 1000 if t.get("resolved") else None,
    }
