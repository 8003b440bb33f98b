"""The double-entry ledger in Redis: owns every key that holds money (TigerBeetle's model, in Lua).

Accounts carry four counters (debits/credits, posted/pending). A transfer moves an integer amount of
satoshis from a debit to a credit account, either posted at once or as a pending hold that is later
posted (captured) or voided. Every write of one transfer is one Lua script: the script checks, applies
and appends to the journal stream atomically, so there is no window between "is it spent?" and
"mark it spent". Transfer ids are idempotency keys: an id settles once, ever.

All keys share one hash tag `{prefix}`, so every script touches a single Redis Cluster slot.
"""
from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, TimeoutError as RedisTimeoutError

from .keys import BITCOIN, GRANTS, NONE, REVENUE, UNCLAIMED, Keys, onchain_account, user_account
from .redis_client import ScriptBatcher
from .scripts import register

__all__ = [
    "Ledger", "Outcome", "Result", "Hold", "TokenSpend", "Guard", "ALL", "AccountKind", "Balance", "ReconcileReport",
    "user_account", "route_allows", "coin_id", "onchain_account", "MAX_COUNTER", "REVENUE", "GRANTS", "BITCOIN", "UNCLAIMED",
]


def route_allows(prefix: str, path: str) -> bool:
    """A token's route caveat covers whole path segments: '/v1/experts/bob' covers '/v1/experts/bob/questions',
    never '/v1/experts/bobx/...' (the transfer script applies the same rule in Lua)."""
    return path.startswith(prefix) and (len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/")


def coin_id(txid: str, vout: int) -> str:
    """The one id space for coins entering the ledger (call payments, deposits, anything later): an
    outpoint is booked once, whichever path sees it first."""
    return f"coin:{txid.lower()}:{int(vout)}"


class AccountKind(str, enum.Enum):
    USER = "user"          # payers, experts, contributors: may never go below zero
    REVENUE = "revenue"    # the operator's income
    ESCROW = "escrow"
    CHARITY = "charity"
    CHAIN = "chain"        # where money enters/leaves the ledger: the only kind allowed to go negative


class Outcome(str, enum.Enum):
    APPLIED = "ok"
    REPLAYED = "replayed"              # the id exists already: nothing moved, `transfer` is the first result
    INSUFFICIENT = "insufficient"
    NO_DEBIT_ACCOUNT = "no_debit_account"
    NO_CREDIT_ACCOUNT = "no_credit_account"
    PUBKEY_MISMATCH = "pubkey_mismatch"
    SAME_ACCOUNT = "same_account"
    NOT_FOUND = "not_found"
    NOT_PENDING = "not_pending"        # capture/void of a transfer that is already posted or voided
    EXPIRED = "expired"                # capture after the hold's timeout: the hold was voided instead
    EXISTS = "exists"                  # account already open
    TOKEN_INVALID = "token_invalid"    # unknown token id, wrong secret, or not the payer's
    TOKEN_REVOKED = "token_revoked"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_MAX_PER_CALL = "token_max_per_call"
    TOKEN_ROUTE = "token_route"
    TOKEN_MAX_TOTAL = "token_max_total"
    NOTHING = "nothing"                # an all-of-it transfer from an empty account
    GUARDED = "guarded"                # the guard's forbidden field is set (e.g. the question is closed)
    CLAIMED = "claimed"                # the guard's claim field is taken (e.g. this member was paid)
    LOCKED = "locked"                  # the hold is locked by another owner (e.g. a withdrawal batch)
    KEY_USED = "key_used"              # the payer's Idempotency-Key is bound to another transfer
    LIMIT = "counter_limit"            # a lifetime counter would pass MAX_COUNTER (2^53 - 1): refused, exact


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    transfer: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.APPLIED


@dataclass(frozen=True)
class Hold:
    """A pending transfer the caller must capture or void (the sweeper voids it on timeout otherwise)."""

    id: str
    debit: str
    credit: str
    amount: int
    token: str = ""   # the spending token it was paid with, whose spend a void gives back


ALL = "*"  # amount: everything the debit account has available (refunds of what was never earned)


@dataclass(frozen=True)
class Guard:
    """Makes a transfer conditional on another hash in the same slot, in the same script: refuse when
    `forbid` is set there, refuse when `claim` is set there and otherwise set it to `value`."""

    key: str
    forbid: str = ""
    claim: str = ""
    value: str = "1"


@dataclass(frozen=True)
class TokenSpend:
    """Pay through a spending token: its caveats are checked and its spend counted in the hold's script."""

    token_id: str
    secret_hash: str
    path: str


@dataclass(frozen=True)
class Balance:
    account: str
    kind: str
    posted: int      # credits_posted - debits_posted
    pending_debits: int
    pending_credits: int

    @property
    def available(self) -> int:
        return self.posted - self.pending_debits


@dataclass
class ReconcileReport:
    accounts: int = 0
    journal_entries: int = 0
    sum_posted: int = 0
    sum_pending: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.sum_posted == 0 and self.sum_pending == 0


# Lifetime counters (and amounts) stay at or below 2^53 - 1: Lua numbers are doubles, exact only up to
# there. A transfer that would push a counter past it is refused ('counter_limit'); 2^53 - 1 sat is 4x every
# bitcoin there will ever be, so only a bug or an operator's runaway grants can reach it. The scripts that
# check it (lua/ledger_transfer.lua, lua/ledger_post_all.lua) spell it `local MAX = 9007199254740991`.
MAX_COUNTER = 2**53 - 1


def _decode_transfer(row: dict) -> dict[str, Any]:
    """A transfer hash as str fields, with its `meta` JSON decoded."""
    out: dict[str, Any] = {_s(k): _s(v) for k, v in row.items()}
    out["meta"] = json.loads(out.get("meta") or "{}")
    return out


def _pairs(flat: list) -> dict[str, str]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class Ledger:
    """Async facade over the Lua scripts; each public method is one atomic Redis operation unless noted."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "mt", timeout: float = 5.0) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.tag = self.keys.tag
        self._open = register(redis, "ledger_open")
        self._transfer = register(redis, "ledger_transfer")
        self._resolve = register(redis, "ledger_resolve")
        self._snapshot = register(redis, "ledger_snapshot")
        self._lock = register(redis, "ledger_lock")
        self._post_all = register(redis, "ledger_post_all")
        self._create_token = register(redis, "token_create")
        self._batch = ScriptBatcher(redis, timeout)  # one deadline per round trip, not per reply

    @property
    def journal_key(self) -> str:
        return self.keys.journal

    # accounts --------------------------------------------------------------------------------------
    async def open_account(self, name: str, kind: AccountKind, **meta: str) -> Outcome:
        """Create an account (atomic, NX): APPLIED, or EXISTS if the name is taken (nothing changes)."""
        nonneg = "0" if kind is AccountKind.CHAIN else "1"
        args: list[Any] = [name, kind.value, nonneg]
        for key, value in meta.items():
            args += [key, value]
        res = await self._open(keys=[self.keys.account(name), self.keys.accounts, self.keys.journal], args=args)
        return Outcome(_s(res[0]))

    async def ensure_system_accounts(self) -> None:
        await self.open_account(REVENUE, AccountKind.REVENUE)
        await self.open_account(GRANTS, AccountKind.CHAIN)
        await self.open_account(BITCOIN, AccountKind.CHAIN)
        await self.open_account(UNCLAIMED, AccountKind.ESCROW)

    async def account_meta(self, name: str, key: str) -> str | None:
        value = await self.redis.hget(self.keys.account(name), f"meta:{key}")
        return _s(value) if value is not None else None

    async def balance(self, name: str) -> Balance | None:
        v = await self.redis.hmget(self.keys.account(name), "kind", "dp", "cp", "dpend", "cpend")
        if v[0] is None:
            return None
        dp, cp, dpend, cpend = (int(x) for x in v[1:])
        return Balance(name, _s(v[0]), cp - dp, dpend, cpend)

    async def history(self, name: str, limit: int = 20) -> list[dict[str, Any]]:
        """The account's most recent transfers, newest first (one pipeline round trip after the index)."""
        ids = await self.redis.lrange(self.keys.history(name), 0, limit - 1)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for transfer_id in ids:
                pipe.hgetall(self.keys.transfer(_s(transfer_id)))
            rows = await pipe.execute()
        return [_decode_transfer(row) for row in rows if row]

    async def transfer(self, transfer_id: str) -> dict[str, Any] | None:
        row = await self.redis.hgetall(self.keys.transfer(transfer_id))
        return _decode_transfer(row) if row else None

    # transfers -------------------------------------------------------------------------------------
    async def post(self, transfer_id: str, debit: str, credit: str, amount: int | str, *,
                   guard: Guard | None = None, **meta: str) -> Result:
        """A single-phase transfer (atomic, idempotent by id). `amount=ALL` moves the debit account's
        whole available balance; `guard` ties the transfer to a claim on another hash, atomically."""
        return await self._run_transfer(transfer_id, debit, credit, amount, "post", 0, "", None, meta, guard)

    async def hold(
        self, transfer_id: str, debit: str, credit: str, amount: int, *, timeout: int,
        require_pubkey: str = "", token: TokenSpend | None = None, open_credit: AccountKind | None = None,
        idempotency: tuple[str, str, int] | None = None, **meta: str,
    ) -> Result:
        """Reserve `amount` as a pending transfer (atomic, idempotent by id).

        With `require_pubkey`, the debit account's registered key must equal it; with `token`, the
        token must be the debit account's, unrevoked, unexpired, allow this path and price, and have
        `amount` left under max_total. All checked in the same script as the balance, so concurrent
        payments can never overspend a token or race a key change. With `idempotency` (payer, key, ttl)
        the key is bound to this transfer when it applies; a key bound to another transfer is KEY_USED
        (`transfer["id"]` names the first).
        """
        return await self._run_transfer(transfer_id, debit, credit, amount, "pend", timeout, require_pubkey,
                                        token, meta, open_credit=open_credit, idempotency=idempotency)

    async def _run_transfer(
        self, transfer_id: str, debit: str, credit: str, amount: int | str, mode: str, timeout: int,
        require_pubkey: str, token: TokenSpend | None, meta: dict[str, str], guard: Guard | None = None,
        open_credit: AccountKind | None = None, idempotency: tuple[str, str, int] | None = None,
    ) -> Result:
        valid = amount == ALL and mode == "post" and token is None
        if not valid and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
            raise ValueError(f"amount must be a positive integer of satoshis, got {amount!r}")
        if guard is not None and not guard.key.startswith(self.tag + ":"):
            raise ValueError("a guard key must carry the ledger's hash tag (one Redis Cluster slot)")
        args: list[Any] = [transfer_id, debit, credit, amount, mode, timeout, require_pubkey, json.dumps(meta),
                           token.secret_hash if token else "", token.path if token else "",
                           guard.forbid if guard else "", guard.claim if guard else "", guard.value if guard else "",
                           open_credit.value if open_credit else "", "1" if idempotency else "",
                           max(1, int(idempotency[2])) if idempotency else 0]
        k = self.keys
        res = await self._batch.call(
            self._transfer,
            [k.transfer(transfer_id), k.account(debit), k.account(credit), k.pending, k.journal, k.history(debit),
             k.history(credit), k.token(token.token_id if token else NONE), guard.key if guard else k.guard(NONE),
             k.accounts, k.idempotency(*idempotency[:2]) if idempotency else k.of("idem", NONE)],
            args,
        )
        outcome = Outcome(_s(res[0]))
        if outcome is Outcome.REPLAYED:
            return Result(outcome, _decode_transfer(_pairs(res[1:])))
        if outcome is Outcome.KEY_USED:
            return Result(outcome, {"id": _s(res[1])})
        if len(res) > 2:
            return Result(outcome, {"id": transfer_id, "state": _s(res[1]), "amount": int(res[2])})
        return Result(outcome, {"id": transfer_id, "state": _s(res[1])} if len(res) > 1 else {})

    async def post_all(self, transfers: list[tuple[str, str, str, int, dict[str, str]]], *,
                       open_credit: AccountKind | None = None) -> Result:
        """Post every (id, debit, credit, amount, meta) transfer or none (one script): the coins of one
        on-chain payment enter together. REPLAYED (nothing moved) when one id exists already; its fields
        are in `transfer`. Missing credit accounts are opened with `open_credit`."""
        if not transfers:
            raise ValueError("post_all needs at least one transfer")
        keys: list[str] = [self.keys.journal, self.keys.accounts]
        args: list[Any] = [open_credit.value if open_credit else ""]
        for transfer_id, debit, credit, amount, meta in transfers:
            if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
                raise ValueError(f"amount must be a positive integer of satoshis, got {amount!r}")
            keys += [self.keys.transfer(transfer_id), self.keys.account(debit), self.keys.account(credit),
                     self.keys.history(debit), self.keys.history(credit)]
            args += [transfer_id, debit, credit, amount, json.dumps(meta)]
        res = await self._batch.call(self._post_all, keys, args)
        outcome = Outcome(_s(res[0]))
        if outcome is Outcome.REPLAYED:
            return Result(outcome, _decode_transfer(_pairs(res[2:])))
        return Result(outcome, {"index": int(res[1])} if len(res) > 1 else {})

    async def capture(self, hold: Hold, response: str = "", ttl: int = 0) -> Result:
        """Post a pending hold (atomic). A hold past its timeout is voided instead (EXPIRED). With
        `response`, the paid response is kept for `ttl` s in the same script, for idempotent retries."""
        return await self._finish(hold.id, hold.debit, hold.credit, hold.token, "post", "captured", response, ttl)

    async def void(self, hold: Hold, reason: str = "voided") -> Result:
        """Release a pending hold back to the payer (atomic, idempotent)."""
        return await self._finish(hold.id, hold.debit, hold.credit, hold.token, "void", reason)

    async def _finish(self, transfer_id: str, debit: str, credit: str, token: str, action: str, reason: str,
                      response: str = "", ttl: int = 0) -> Result:
        res = await self._batch.call(
            self._resolve,
            [self.keys.transfer(transfer_id), self.keys.account(debit), self.keys.account(credit), self.keys.pending,
             self.keys.journal, self.keys.token(token or NONE), self.keys.response(transfer_id if response else NONE)],
            [transfer_id, action, reason, response, max(1, int(ttl))],
        )
        return Result(Outcome(_s(res[0])), {"id": transfer_id, "state": _s(res[1])} if len(res) > 1 else {})

    async def lock(self, transfer_id: str, owner: str) -> Result:
        """Take a pending hold out of the sweeper's reach for `owner` (atomic; same owner: REPLAYED).
        EXPIRED when its deadline has passed (it is then the sweeper's), LOCKED when another owner has it."""
        return await self._lock_call(transfer_id, "lock", owner, 0)

    async def unlock(self, transfer_id: str, owner: str, timeout: int) -> Result:
        """Give a hold locked by `owner` a deadline again, `timeout` seconds from now (atomic)."""
        return await self._lock_call(transfer_id, "unlock", owner, timeout)

    async def _lock_call(self, transfer_id: str, action: str, owner: str, timeout: int) -> Result:
        res = await self._batch.call(self._lock, [self.keys.transfer(transfer_id), self.keys.pending,
                                                  self.keys.journal], [transfer_id, action, owner, timeout])
        return Result(Outcome(_s(res[0])), {"id": transfer_id, "state": _s(res[1])} if len(res) > 1 else {})

    async def state_of(self, transfer_id: str) -> str | None:
        """The transfer's state (pending|posted|voided), None if it does not exist; bounded by the ledger's
        timeout (raises RedisError): how an ambiguous outcome is resolved before answering."""
        try:
            async with asyncio.timeout(self._batch.timeout):
                value = await self.redis.hget(self.keys.transfer(transfer_id), "state")
        except TimeoutError:
            raise RedisTimeoutError(f"no reply from Redis within {self._batch.timeout} s") from None
        return _s(value) if value is not None else None

    async def state_after_doubt(self, transfer_id: str) -> str:
        """After an ambiguous reply (timeout, lost connection: the script may still run), what became of
        the transfer: pending | posted | voided | absent, or unknown when it cannot be read either."""
        try:
            return await self.state_of(transfer_id) or "absent"
        except RedisError:
            return "unknown"

    async def store_response(self, transfer_id: str, response: str, ttl: int) -> None:
        """Keep a paid response for retries (when the hold was captured before the response existed)."""
        await self.redis.set(self.keys.response(transfer_id), response, ex=max(1, int(ttl)))

    async def response(self, transfer_id: str) -> str | None:
        """The response kept for a captured transfer, if any."""
        value = await self.redis.get(self.keys.response(transfer_id))
        return _s(value) if value is not None else None

    async def sweep_expired(self, limit: int = 500) -> int:
        """Void every hold whose timeout has passed; safe to run from many processes at once."""
        now_ms = int(time.time() * 1000)
        ids = await self.redis.zrangebyscore(self.keys.pending, 0, now_ms, start=0, num=limit)
        voided = 0
        for raw in ids:
            transfer_id = _s(raw)
            debit, credit, token = await self.redis.hmget(self.keys.transfer(transfer_id), "debit", "credit", "token")
            if debit is None:
                await self.redis.zrem(self.keys.pending, transfer_id)
                continue
            res = await self._finish(transfer_id, _s(debit), _s(credit), _s(token or ""), "void", "expired")
            voided += res.ok
        return voided

    async def pending_summary(self) -> tuple[int, float]:
        """(holds pending, age in seconds of the oldest one by its creation): for /metrics."""
        count = await self.redis.zcard(self.keys.pending)
        if not count:
            return 0, 0.0
        created = []
        for raw in await self.redis.zrange(self.keys.pending, 0, 9):  # the ten nearest deadlines
            value = await self.redis.hget(self.keys.transfer(_s(raw)), "created")
            if value is not None:
                created.append(int(value))
        return count, max(0.0, time.time() - min(created) / 1000) if created else 0.0

    # spending tokens -------------------------------------------------------------------------------
    async def create_token(self, token_id: str, owner: str, secret_hash: str, *, max_total: int,
                           max_per_call: int = 0, expires_at: int = 0, routes: list[str] | None = None,
                           label: str = "", cap: int = 0) -> bool:
        """Store a token (only the hash of its secret) and index it, unless the owner already has `cap`
        live (unrevoked, unexpired) tokens (0: no cap): False then. One script: the count and the write."""
        res = await self._batch.call(
            self._create_token,
            [self.keys.token(token_id), self.keys.tokens_of(owner), self.keys.live_tokens_of(owner)],
            [token_id, owner, secret_hash, max_total, max_per_call, expires_at, json.dumps(routes or []), label,
             cap],
        )
        return _s(res) == "ok"

    async def token(self, token_id: str) -> dict[str, Any] | None:
        row = await self.redis.hgetall(self.keys.token(token_id))
        if not row:
            return None
        out: dict[str, Any] = {_s(k): _s(v) for k, v in row.items()}
        for key in ("max_total", "max_per_call", "expires_at", "spent", "created"):
            out[key] = int(out[key])
        out["routes"] = json.loads(out["routes"])
        out["revoked"] = out["revoked"] == "1"
        return out

    async def tokens_of(self, owner: str) -> list[dict[str, Any]]:
        ids = sorted(_s(i) for i in await self.redis.smembers(self.keys.tokens_of(owner)))
        return [t for t in [await self.token(i) for i in ids] if t]

    async def revoke_token(self, token_id: str) -> None:
        """Revoked tokens refuse new holds at once; holds already taken settle normally. A revoked token
        no longer counts against its owner's cap."""
        owner = await self.redis.hget(self.keys.token(token_id), "owner")  # immutable once issued
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.token(token_id), "revoked", 1)
            if owner is not None:
                pipe.zrem(self.keys.live_tokens_of(_s(owner)), token_id)
            await pipe.execute()


    # audit -----------------------------------------------------------------------------------------
    async def reconcile(self, batch: int = 5000) -> ReconcileReport:
        """Replay the journal up to an atomic snapshot of all balances and compare (read-only)."""
        snap = await self._snapshot(keys=[self.keys.accounts, self.keys.journal], args=[self.keys.account_prefix])
        last_id = _s(snap[0])
        stored: dict[str, tuple[int, int, int, int]] = {}
        for i in range(1, len(snap), 5):
            stored[_s(snap[i])] = tuple(int(x) for x in snap[i + 1:i + 5])  # type: ignore[assignment]
        replayed: dict[str, list[int]] = {name: [0, 0, 0, 0] for name in stored}
        report = ReconcileReport(accounts=len(stored))
        opened: set[str] = set()
        start = "-"
        while last_id != "0-0":
            entries = await self.redis.xrange(self.keys.journal, start, last_id, count=batch)
            for _, raw in entries:
                report.journal_entries += 1
                e = {_s(k): _s(v) for k, v in raw.items()}
                self._apply_entry(e, replayed, opened, report)
            if not entries or _s(entries[-1][0]) == last_id:
                break
            start = "(" + _s(entries[-1][0])
        for name, (dp, cp, dpend, cpend) in stored.items():
            r = replayed.get(name, [0, 0, 0, 0])
            if name not in opened:
                report.mismatches.append(f"{name}: no 'open' entry in the journal")
            if [dp, cp, dpend, cpend] != r:
                report.mismatches.append(
                    f"{name}: stored dp={dp} cp={cp} dpend={dpend} cpend={cpend}, journal gives "
                    f"dp={r[0]} cp={r[1]} dpend={r[2]} cpend={r[3]}")
            if dp < 0 or cp < 0 or dpend < 0 or cpend < 0:
                report.mismatches.append(f"{name}: negative counter")
            report.sum_posted += cp - dp
            report.sum_pending += cpend - dpend
        for name in replayed.keys() - stored.keys():
            report.mismatches.append(f"{name}: in the journal but not an account")
        report.mismatches += await self._overdrawn(stored)
        return report

    async def _overdrawn(self, stored: dict[str, tuple[int, int, int, int]]) -> list[str]:
        """Accounts that may never go below zero (users, escrows, revenue) whose available balance,
        posted minus pending debits, is negative, in exact integers (`nonneg` never changes)."""
        names = list(stored)
        out: list[str] = []
        for i in range(0, len(names), 1000):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names[i:i + 1000]:
                    pipe.hget(self.keys.account(name), "nonneg")
                flags = await pipe.execute()
            for name, flag in zip(names[i:i + 1000], flags):
                dp, cp, dpend, _ = stored[name]
                if flag is not None and _s(flag) == "1" and cp - dp - dpend < 0:
                    out.append(f"{name}: available balance {cp - dp - dpend} is below zero")
        return out

    @staticmethod
    def _apply_entry(e: dict[str, str], acc: dict[str, list[int]], opened: set[str], report: ReconcileReport) -> None:
        op = e.get("op")
        if op == "open":
            opened.add(e["account"])
            acc.setdefault(e["account"], [0, 0, 0, 0])
            return
        amount = int(e["amount"])
        d = acc.setdefault(e["debit"], [0, 0, 0, 0])
        c = acc.setdefault(e["credit"], [0, 0, 0, 0])
        if op == "post":
            d[0] += amount; c[1] += amount  # noqa: E702
        elif op == "pend":
            d[2] += amount; c[3] += amount  # noqa: E702
        elif op == "capture":
            d[2] -= amount; c[3] -= amount; d[0] += amount; c[1] += amount  # noqa: E702
        elif op == "void":
            d[2] -= amount; c[3] -= amount  # noqa: E702
        elif op in ("lock", "unlock"):
            pass  # a hold taken out of (or back into) the sweeper's reach: no balance moves
        else:
            report.mismatches.append(f"unknown journal op {op!r}")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
