"""The simulator's own books: what every ledger account must hold, kept from the API's answers alone.

A definite answer (200/201 with a receipt, 4xx) moves the model at once. An ambiguous one (timeout,
connection reset, 503) is parked as `Ambiguous` and resolved later by reading the transfer by its id
(GET /v1/receipts/{id}); until then the accounts it may touch are `dirty` and are not compared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from service.client import Wallet
from service.keys import BITCOIN, GRANTS, REVENUE, question_escrow, user_account as user

ANY_ESCROW = "escrow:*"  # a dirty marker: some question escrow, not known which


@dataclass
class User:
    username: str
    wallet: Wallet
    price: int | None = None       # expert price, once a profile exists
    payout: str = "keep"           # keep | charity:<id>

    @property
    def earnings(self) -> str:
        return f"charity:{self.payout[8:]}" if self.payout.startswith("charity:") else user(self.username)


@dataclass
class Token:
    id: str
    secret: str
    owner: str
    max_total: int
    spent: int = 0
    revoked: bool = False


@dataclass
class Question:
    id: str
    lane: int
    asker: str
    kind: str                      # expert | list
    recipients: list[str]
    price_each: int
    shares: int
    replied: set[str] = field(default_factory=set)
    closing: bool = False          # past its deadline (time travel): the sweeper refunds it
    closed: bool = False


@dataclass
class ListRec:
    name: str
    owner: str
    price: int
    members: list[str] = field(default_factory=list)


@dataclass
class Withdrawal:
    id: str
    user: str
    amount: int
    state: str = "queued"


@dataclass
class Job:
    id: str
    lane: int
    buyer: str
    reward: int
    wanted: int
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # result id -> (runner's owner, state)
    closed: bool = False


@dataclass
class Run:
    id: str
    owner: str
    price: int
    receipt: str
    status: str = "queued"


@dataclass
class Ambiguous:
    """A paid request whose outcome the client does not know; resolved by its transfer id after `after`."""

    op: int
    transfer_id: str
    payer: str
    amount: int
    credit: str                    # the account it would pay (ANY_ESCROW when a question's id is unknown)
    told: str                      # what the server said ("" when nothing came back)
    after: float                   # monotonic time after which the transfer must be settled
    token: str = ""                # spending token id it was paid with
    kind: str = "call"             # call | ask
    lane: int = 0


class OpenSet:
    """Ids with O(1) add, remove and pick by number (open questions of a long run)."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self.pos:
            self.pos[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        at = self.pos.pop(item, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self.pos[last] = at

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Lane:
    """What one lane of concurrent ops owns: lanes never share users, so each lane's expectations hold."""

    users: list[User] = field(default_factory=list)
    experts: list[User] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    lists: list[ListRec] = field(default_factory=list)
    open_q: OpenSet = field(default_factory=OpenSet)
    queued: OpenSet = field(default_factory=OpenSet)   # withdrawal ids
    runners: list[tuple[str, str]] = field(default_factory=list)  # (runner id, owner)
    jobs: OpenSet = field(default_factory=OpenSet)     # open crowd job ids


@dataclass
class Model:
    posted: dict[str, int] = field(default_factory=dict)       # account -> credits - debits (posted)
    pdebit: dict[str, int] = field(default_factory=dict)       # account -> pending debits
    pcredit: dict[str, int] = field(default_factory=dict)      # account -> pending credits
    by_name: dict[str, User] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    questions: dict[str, Question] = field(default_factory=dict)
    lists: dict[str, ListRec] = field(default_factory=dict)
    withdrawals: dict[str, Withdrawal] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)          # QA runs not yet finished
    ambiguous: list[Ambiguous] = field(default_factory=list)
    lanes: list[Lane] = field(default_factory=list)
    wd_doubts: list[tuple[str, str, float, int]] = field(default_factory=list)  # (user, told, after, lane)
    closing: set[str] = field(default_factory=set)             # question ids past their deadline, not yet closed
    touched: set[str] = field(default_factory=set)             # accounts changed since the last comparison
    served: int = 0                # paid calls answered 2xx
    moved: int = 0                 # sat moved by definite outcomes

    def open(self, account: str) -> None:
        self.touched.add(account)
        self.posted.setdefault(account, 0)
        self.pdebit.setdefault(account, 0)
        self.pcredit.setdefault(account, 0)

    def move(self, debit: str, credit: str, amount: int) -> None:
        self.open(debit)
        self.open(credit)
        self.posted[debit] -= amount
        self.posted[credit] += amount
        self.moved += amount

    def hold(self, debit: str, credit: str, amount: int) -> None:
        self.open(debit)
        self.open(credit)
        self.pdebit[debit] += amount
        self.pcredit[credit] += amount

    def release(self, debit: str, credit: str, amount: int, *, post: bool) -> None:
        self.pdebit[debit] -= amount
        self.pcredit[credit] -= amount
        if post:
            self.move(debit, credit, amount)

    def available(self, username: str) -> int:
        name = user(username)
        return self.posted.get(name, 0) - self.pdebit.get(name, 0)

    def add_user(self, u: User, lane: Lane) -> None:
        lane.users.append(u)
        self.by_name[u.username] = u
        self.open(user(u.username))

    def dirty(self) -> set[str]:
        """Accounts whose balance depends on an outcome not yet known (not compared until it is)."""
        out: set[str] = set()
        for a in self.ambiguous:
            out |= {user(a.payer), a.credit}
        for name, _, _, _ in self.wd_doubts:  # a withdrawal answered ambiguously: queued or released later
            out |= {user(name), BITCOIN}
        for run in self.runs.values():  # a run that fails is refunded from revenue
            out |= {user(run.owner), REVENUE}
        for qid in self.closing:
            out |= {user(self.questions[qid].asker), question_escrow(qid)}
        return out

    def uncertain(self, username: str) -> bool:
        """May this user's available balance differ from the model right now (a pending resolution)?"""
        return user(username) in self.dirty()

    def ambiguous_due(self, now: float | None = None) -> list[Ambiguous]:
        now = time.monotonic() if now is None else now
        return [a for a in self.ambiguous if a.after <= now]

    def summary(self) -> dict[str, Any]:
        return {"users": len(self.by_name), "tokens": len(self.tokens), "questions": len(self.questions),
                "withdrawals": len(self.withdrawals), "served": self.served}
