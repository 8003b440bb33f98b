"""One module owns account names and Redis key names: the deployment's hash tag, every key builder and
every account-name builder live here, so sharding accounts into buckets (issue 16) changes one place."""
from __future__ import annotations

import hashlib

__all__ = [
    "Keys", "REVENUE", "GRANTS", "BITCOIN", "UNCLAIMED", "NONE", "user_account", "username_of", "is_user_account",
    "charity_account", "onchain_account", "is_onchain_account", "question_escrow", "job_escrow", "stake_escrow", "is_escrow",
]

# --- account names (ledger accounts: what a transfer debits and credits) ------------------------------
REVENUE = "sys:revenue"
GRANTS = "sys:grants"
BITCOIN = "sys:bitcoin"  # the chain boundary: deposits come from it, withdrawals go to it
UNCLAIMED = "sys:unclaimed"  # on-chain payments for calls that then failed, kept for the operator to refund
_USER = "u:"
_ESCROW = "escrow:"
_ONCHAIN = "onchain:"


def user_account(username: str) -> str:
    return f"{_USER}{username}"


def username_of(account: str) -> str:
    """The username a user account belongs to (the name itself when it is not a user account)."""
    return account.removeprefix(_USER)


def is_user_account(account: str) -> bool:
    return account.startswith(_USER)


def charity_account(charity_id: str) -> str:
    return f"charity:{charity_id}"


def onchain_account(txid: str) -> str:
    """The account one on-chain call payment's coins enter (escrow kind): the call's price is held from
    it; what is left (overpayment, a failed call) waits there for its payer or the operator."""
    return f"{_ONCHAIN}{txid.lower()}"


def is_onchain_account(account: str) -> bool:
    return account.startswith(_ONCHAIN)


def question_escrow(question_id: str) -> str:
    return f"{_ESCROW}q:{question_id}"


def job_escrow(job_id: str) -> str:
    return f"{_ESCROW}job:{job_id}"


def stake_escrow(job_id: str) -> str:
    return f"{_ESCROW}stake:{job_id}"


def is_escrow(account: str) -> bool:
    """An escrow account is opened by its first payment (the paywall opens it with the hold)."""
    return account.startswith(_ESCROW)


# --- Redis keys ------------------------------------------------------------------------------------
NONE = "-"  # the id of a placeholder key a script is given when the real one does not apply


class Keys:
    """Every Redis key of one deployment (REDIS_PREFIX), all under its one hash tag (one Cluster slot)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tag = "{" + prefix + "}"

    def of(self, *parts: str) -> str:
        """`{prefix}:part:part...`: the one spelling of a key; modules name their own area (`xp`, `qa`...)."""
        return ":".join([self.tag, *parts])

    # ledger: money keys, one builder each
    def account(self, name: str) -> str:
        return self.of("acct", name)

    @property
    def account_prefix(self) -> str:
        """What every account key starts with (the snapshot script appends names to it)."""
        return self.account("")

    def transfer(self, transfer_id: str) -> str:
        return self.of("xfer", transfer_id)

    def history(self, account: str) -> str:
        return self.of("hist", account)

    def response(self, transfer_id: str) -> str:
        return self.of("resp", transfer_id)

    def idempotency(self, payer: str, key: str) -> str:
        return self.of("idem", payer, hashlib.sha256(key.encode()).hexdigest())

    def guard(self, *parts: str) -> str:
        return self.of("guard", *parts)

    def token(self, token_id: str) -> str:
        return self.of("token", token_id)

    def tokens_of(self, owner: str) -> str:
        return self.of("tokens", owner)

    def live_tokens_of(self, owner: str) -> str:
        return self.of("tokens-live", owner)

    @property
    def journal(self) -> str:
        return self.of("journal")

    @property
    def accounts(self) -> str:
        return self.of("accounts")

    @property
    def pending(self) -> str:
        return self.of("pending")

    # request guards
    def seen(self, digest: str) -> str:
        return self.of("seen", digest)

    def rate(self, scope: str, key: str, window: int) -> str:
        return self.of("rl", scope, key, str(window))

    @property
    def invoice_secret(self) -> str:
        return self.of("config", "invoice_secret")
