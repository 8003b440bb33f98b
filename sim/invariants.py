"""Checkpoints: settle what can be settled, then check the invariants against the real ledger.

- balances: every account the model knows (users, escrows, charities, system) equals the model to the
  satoshi: posted, pending debits, pending credits (accounts awaiting a resolution are skipped until then);
- no_stray_accounts: the ledger has no account the model does not (a refused payment changes nothing);
- sum_zero: posted and pending balances over all accounts sum to zero;
- stale_hold: no hold is pending past its timeout (+ the sweeper's period and some slack);
- reconcile: `python -m service reconcile` exits 0 with ok and a zero sum (every `reconcile_every` s and at the end).
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING

from service.keys import is_escrow, is_user_account
from service.scripts import lua

from .cluster import KEYS
from .model import ANY_ESCROW, user

if TYPE_CHECKING:
    from .runner import Sim

STALE_SLACK_MS = 15000  # the sweeper runs every few seconds, and not while Redis restarts


async def settle_closing(sim: "Sim", wait: bool) -> None:
    """Questions moved past their deadline: once the sweeper closed one, its remainder went to the asker."""
    assert sim.cluster.admin is not None
    deadline = time.monotonic() + (15 if wait else 0)
    for q in [sim.model.questions[qid] for qid in sorted(sim.model.closing)]:
        while True:
            if await sim.cluster.admin.hget(KEYS.of("xp", "q", q.id), "closed"):
                escrow = f"escrow:q:{q.id}"
                sim.model.open(escrow)
                if sim.model.posted[escrow]:
                    sim.model.move(escrow, user(q.asker), sim.model.posted[escrow])
                sim.close_question(q)
                break
            if time.monotonic() >= deadline:
                if wait:
                    sim.violate("expired_question_refunded", f"{q.id} past its deadline was never closed")
                break
            await asyncio.sleep(0.2)


async def checkpoint(sim: "Sim", final: bool) -> None:
    m = sim.model
    if final and m.ambiguous:
        await asyncio.sleep(max(0.0, max(a.after for a in m.ambiguous) - time.monotonic()))
    for amb in m.ambiguous_due():
        await sim.resolve(amb)
    await settle_closing(sim, wait=final)
    await sim.settle_runs(wait=final)
    await sim.settle_withdrawal_doubts(wait=final)
    if final:
        await asyncio.sleep(2)  # refunds the paywall finishes in the background
        await ledger_changed(sim)
        if sim.early_refunds:
            sim.violate("refund_of_served", f"refunds of transfers that were served or never charged: "
                                            f"{sorted(sim.early_refunds)[:3]}")
    sim.checkpoints += 1
    if time.monotonic() - sim.last_progress > 30 and not final:
        sim.last_progress = time.monotonic()
        elapsed = sim.last_progress - sim.started
        print(f"  ... {sim.ops_done} ops, {sim.ops_done / elapsed:.0f} ops/s, {sim.model.served} served, "
              f"faults {dict(sorted(sim.fault_counts.items()))}", file=sys.stderr, flush=True)
    full = final or time.monotonic() - sim.last_reconcile > sim.reconcile_interval
    await compare(sim, full)
    if full:  # the journal grows with the run: reconcile at most 1/10 of the time
        started = time.monotonic()
        rc, report, out = await asyncio.to_thread(sim.cluster.reconcile)
        sim.last_reconcile = time.monotonic()
        sim.reconcile_interval = max(sim.cfg.reconcile_every, 10 * (sim.last_reconcile - started))
        sim.reconciles += 1
        if rc != 0 or not report or not report.get("ok") or report.get("sum_of_balances") != 0:
            sim.violate("reconcile", out[-3000:])


async def ledger_changed(sim: "Sim") -> set[str]:
    """Accounts the ledger's journal shows changed since the last comparison (the model may not know them)."""
    admin = sim.cluster.admin
    assert admin is not None
    out: set[str] = set()
    while True:
        entries = await admin.xrange(KEYS.journal, f"({sim.journal_pos}" if sim.journal_pos else "-", "+",
                                     count=5000)
        for entry_id, e in entries:
            out.update(v for k, v in e.items() if k in ("debit", "credit", "account"))
            sim.journal_pos = entry_id
            if e.get("op") == "post" and e.get("id", "").startswith("refund_"):
                sim.refund_seen(e["id"].removeprefix("refund_"), e["debit"], e["credit"], int(e["amount"]))
        if len(entries) < 5000:
            return out


async def compare(sim: "Sim", full: bool) -> None:
    """Ledger vs model. Between reconciles only the accounts touched since the last comparison are read
    (a long run has many); a full comparison also sums every account."""
    m = sim.model
    admin = sim.cluster.admin
    assert admin is not None
    dirty = m.dirty()
    any_escrow = ANY_ESCROW in dirty
    count = await admin.scard(KEYS.accounts)
    changed = await ledger_changed(sim)
    if full or count != len(m.posted):
        # One atomic read of every account: servers and workers move money in the background (sweeper
        # voids, expiry refunds, QA captures), so a pipelined read can see one leg of a transfer and not
        # the other, a sum that is not zero although the books are (seed 11, op 76,167).
        snap = await admin.eval(lua("ledger_snapshot"), 2, KEYS.accounts, KEYS.journal, KEYS.account(""))
        actual = {snap[i]: tuple(int(v) for v in snap[i + 1:i + 5]) for i in range(1, len(snap), 5)}
        names = sorted(actual)
    else:
        names = sorted(n for n in m.touched | changed if n not in dirty)
        async with admin.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(KEYS.account(name), "dp", "cp", "dpend", "cpend")
            rows = await pipe.execute()
        actual = {name: tuple(int(v or 0) for v in row) for name, row in zip(names, rows) if row[0] is not None}
    if full:
        sum_posted = sum(cp - dp for dp, cp, _, _ in actual.values())
        sum_pending = sum(cpend - dpend for _, _, dpend, cpend in actual.values())
        if sum_posted or sum_pending:
            sim.violate("sum_zero", f"posted sum {sum_posted}, pending sum {sum_pending}")
    if count != len(m.posted):
        stray = [n for n in actual if n not in m.posted and not (any_escrow and is_escrow(n))]
        if stray:
            sim.violate("no_stray_accounts", f"{len(stray)} accounts the model never opened, e.g. {stray[:3]}")
    wrong = []
    if full:
        sim.created = sim.lost = 0
    for name in (m.posted if full else names):
        if name in dirty or (any_escrow and is_escrow(name)) or name not in m.posted:
            continue
        dp, cp, dpend, cpend = actual.get(name, (0, 0, 0, 0))
        got = (cp - dp, dpend, cpend)
        want = (m.posted[name], m.pdebit[name], m.pcredit[name])
        if got != want:
            wrong.append(f"{name}: ledger posted/pending-debits/pending-credits {got}, model {want}")
            if is_user_account(name) and full:
                sim.created += max(0, got[0] - want[0])
                sim.lost += max(0, want[0] - got[0])
    m.touched &= dirty
    if wrong and not full:  # a refund may have landed between the journal and the accounts: look again
        await ledger_changed(sim)
        await compare(sim, full=True)
        return
    if wrong:
        sim.violate("balances", wrong[:10])
    now_ms = int(time.time() * 1000)
    stale = await admin.zrangebyscore(KEYS.pending, 0, now_ms - STALE_SLACK_MS)
    if stale:
        sim.violate("stale_hold", f"{len(stale)} holds pending past timeout + {STALE_SLACK_MS} ms: {stale[:3]}")
