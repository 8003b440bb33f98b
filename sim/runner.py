"""One simulation run: a fresh cluster, a genesis, then ops in order with checkpoints; stops at the
first violated invariant. Every money op goes through the real HTTP API, signed as a client signs it."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import aiohttp

from service import protocol as P
from service.client import Wallet, signed_headers, transfer_headers
from service.config import DEFAULT_TESTNET_ADDRESS
from service.keys import is_escrow

from . import faults, invariants
from .cluster import ADMIN, KEYS, PUBLIC_URL, Cluster
from .model import (ANY_ESCROW, BITCOIN, GRANTS, REVENUE, Ambiguous, Job, Lane, ListRec, Model, Question, Run,
                    Token, User, Withdrawal, user)
from .ops import Op, OpSource

MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: sim}\n"
PAYEE = ("microtasks", DEFAULT_TESTNET_ADDRESS)
LANE: contextvars.ContextVar[int] = contextvars.ContextVar("lane", default=0)
CURRENT: contextvars.ContextVar[int] = contextvars.ContextVar("current", default=-1)


class Violation(Exception):
    """An invariant failed: which one, at which op, and what was seen."""

    def __init__(self, invariant: str, op: int, detail: Any) -> None:
        super().__init__(f"{invariant} at op {op}: {detail}")
        self.invariant, self.op, self.detail = invariant, op, detail


@dataclass
class Resp:
    status: int                    # -1: no response (timeout, connection reset/refused)
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def code(self) -> str:
        return self.body.get("error", "") if isinstance(self.body, dict) else ""

    @property
    def ambiguous(self) -> bool:
        return self.status == -1 or self.status >= 500


@dataclass
class Config:
    seed: int
    kinds: set[str]
    modifiers: set[str]
    skip: set[str] = field(default_factory=set)      # invariants not checked (pending a fix)
    servers: int = 2
    hold_timeout: int = 3
    redis_timeout_ms: int = 500
    check_every: int = 250
    reconcile_every: float = 30.0                    # seconds between `python -m service reconcile` runs
    client_timeout: float = 3.0
    lanes: int = 4                 # ops i ≡ k (mod lanes) run in lane k, concurrently with the other lanes
    weights: dict[str, float] = field(default_factory=dict)  # op/fault kind -> weight, over the defaults
    plant: int | None = None       # self-test: at this op the model books a served call twice (a planted bug)


class Gate:
    """Ops of all lanes run together; a fault or a checkpoint runs alone (new ops wait, running ones finish)."""

    def __init__(self) -> None:
        self.inflight = 0
        self.exclusive = False
        self.cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self.cond:
            await self.cond.wait_for(lambda: not self.exclusive)
            self.inflight += 1
        try:
            yield
        finally:
            async with self.cond:
                self.inflight -= 1
                self.cond.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self.cond:
            await self.cond.wait_for(lambda: not self.exclusive)
            self.exclusive = True
            await self.cond.wait_for(lambda: self.inflight == 0)
        try:
            yield
        finally:
            async with self.cond:
                self.exclusive = False
                self.cond.notify_all()


class Sim:
    def __init__(self, cfg: Config, tmp: Path) -> None:
        self.cfg = cfg
        self.tmp = tmp
        self.cluster = Cluster(tmp, servers=cfg.servers, hold_timeout=cfg.hold_timeout,
                               redis_timeout_ms=cfg.redis_timeout_ms, workers=3 if "qa_run" in cfg.kinds else 0)
        self.model = Model(lanes=[Lane() for _ in range(cfg.lanes)])
        self.gate = Gate()
        self.source = OpSource(cfg.seed, cfg.kinds, cfg.modifiers, cfg.weights)
        self.http: aiohttp.ClientSession | None = None
        self.op_counts: Counter[str] = Counter()
        self.fault_counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.refundable: set[str] = set()    # captured after an ambiguous answer: the paywall may refund them
        self.early_refunds: dict[str, tuple[str, str, int]] = {}  # refunds seen before their capture was resolved
        self.run_outcomes: Counter[str] = Counter()  # QA runs: final status (and refunded)
        self.resolved: Counter[str] = Counter()  # ambiguous outcomes: what the client was told -> the transfer's state
        self.price = 0
        self.per_document = 0
        self.base_accounts: set[str] = set()
        self.last_reconcile = time.monotonic()
        self.reconciles = 0
        self.reconcile_interval = cfg.reconcile_every
        self.started = self.last_progress = time.monotonic()
        self.journal_pos = ""      # the last journal entry a comparison has seen
        self.ops_done = 0
        self.refunds = 0
        self.checkpoints = 0
        self.created = self.lost = 0

    # --- plumbing ---------------------------------------------------------------------------------
    def violate(self, invariant: str, detail: Any) -> None:
        if invariant in self.cfg.skip:
            return
        raise Violation(invariant, CURRENT.get(), detail)

    def server(self, n: int) -> str:
        return self.cluster.servers[n % len(self.cluster.servers)].url

    def wallet(self, username: str) -> Wallet:
        key = hashlib.sha256(f"sim:{self.cfg.seed}:{username}".encode()).digest()
        return Wallet(username, key)

    async def send(self, method: str, url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
                   timeout: float | None = None) -> Resp:
        assert self.http is not None
        try:
            async with self.http.request(method, url, data=data, headers=headers or {},
                                         timeout=aiohttp.ClientTimeout(total=timeout or self.cfg.client_timeout)) as r:
                raw = await r.read()
                try:
                    body: Any = json.loads(raw) if r.content_type == "application/json" else raw.decode(errors="replace")
                except ValueError:
                    body = raw.decode(errors="replace")
                resp = Resp(r.status, body, dict(r.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            return Resp(-1, error=type(exc).__name__)
        self.statuses[resp.status] += 1
        if resp.status >= 500 and not (resp.status == 503 and resp.code):
            self.violate("no_5xx", {"url": url, "status": resp.status, "body": resp.body})
        return resp

    async def signed(self, username: str, method: str, path: str, body: Any = None, server: int = 0,
                     headers: dict[str, str] | None = None) -> tuple[Resp, dict[str, str], bytes]:
        url = self.server(server) + path
        raw = json.dumps(body).encode() if body is not None else b""
        h = signed_headers(self.model.by_name[username].wallet if username in self.model.by_name
                           else self.wallet(username), method, PUBLIC_URL + path, raw)  # the deployment's origin
        if body is not None:
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        return await self.send(method, url, data=raw or None, headers=h), h, raw

    async def until_definite(self, attempt, tries: int = 40) -> Resp:
        """Repeat an idempotent request until it gets a definite answer (Redis back, server restarted)."""
        resp = Resp(-1)
        for n in range(tries):
            resp = await attempt(n)
            if not resp.ambiguous:
                return resp
            await asyncio.sleep(0.25)
        self.violate("liveness", f"no definite answer after {tries} tries: {resp}")
        return resp

    @property
    def lane(self) -> Lane:
        return self.model.lanes[LANE.get()]

    def pick(self, items: list, n: int) -> Any:
        return items[n % len(items)] if items else None

    # --- run --------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.cluster.start()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        assert self.cluster.admin is not None
        self.base_accounts = set(await self.cluster.admin.smembers(KEYS.accounts))
        for name in self.base_accounts:
            self.model.open(name)
        resp = await self.send("POST", self.server(0) + "/v1/qa/validate", data=MANIFEST)
        assert resp.status == 402, resp
        self.price = int(resp.headers[P.PRICE])
        two = await self.send("POST", self.server(0) + "/v1/qa/validate", data=MANIFEST + b"---\n" + MANIFEST)
        self.per_document = int(two.headers[P.PRICE]) - self.price
        await self.genesis()

    async def genesis(self) -> None:
        """Not in the op log: per lane, four funded users, one an expert, a list of two, two tokens."""
        for k in range(self.cfg.lanes):
            LANE.set(k)
            names = [f"g{k}-{n}" for n in range(4)]
            for n, name in enumerate(names):
                await self.register(name)
                await self.credit_user(name, 200_000, f"genesis-{k}-{n}")
            await self.set_profile(names[0], 500, "keep")
            await self.create_list(names[1], f"genesis{k}", 300)
            for member in names[2:]:
                await self.join_list(f"genesis{k}", member)
            for owner in names[:2]:
                await self.create_token(owner, 50_000)
        LANE.set(0)

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        await self.cluster.stop()

    async def run(self, indices: Iterable[int], *, deadline: float | None = None) -> None:
        """Lane k runs the ops i ≡ k (mod lanes) in order; faults and checkpoints run alone."""
        lanes = self.cfg.lanes

        async def lane(k: int) -> None:
            LANE.set(k)
            mine = (range(k, indices.stop, lanes) if isinstance(indices, range) and indices.start == 0
                    and indices.step == 1 else [i for i in indices if i % lanes == k])
            for i in mine:
                if deadline is not None and time.monotonic() > deadline:
                    break
                op = self.source.op(i)
                CURRENT.set(i)
                if op.kind in faults.FAULT_OPS:
                    async with self.gate.alone():
                        await self.execute(op)
                else:
                    async with self.gate.shared():
                        await self.execute(op)
                self.ops_done += 1
                if self.ops_done % self.cfg.check_every == 0:
                    async with self.gate.alone():
                        await invariants.checkpoint(self, final=False)

        try:
            async with asyncio.TaskGroup() as group:
                for k in range(lanes):
                    group.create_task(lane(k))
        except* Violation as eg:
            raise eg.exceptions[0] from None
        CURRENT.set(max(indices) if indices else -1)
        await invariants.checkpoint(self, final=True)

    async def execute(self, op: Op) -> None:
        self.op_counts[op.kind] += 1
        for flag, name in (("retry", "retry"), ("dup", "dup_delivery"), ("replay", "replay_signed")):
            if getattr(op, flag):
                self.fault_counts[name] += 1
        if op.kind in faults.FAULT_OPS:
            self.fault_counts[op.kind] += 1
            await faults.FAULT_OPS[op.kind](self, op)
            return
        await getattr(self, f"op_{op.kind}")(op)

    # --- accounts and credits ---------------------------------------------------------------------
    async def register(self, username: str, server: int = 0) -> None:
        wallet = self.wallet(username)
        body = json.dumps({"username": username, "pubkey": wallet.pubkey.hex()}).encode()
        headers = {P.AUTHORIZATION: wallet.sign(P.registration_message(PUBLIC_URL, body)),
                   "Content-Type": "application/json"}
        resp = await self.until_definite(lambda n: self.send("POST", self.server(server + n) + "/v1/accounts",
                                                             data=body, headers=headers))
        if resp.status in (201, 409) and username not in self.model.by_name:
            self.model.add_user(User(username, wallet), self.lane)
        elif resp.status not in (201, 409):
            self.violate("expected_status", f"register {username}: {resp.status} {resp.body}")

    async def op_register(self, op: Op) -> None:
        await self.register(f"u{op.i}", op.c)

    async def credit_user(self, username: str, amount: int, credit_id: str, server: int = 0,
                          retry: bool = False) -> None:
        payload = json.dumps({"username": username, "amount": amount, "reason": "sim", "id": credit_id}).encode()
        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}

        def attempt(n: int):
            return self.send("POST", self.server(server + n) + "/v1/admin/credits", data=payload, headers=headers)

        resp = await self.until_definite(attempt)
        if resp.status in (200, 201):   # 200: replayed, an earlier attempt applied it (and we had not booked it)
            self.model.move(GRANTS, user(username), amount)
        else:
            self.violate("expected_status", f"credit {username}: {resp.status} {resp.body}")
            return
        if retry:
            again = await self.until_definite(attempt)
            if again.status != 200 or not again.body.get("replayed"):
                self.violate("idempotent_retry", f"credit {credit_id} retried: {again.status} {again.body}")

    async def op_credit(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u:
            await self.credit_user(u.username, 1000 + op.b % 50_000, f"c{op.i}", op.c, op.retry)

    # --- paid calls -------------------------------------------------------------------------------
    def expect_paid(self, payer: str, amount: int) -> int | None:
        """200 or 402 when the payer's available balance is known; None when a resolution is pending."""
        if self.model.uncertain(payer):
            return None
        return 200 if self.model.available(payer) >= amount else 402

    async def paid_call(self, op: Op, payer: str, server: int, docs: int = 1) -> None:
        """POST /v1/qa/validate paid with a signed BitTransfer (more documents: a slower handler, a higher price)."""
        url = self.server(server) + "/v1/qa/validate"
        price = self.price + self.per_document * (docs - 1)
        data = MANIFEST if docs == 1 else b"---\n".join([MANIFEST] * docs)
        headers = transfer_headers(self.model.by_name[payer].wallet, amount=price, payee_username=PAYEE[0],
                                   payee_address=PAYEE[1], url=PUBLIC_URL + "/v1/qa/validate")
        tid = "bt_" + hashlib.sha256(headers[P.BITCOIN_TRANSFER].encode()).hexdigest()
        expected = self.expect_paid(payer, price)
        resp = await self.send("POST", url, data=data, headers=headers)
        self.settle_call(resp, tid, payer, price, expected, REVENUE)
        if op.retry:
            again = await self.send("POST", self.server(server + 1) + "/v1/qa/validate", data=data, headers=headers)
            self.check_retry(resp, again, tid)

    def settle_call(self, resp: Resp, tid: str, payer: str, amount: int, expected: int | None, credit: str,
                    token: Token | None = None, kind: str = "call") -> None:
        """Book a paid request's definite outcome, or park it as ambiguous."""
        if resp.ambiguous:
            told = f"{resp.code}: {resp.body.get('detail', '')}" if isinstance(resp.body, dict) else ""
            self.model.ambiguous.append(Ambiguous(CURRENT.get(), tid, payer, amount, credit, str(told),
                                                  time.monotonic() + self.cfg.hold_timeout + 3,
                                                  token.id if token else "", kind, LANE.get()))
            return
        if 200 <= resp.status < 300:
            receipt = resp.headers.get(P.PAYMENT_RECEIPT)
            if receipt != tid:
                self.violate("receipt", f"2xx with receipt {receipt!r}, expected {tid}")
            if expected is not None and expected != 200:
                self.violate("served_without_funds", f"{payer} available {self.model.available(payer)}, "
                                                      f"price {amount}: {resp.status}")
            self.model.move(user(payer), credit, amount)
            if CURRENT.get() == self.cfg.plant:
                self.model.move(user(payer), credit, amount)
            self.model.served += 1
            if token:
                token.spent += amount
        elif expected == 200:
            self.violate("refused_with_funds", f"{payer} available {self.model.available(payer)}, price {amount}: "
                                               f"{resp.status} {resp.body}")
        elif expected is not None and resp.status != expected and not (token and resp.status in (401, 403)):
            self.violate("expected_status", f"expected {expected}, got {resp.status} {resp.body}")

    def check_retry(self, first: Resp, again: Resp, tid: str) -> None:
        """A retry of a paid request never pays twice; once the first was served, it gets the same result.
        A retry served after an ambiguous first answer explains a capture (the first was not the charge)."""
        if first.ambiguous and 200 <= again.status < 300:
            for amb in self.model.ambiguous:
                if amb.transfer_id == tid:
                    amb.told = ""
        if 200 <= again.status < 300 and again.headers.get(P.PAYMENT_RECEIPT) != tid:
            self.violate("retry_paid_twice", f"retry of {tid} answered with receipt "
                                             f"{again.headers.get(P.PAYMENT_RECEIPT)}")
        if 200 <= first.status < 300 and not 200 <= again.status < 300 and not again.ambiguous:
            self.violate("retry_gets_result", f"retry of a served request {tid}: {again.status} {again.body}")

    async def op_call_bt(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u:
            await self.paid_call(op, u.username, op.c)

    async def op_call_token(self, op: Op) -> None:
        tok = self.pick(self.lane.tokens, op.a)
        if tok is None:
            return
        key = f"k{self.cfg.seed}-{op.i}"
        tid = "tok_" + hashlib.sha256(f"{tok.id}|{key}".encode()).hexdigest()[:40]  # as the server names it
        headers = {P.AUTHORIZATION: f"{P.TOKEN_SCHEME} {tok.id}.{tok.secret}", P.IDEMPOTENCY_KEY: key,
                   P.PAYMENT_AMOUNT: str(self.price)}
        expected = self.expect_paid(tok.owner, self.price)
        uncertain_token = any(a.token == tok.id for a in self.model.ambiguous)
        if tok.revoked:
            expected = 401
        elif uncertain_token:
            expected = None
        elif tok.spent + self.price > tok.max_total:
            expected = 403
        resp = await self.send("POST", self.server(op.c) + "/v1/qa/validate", data=MANIFEST, headers=headers)
        self.settle_call(resp, tid, tok.owner, self.price, expected, REVENUE, tok)
        if op.retry:
            again = await self.send("POST", self.server(op.c + 1) + "/v1/qa/validate", data=MANIFEST, headers=headers)
            self.check_retry(resp, again, tid)

    # --- tokens -----------------------------------------------------------------------------------
    async def create_token(self, owner: str, max_total: int, server: int = 0, replay: bool = False) -> None:
        resp, headers, raw = await self.signed(owner, "POST", "/v1/accounts/me/tokens", {"max_total": max_total},
                                               server)
        if resp.status == 201:
            tid, secret = resp.body["token"].split(".", 1)
            self.add_token(Token(tid, secret, owner, max_total))
        elif not resp.ambiguous:
            self.violate("expected_status", f"token create: {resp.status} {resp.body}")
        if replay:
            again = await self.send("POST", self.server(server) + "/v1/accounts/me/tokens", data=raw, headers=headers)
            if again.status == 201:
                tid, secret = again.body["token"].split(".", 1)
                self.add_token(Token(tid, secret, owner, max_total))
                if resp.status == 201:  # after an ambiguous first answer the replay may be the first use
                    self.violate("signed_replay_refused", "the same signed token request created a second token")

    async def op_token_create(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u:
            await self.create_token(u.username, 500 + op.b % 20_000, op.c, op.replay)

    async def op_token_revoke(self, op: Op) -> None:
        tok = self.pick(self.lane.tokens, op.a)
        if tok is None:
            return
        for n in range(40):
            resp, _, _ = await self.signed(tok.owner, "DELETE", f"/v1/accounts/me/tokens/{tok.id}", None, op.c + n)
            if not resp.ambiguous:
                break
            await asyncio.sleep(0.25)
        if resp is not None and resp.status == 200:
            tok.revoked = True
        else:
            self.violate("expected_status", f"token revoke: {resp}")

    # --- experts, lists, questions ----------------------------------------------------------------
    async def set_profile(self, username: str, price: int, payout: str, server: int = 0) -> None:
        body = {"display_name": username, "price": price, "payout": payout, "reply_hours": 1}
        for n in range(40):
            resp, _, _ = await self.signed(username, "PUT", "/v1/experts/me", body, server + n)
            if not resp.ambiguous:
                break
            await asyncio.sleep(0.25)
        if resp.status == 200:
            u = self.model.by_name[username]
            if u.price is None:
                self.lane.experts.append(u)
            u.price, u.payout = price, payout
        else:
            self.violate("expected_status", f"profile: {resp.status} {resp.body}")

    async def op_expert_profile(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u:
            payout = "charity:coincenter" if op.b % 4 == 0 else "keep"
            await self.set_profile(u.username, 100 + op.c % 5000, payout, op.c)

    async def create_list(self, owner: str, name: str, price: int, server: int = 0) -> None:
        resp, _, _ = await self.signed(owner, "POST", "/v1/lists", {"name": name, "price": price}, server)
        if resp.status == 201:
            lst = ListRec(name, owner, price)
            self.lane.lists.append(lst)
            self.model.lists[name] = lst
        elif not resp.ambiguous:
            self.violate("expected_status", f"list create: {resp.status} {resp.body}")

    async def op_list_create(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u:
            await self.create_list(u.username, f"l{op.i}", 100 + op.b % 2000, op.c)

    async def join_list(self, name: str, member: str, server: int = 0) -> None:
        for n in range(40):  # idempotent: asked again until it answers
            resp, _, _ = await self.signed(member, "POST", f"/v1/lists/{name}/members/me", None, server + n)
            if not resp.ambiguous:
                break
            await asyncio.sleep(0.25)
        lst = self.model.lists[name]
        if resp.status == 200 and member not in lst.members:
            lst.members.append(member)
        elif not resp.ambiguous and resp.status != 200:
            self.violate("expected_status", f"join: {resp.status} {resp.body}")

    async def op_list_join(self, op: Op) -> None:
        lst, u = self.pick(self.lane.lists, op.a), self.pick(self.lane.users, op.b)
        if lst and u:
            await self.join_list(lst.name, u.username, op.c)

    async def ask(self, op: Op, asker: str, path: str, body: dict, amount: int, kind: str, recipients: list[str],
                  price_each: int, shares: int) -> None:
        url = self.server(op.c) + path
        headers = transfer_headers(self.model.by_name[asker].wallet, amount=amount, payee_username=PAYEE[0],
                                   payee_address=PAYEE[1], url=PUBLIC_URL + path)
        headers["Content-Type"] = "application/json"
        tid = "bt_" + hashlib.sha256(headers[P.BITCOIN_TRANSFER].encode()).hexdigest()
        expected = self.expect_paid(asker, amount)
        if not recipients and expected in (200, 402):
            expected = 403  # nobody to answer: refused before the hold, whatever the balance
        elif expected == 200:
            expected = 201
        resp = await self.send("POST", url, data=json.dumps(body).encode(), headers=headers)
        if resp.ambiguous:
            self.settle_call(resp, tid, asker, amount, None, ANY_ESCROW, kind="ask")
            return
        if resp.status == 201:
            qid = resp.body["id"]
            if expected in (402, 403):
                self.violate("served_without_funds" if expected == 402 else "expected_status",
                             f"ask by {asker} ({self.model.available(asker)} available, price {amount}, "
                             f"recipients {recipients}) answered 201")
            self.settle_call(resp, tid, asker, amount, None, f"escrow:q:{qid}")
            self.add_question(Question(qid, LANE.get(), asker, kind, recipients, price_each, shares))
        elif expected == 201:
            self.violate("refused_with_funds", f"ask by {asker} ({self.model.available(asker)} available, "
                                               f"price {amount}): {resp.status} {resp.body}")
        elif expected is not None and resp.status != expected:
            self.violate("expected_status", f"ask: expected {expected}, got {resp.status} {resp.body}")

    async def op_ask(self, op: Op) -> None:
        expert, asker = self.pick(self.lane.experts, op.a), self.pick(self.lane.users, op.b)
        if not expert or not asker or asker is expert:
            return
        await self.ask(op, asker.username, f"/v1/experts/{expert.username}/questions", {"text": f"q{op.i}"},
                       expert.price, "expert", [expert.username], expert.price, 1)

    async def op_ask_list(self, op: Op) -> None:
        lst, asker = self.pick(self.lane.lists, op.a), self.pick(self.lane.users, op.b)
        if not lst or not asker:
            return
        shares = 1 + op.c % 3
        recipients = [m for m in lst.members if m != asker.username]
        await self.ask(op, asker.username, f"/v1/lists/{lst.name}/questions",
                       {"text": f"q{op.i}", "max_responses": shares, "hours": 1}, lst.price * shares, "list",
                       recipients, lst.price, shares)

    def open_question(self, n: int) -> Question | None:
        qid = self.pick(self.lane.open_q.items, n)
        return self.model.questions[qid] if qid else None

    def add_question(self, q: Question) -> None:
        self.model.questions[q.id] = q
        if not q.closed:
            self.model.lanes[q.lane].open_q.add(q.id)

    def close_question(self, q: Question) -> None:
        q.closed = True
        self.model.closing.discard(q.id)
        self.model.lanes[q.lane].open_q.discard(q.id)

    def add_token(self, tok: Token) -> None:
        self.lane.tokens.append(tok)
        self.model.tokens[tok.id] = tok

    def add_withdrawal(self, wd: Withdrawal) -> None:
        self.model.withdrawals[wd.id] = wd
        self.lane.queued.add(wd.id)

    async def op_reply(self, op: Op) -> None:
        q = self.open_question(op.a)
        if q is None or not q.recipients:
            return
        replier = self.pick(q.recipients, op.b)
        if q.closing:
            expected = 409
        elif replier in q.replied or (q.kind == "expert" and q.replied) or len(q.replied) >= q.shares:
            expected = 409
        else:
            expected = 201
        body = {"text": f"r{op.i}"}
        earnings = self.model.by_name[replier].earnings
        if op.dup:
            first, second = await asyncio.gather(
                self.signed(replier, "POST", f"/v1/questions/{q.id}/reply", body, op.c),
                self.signed(replier, "POST", f"/v1/questions/{q.id}/reply", body, op.c + 1))
            resps = [first[0], second[0]]
        else:
            resps = [(await self.signed(replier, "POST", f"/v1/questions/{q.id}/reply", body, op.c))[0]]
        if any(r.ambiguous for r in resps):  # resolve by asking again: the claim per replier answers
            again, _, _ = await self.signed(replier, "POST", f"/v1/questions/{q.id}/reply", body, op.c)
            for _ in range(40):
                if not again.ambiguous:
                    break
                await asyncio.sleep(0.25)
                again, _, _ = await self.signed(replier, "POST", f"/v1/questions/{q.id}/reply", body, op.c)
            resps = [r for r in resps if not r.ambiguous] + [again]
        paid = sum(1 for r in resps if r.status == 201) + (
            1 if expected == 201 and any(r.code == "already_replied" for r in resps) and
            not any(r.status == 201 for r in resps) else 0)
        if paid > 1:
            self.violate("paid_once", f"reply to {q.id} by {replier} paid {paid} times")
        if paid and expected != 201:
            self.violate("expected_status", f"reply to {q.id} by {replier} paid, expected refusal ({q})")
        if not paid and expected == 201:
            self.violate("expected_status", f"reply to {q.id} by {replier} refused: {[r.body for r in resps]}")
        if paid:
            self.model.move(f"escrow:q:{q.id}", earnings, q.price_each)
            q.replied.add(replier)
            if q.kind == "expert":
                self.close_question(q)

    async def op_q_withdraw(self, op: Op) -> None:
        q = self.open_question(op.a)
        if q is None:
            return
        for n in range(40):
            resp, _, _ = await self.signed(q.asker, "POST", f"/v1/questions/{q.id}/withdraw", None, op.c + n)
            if not resp.ambiguous:
                break
            await asyncio.sleep(0.25)
        if resp.status == 200:
            escrow = f"escrow:q:{q.id}"
            self.model.open(escrow)
            if self.model.posted[escrow]:
                self.model.move(escrow, user(q.asker), self.model.posted[escrow])
            self.close_question(q)
        elif resp.status == 409 and q.kind == "expert" and q.replied:
            pass
        else:
            self.violate("expected_status", f"withdraw question {q.id}: {resp.status} {resp.body}")

    async def op_q_expire(self, op: Op) -> None:
        """Time travel: the question's deadline moves to now, as the clock would move it (reply_hours ≥ 1)."""
        q = self.open_question(op.a)
        if q is None or q.closing:
            return
        assert self.cluster.admin is not None
        past = int(time.time() * 1000) - 1000
        await self.cluster.admin.hset(KEYS.of("xp", "q", q.id), "deadline", past)
        await self.cluster.admin.zadd(KEYS.of("xp", "open"), {q.id: past}, xx=True)
        q.closing = True
        self.model.closing.add(q.id)

    # --- withdrawals ------------------------------------------------------------------------------
    async def op_withdraw(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u is None:
            return
        name = u.username
        avail = self.model.available(name)
        amount = max(1000, int(avail * (0.05 + 0.5 * op.x)))
        expected = None if self.model.uncertain(name) else (201 if avail >= amount else 402)
        body = {"amount": amount, "address": DEFAULT_TESTNET_ADDRESS}
        resp, headers, raw = await self.signed(name, "POST", "/v1/accounts/me/withdrawals", body, op.c)
        if resp.ambiguous:  # looked at once the server's background release must have run
            self.doubt_withdrawal(name, resp)
            return
        if resp.status == 201:
            if expected == 402:
                self.violate("served_without_funds", f"withdrawal of {amount} with {avail} available")
            self.model.hold(user(name), BITCOIN, amount)
            self.add_withdrawal(Withdrawal(resp.body["id"], name, amount))
        elif expected == 201:
            self.violate("refused_with_funds", f"withdrawal of {amount} with {avail} available: {resp.body}")
        if op.replay and resp.status == 201:
            again = await self.send("POST", self.server(op.c) + "/v1/accounts/me/withdrawals", data=raw, headers=headers)
            if again.ambiguous:
                self.doubt_withdrawal(name, again)
            elif again.status == 201:
                self.model.hold(user(name), BITCOIN, amount)
                self.add_withdrawal(Withdrawal(again.body["id"], name, amount))
                self.violate("signed_replay_refused", "the same signed withdrawal request queued a second withdrawal")

    def doubt_withdrawal(self, name: str, resp: Resp) -> None:
        told = f"{resp.code}: {resp.body.get('detail', '')}" if isinstance(resp.body, dict) else ""
        self.model.wd_doubts.append((name, told, time.monotonic() + 8, LANE.get()))

    async def settle_withdrawal_doubts(self, wait: bool) -> None:
        if wait and self.model.wd_doubts:
            await asyncio.sleep(max(0.0, max(d[2] for d in self.model.wd_doubts) - time.monotonic()))
        for doubt in [d for d in self.model.wd_doubts if d[2] <= time.monotonic()]:
            self.model.wd_doubts.remove(doubt)
            token = LANE.set(doubt[3])
            try:
                await self.adopt_withdrawals(doubt[0], claims_not_charged(doubt[1]))
            finally:
                LANE.reset(token)

    async def adopt_withdrawals(self, name: str, told_not_charged: bool = False) -> None:
        """After an ambiguous withdrawal: the account's own list says whether it was queued, and its
        pending balance whether money was held anyway (then the 503 was not the truth)."""
        for n in range(40):
            resp, _, _ = await self.signed(name, "GET", "/v1/accounts/me", None, n)
            if resp.status == 200:
                break
            await asyncio.sleep(0.25)
        if resp.status != 200:
            self.violate("liveness", f"GET /v1/accounts/me of {name}: {resp}")
            return
        for wd in resp.body.get("withdrawals", []):
            if wd["id"] not in self.model.withdrawals:
                self.model.hold(user(name), BITCOIN, int(wd["amount"]))
                self.add_withdrawal(Withdrawal(wd["id"], name, int(wd["amount"])))
        orphan = int(resp.body["pending"]) - self.model.pdebit[user(name)]
        if orphan > 0:
            self.model.hold(user(name), BITCOIN, orphan)  # booked, so the run can go on when this is skipped
            self.violate("truthful_503" if told_not_charged else "orphan_hold",
                         f"withdrawal answered {'503 not charged' if told_not_charged else 'nothing'}, yet "
                         f"{orphan} sat of {name} are held with no withdrawal record")

    async def op_wd_cancel(self, op: Op) -> None:
        wd_id = self.pick(self.lane.queued.items, op.a)
        if wd_id is None:
            return
        wd = self.model.withdrawals[wd_id]
        runs = 2 if op.dup else 1
        results = await asyncio.gather(*(asyncio.to_thread(self.cluster.cli, "withdrawals", "cancel", wd.id)
                                         for _ in range(runs)))
        ok = [r for r in results if r.returncode == 0]
        # a duplicate delivery: one cancel applies, the other may be refused as already cancelled
        if not ok or any(r.returncode != 0 and "already" not in r.stderr for r in results):
            self.violate("expected_status", f"withdrawals cancel {wd.id}: {[r.stderr[-500:] for r in results]}")
        self.model.release(user(wd.user), BITCOIN, wd.amount, post=False)
        wd.state = "cancelled"
        self.lane.queued.discard(wd.id)

    # --- crowd QA jobs: escrow funded by the buyer, rewards paid to runners' owners, refunds on close -----
    async def retried(self, username: str, method: str, path: str, body: Any = None, server: int = 0) -> Resp:
        """An idempotent signed request, asked again until it gets a definite answer."""
        for n in range(40):
            resp, _, _ = await self.signed(username, method, path, body, server + n)
            if not resp.ambiguous:
                return resp
            await asyncio.sleep(0.25)
        self.violate("liveness", f"{method} {path}: no definite answer")
        return resp

    async def op_runner_register(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u is None:
            return
        resp, _, _ = await self.signed(u.username, "POST", "/v1/qa/runners", {"labels": {"lane": str(LANE.get())}},
                                       op.c)
        if resp.status == 201:
            self.lane.runners.append((resp.body["id"], u.username))
        elif not resp.ambiguous:
            self.violate("expected_status", f"runner register: {resp.status} {resp.body}")

    async def op_job_post(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u is None:
            return
        reward, wanted = 50 + op.b % 2000, 1 + op.c % 3
        name = u.username
        expected = None if self.model.uncertain(name) else (201 if self.model.available(name) >= reward * wanted
                                                            else 402)
        body = {"title": f"job {op.i}", "reward": reward, "results_wanted": wanted, "expires_in": 30 * 86_400,
                "labels": {"lane": str(LANE.get())}}
        resp, _, _ = await self.signed(name, "POST", "/v1/qa/jobs", body, op.c)
        if resp.ambiguous:  # the buyer's journal says whether an escrow was funded, the job whether it exists
            told = f"{resp.code}: {resp.body.get('detail', '')}" if isinstance(resp.body, dict) else ""
            journal = await self.retried(name, "GET", f"/v1/accounts/{name}?limit=50")
            for entry in journal.body.get("journal", []) if journal.status == 200 else []:
                job_id = entry["id"].removeprefix("crowd:").removesuffix(":fund")
                if entry["id"].endswith(":fund") and job_id not in self.model.jobs:
                    self.model.move(user(name), f"escrow:job:{job_id}", -int(entry["amount"]))
                    job = Job(job_id, LANE.get(), name, reward, wanted)
                    self.model.jobs[job_id] = job
                    shown = await self.retried(name, "GET", f"/v1/qa/jobs/{job_id}")
                    if shown.status == 200:
                        self.add_job(job)
                    else:
                        job.closed = True
                    if claims_not_charged(told):
                        self.violate("truthful_503", f"job post answered {told!r}, yet {-int(entry['amount'])} sat "
                                                     f"funded escrow:job:{job_id}")
                    if shown.status != 200:
                        self.violate("paid_means_delivered", f"escrow:job:{job_id} funded with "
                                                             f"{-int(entry['amount'])} sat, the job is {shown.status}")
            return
        if resp.status == 201:
            if expected == 402:
                self.violate("served_without_funds", f"job of {reward * wanted} sat funded by {name} with "
                                                     f"{self.model.available(name)} available")
            self.model.move(user(name), f"escrow:job:{resp.body['id']}", reward * wanted)
            self.add_job(Job(resp.body["id"], LANE.get(), name, reward, wanted))
        elif expected == 201:
            self.violate("refused_with_funds", f"job post by {name}: {resp.status} {resp.body}")
        elif expected is not None and resp.status != expected:
            self.violate("expected_status", f"job post: {resp.status} {resp.body}")

    def add_job(self, job: Job) -> None:
        self.model.jobs[job.id] = job
        self.model.lanes[job.lane].jobs.add(job.id)

    async def op_job_work(self, op: Op) -> None:
        """A runner claims whatever job the server gives it (its lane's label) and submits a result."""
        runner = self.pick(self.lane.runners, op.a)
        if runner is None:
            return
        runner_id, owner = runner
        claim = await self.retried(owner, "POST", "/v1/qa/jobs/claim", {"runner": runner_id}, op.c)
        if claim.status == 204:
            return
        if claim.status != 200:
            self.violate("expected_status", f"claim: {claim.status} {claim.body}")
            return
        job = self.model.jobs.get(claim.body["job"])
        if job is None or job.lane != LANE.get():
            self.violate("expected_status", f"claimed {claim.body['job']}, not a job of this lane")
            return
        if job.closed or job.buyer == owner:
            self.violate("expected_status", f"claimed {job.id}: closed {job.closed}, buyer {job.buyer}, runner of {owner}")
        body = {"runner": runner_id, "status": "passed" if op.b % 2 else "failed"}
        resp, _, _ = await self.signed(owner, "POST", f"/v1/qa/jobs/{job.id}/result", body, op.c)
        if resp.status == 201:
            job.results[resp.body["id"]] = (owner, "submitted")
        elif not resp.ambiguous:
            self.violate("expected_status", f"submit: {resp.status} {resp.body}")

    async def op_job_decide(self, op: Op) -> None:
        job_id = self.pick(self.lane.jobs.items, op.a)
        job = self.model.jobs.get(job_id) if job_id else None
        if job is None or not job.results:
            return
        rid = self.pick(sorted(job.results), op.b)
        owner, state = job.results[rid]
        verb = "reject" if op.c % 3 == 0 else "accept"
        accepted = sum(1 for _, st in job.results.values() if st == "accepted")
        resp = await self.retried(job.buyer, "POST", f"/v1/qa/jobs/{job.id}/results/{rid}/{verb}", None, op.c)
        pays = verb == "accept" and state == "submitted" and not job.closed and accepted < job.wanted
        if resp.status == 200:
            paid = bool(resp.body.get("payment")) and state == "submitted" and resp.body.get("state") == "accepted"
            if paid != pays:
                self.violate("expected_status", f"{verb} {rid} of {job.id} (was {state}): paid {paid}, "
                                                f"expected {pays}: {resp.body}")
            if paid:
                self.model.move(f"escrow:job:{job.id}", user(owner), job.reward)
            if state == "submitted":
                job.results[rid] = (owner, resp.body.get("state", state))
        elif resp.status == 409 and not pays:
            pass
        else:
            self.violate("expected_status", f"{verb} {rid} of {job.id}: {resp.status} {resp.body}")

    async def op_job_close(self, op: Op) -> None:
        job_id = self.pick(self.lane.jobs.items, op.a)
        if job_id is None:
            return
        job = self.model.jobs[job_id]
        resp = await self.retried(job.buyer, "POST", f"/v1/qa/jobs/{job.id}/close", None, op.c)
        if resp.status != 200:
            self.violate("expected_status", f"close {job.id}: {resp.status} {resp.body}")
            return
        escrow = f"escrow:job:{job.id}"
        if self.model.posted.get(escrow):
            self.model.move(escrow, user(job.buyer), self.model.posted[escrow])
        job.closed = True
        self.lane.jobs.discard(job.id)

    # --- QA runs: paid at 202, run by worker processes, refunded only if they fail -----------------------
    async def op_qa_run(self, op: Op) -> None:
        u = self.pick(self.lane.users, op.a)
        if u is None or sum(1 for r in self.model.runs.values() if r.owner == u.username) >= 10:
            return  # QA_MAX_ACTIVE (20) would refuse it
        docs = 20 + op.b % 180  # 0.2-2 s in the sim's slow worker: some outlive QA_LEASE (1 s)
        url = self.server(op.c) + "/v1/qa/runs"
        body = json.dumps({"suite": "schema", "manifests": b"---\n".join([MANIFEST] * docs).decode()}).encode()
        quote = await self.send("POST", url, data=body, headers={"Content-Type": "application/json"})
        if quote.status != 402:
            if not quote.ambiguous:
                self.violate("expected_status", f"unpaid run: {quote.status} {quote.body}")
            return
        price = int(quote.headers[P.PRICE])
        headers = transfer_headers(u.wallet, amount=price, payee_username=PAYEE[0], payee_address=PAYEE[1],
                                   url=PUBLIC_URL + "/v1/qa/runs")
        headers["Content-Type"] = "application/json"
        tid = "bt_" + hashlib.sha256(headers[P.BITCOIN_TRANSFER].encode()).hexdigest()
        expected = self.expect_paid(u.username, price)
        resp = await self.send("POST", url, data=body, headers=headers)
        self.settle_call(resp, tid, u.username, price, expected, REVENUE)
        if resp.status == 202:
            self.model.runs[resp.body["id"]] = Run(resp.body["id"], u.username, price, tid)

    async def settle_runs(self, wait: bool) -> None:
        """Finished runs: an error is refunded once; a delivered run (passed/failed) never is."""
        assert self.cluster.admin is not None
        deadline = time.monotonic() + (60 if wait else 0)
        for run in list(self.model.runs.values()):
            while True:
                view = await self.retried(run.owner, "GET", f"/v1/qa/runs/{run.id}")
                status = view.body.get("status") if view.status == 200 else None
                if status in ("passed", "failed", "error"):
                    deadline = time.monotonic() + (60 if wait else 0)  # the backlog moves: wait for the next
                    break
                if time.monotonic() >= deadline:
                    if wait:
                        self.violate("run_finishes", f"{run.id} still {status}: no run finished for 60 s")
                    status = None
                    break
                await asyncio.sleep(0.5)
            if status is None:
                continue
            refunded = bool(await self.cluster.admin.exists(KEYS.transfer(f"refund:{run.receipt}")))
            self.run_outcomes[status + (" refunded" if refunded else "")] += 1
            del self.model.runs[run.id]
            if refunded:
                self.model.move(REVENUE, user(run.owner), run.price)
            if refunded and status != "error":
                self.violate("run_refunded_once", f"{run.id} was delivered ({status}) and refunded")
            if status == "error" and not refunded:
                self.violate("run_refunded_once", f"{run.id} failed ({view.body.get('error')}) and was not refunded")

    # --- resolution of ambiguous outcomes ---------------------------------------------------------
    async def resolve(self, amb: Ambiguous) -> None:
        """Read the transfer by its id (the payer's receipt) and book what really happened."""
        state = ""
        for n in range(160):  # a pending hold is given time for the sweeper to run again after a Redis outage
            resp, _, _ = await self.signed(amb.payer, "GET", f"/v1/receipts/{amb.transfer_id}", None, n)
            if resp.status == 404:
                state = "absent"
                break
            if resp.status == 200:
                state = resp.body["state"]
                if state != "pending" or n >= 100:
                    break
            elif n >= 60:
                break
            await asyncio.sleep(0.25)
        if state == "pending":
            self.violate("stale_hold", f"{amb.transfer_id} still pending 25 s after the call (hold timeout "
                                       f"{self.cfg.hold_timeout} s)")
            return
        if not state:
            self.violate("liveness", f"receipt {amb.transfer_id} unreadable")
            return
        self.model.ambiguous.remove(amb)
        told = ("told not charged" if claims_not_charged(amb.told) else "no answer" if not amb.told
                else f"told {amb.told.split(':')[0]}")
        self.resolved[f"{told} -> {state}"] += 1
        if state == "posted":
            credit = resp.body["payee"]
            if claims_not_charged(amb.told):
                self.violate("truthful_503", f"op {amb.op}: told {amb.told!r} but {amb.transfer_id} was captured")
            self.model.move(user(amb.payer), credit, amb.amount)
            self.model.served += 1
            self.refundable.add(amb.transfer_id)
            if amb.transfer_id in self.early_refunds:
                self.refund_seen(amb.transfer_id, *self.early_refunds.pop(amb.transfer_id))
            if amb.token:
                tok = self.model.tokens[amb.token]
                tok.spent += amb.amount
            if amb.kind == "ask":
                await self.adopt_question(amb, credit.removeprefix("escrow:q:"))
        elif state == "voided" and is_escrow(resp.body.get("payee", "")):
            self.model.open(resp.body["payee"])  # a hold that applied opened its escrow; voided, it stays at 0

    def refund_seen(self, tid: str, debit: str, credit: str, amount: int) -> None:
        """The paywall refunded a capture it could not confirm (refund_<id>): book it once its capture is booked."""
        if tid in self.refundable:
            self.refundable.discard(tid)
            self.model.move(debit, credit, amount)
            self.refunds += 1
        else:
            self.early_refunds[tid] = (debit, credit, amount)

    async def adopt_question(self, amb: Ambiguous, qid: str) -> None:
        """An ask whose answer was lost but whose payment was captured: the question must exist."""
        resp = await self.until_definite(lambda n: self._get_q(amb.payer, qid, n))
        if resp.status == 404:  # nothing was done: the capture must be refunded (refund_<id>)
            assert self.cluster.admin is not None
            for _ in range(40):
                if await self.cluster.admin.exists(KEYS.transfer(f"refund_{amb.transfer_id}")):
                    return  # booked when the journal shows it
                await asyncio.sleep(0.25)
        if resp.status != 200:
            self.violate("paid_means_delivered", f"{amb.transfer_id} captured into escrow of {qid}, "
                                                 f"but the question is {resp.status}")
            self.add_question(Question(qid, amb.lane, amb.payer, "expert", [], amb.amount, 1, closed=True))
            return
        q = resp.body
        lst = self.model.lists.get(q["to"])
        recipients = [q["to"]] if q["kind"] != "list" else [m for m in (lst.members if lst else []) if m != amb.payer]
        self.add_question(Question(qid, amb.lane, amb.payer, "list" if q["kind"] == "list" else "expert", recipients,
                                   q["money"]["price_each"], q["money"]["shares"]))

    async def _get_q(self, username: str, qid: str, n: int) -> Resp:
        resp, _, _ = await self.signed(username, "GET", f"/v1/questions/{qid}", None, n)
        return resp


def claims_not_charged(told: str) -> bool:
    """Does a 503 ("code: detail") tell the client it was not charged (payment_outcome_unknown does not)?"""
    return not told.startswith("payment_outcome_unknown") and ("not charged" in told or "nothing was charged" in told)


def new_seed() -> int:
    return secrets.randbelow(2**31)
