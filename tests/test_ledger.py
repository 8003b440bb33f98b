"""The ledger's promises against a real Redis: double entry, idempotent ids, holds, expiry, reconcile."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from service.ledger import GRANTS, REVENUE, AccountKind, Hold, Outcome, user_account


async def open_users(ledger, *names: str) -> None:
    for name in names:
        assert await ledger.open_account(user_account(name), AccountKind.USER, pubkey="02" + "11" * 32) is Outcome.APPLIED


async def test_open_account_is_unique(ledger):
    await open_users(ledger, "alice")
    assert await ledger.open_account(user_account("alice"), AccountKind.USER) is Outcome.EXISTS
    assert (await ledger.balance(user_account("alice"))).posted == 0


async def test_post_is_idempotent_by_id(ledger):
    await open_users(ledger, "alice")
    first = await ledger.post("c1", GRANTS, user_account("alice"), 500, reason="grant")
    again = await ledger.post("c1", GRANTS, user_account("alice"), 500, reason="grant")
    assert first.outcome is Outcome.APPLIED and again.outcome is Outcome.REPLAYED
    assert again.transfer["amount"] == "500" and again.transfer["state"] == "posted"
    assert (await ledger.balance(user_account("alice"))).posted == 500
    assert (await ledger.balance(GRANTS)).posted == -500


async def test_user_cannot_go_below_zero_but_chain_can(ledger):
    await open_users(ledger, "alice", "bob")
    assert (await ledger.post("x", user_account("alice"), user_account("bob"), 1)).outcome is Outcome.INSUFFICIENT
    assert (await ledger.post("g", GRANTS, user_account("alice"), 10)).ok
    assert (await ledger.post("y", user_account("alice"), user_account("bob"), 10)).ok
    assert (await ledger.balance(user_account("alice"))).posted == 0


async def test_hold_reserves_and_capture_or_void_resolves_once(ledger):
    await open_users(ledger, "alice")
    await ledger.post("g", GRANTS, user_account("alice"), 100)
    hold = Hold("h1", user_account("alice"), REVENUE, 60)
    assert (await ledger.hold(hold.id, hold.debit, hold.credit, 60, timeout=30)).ok
    alice = await ledger.balance(user_account("alice"))
    assert (alice.posted, alice.available) == (100, 40)
    assert (await ledger.hold("h2", user_account("alice"), REVENUE, 50, timeout=30)).outcome is Outcome.INSUFFICIENT
    assert (await ledger.capture(hold)).ok
    assert (await ledger.capture(hold)).outcome is Outcome.NOT_PENDING
    assert (await ledger.void(hold)).outcome is Outcome.NOT_PENDING
    alice = await ledger.balance(user_account("alice"))
    assert (alice.posted, alice.pending_debits) == (40, 0)
    assert (await ledger.balance(REVENUE)).posted == 60


async def test_hold_checks_the_registered_pubkey(ledger):
    await open_users(ledger, "alice")
    await ledger.post("g", GRANTS, user_account("alice"), 100)
    res = await ledger.hold("h", user_account("alice"), REVENUE, 10, timeout=30, require_pubkey="03" + "22" * 32)
    assert res.outcome is Outcome.PUBKEY_MISMATCH
    assert (await ledger.balance(user_account("alice"))).available == 100


async def test_expired_hold_is_voided_by_the_sweeper_and_cannot_be_captured(ledger):
    await open_users(ledger, "alice")
    await ledger.post("g", GRANTS, user_account("alice"), 100)
    hold = Hold("h", user_account("alice"), REVENUE, 70)
    await ledger.hold(hold.id, hold.debit, hold.credit, hold.amount, timeout=1)
    await asyncio.sleep(1.1)
    assert await ledger.sweep_expired() == 1
    assert (await ledger.capture(hold)).outcome is Outcome.NOT_PENDING
    alice = await ledger.balance(user_account("alice"))
    assert (alice.posted, alice.pending_debits) == (100, 0)
    assert (await ledger.reconcile()).ok


async def test_capture_after_timeout_voids_instead(ledger):
    await open_users(ledger, "alice")
    await ledger.post("g", GRANTS, user_account("alice"), 100)
    hold = Hold("h", user_account("alice"), REVENUE, 70)
    await ledger.hold(hold.id, hold.debit, hold.credit, hold.amount, timeout=1)
    await asyncio.sleep(1.1)
    assert (await ledger.capture(hold)).outcome is Outcome.EXPIRED
    assert (await ledger.balance(user_account("alice"))).available == 100


async def test_amount_must_be_a_positive_int(ledger):
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError):
            await ledger.post("bad", GRANTS, REVENUE, bad)  # type: ignore[arg-type]


async def test_reconcile_detects_a_tampered_balance(ledger):
    await open_users(ledger, "alice")
    await ledger.post("g", GRANTS, user_account("alice"), 100)
    assert (await ledger.reconcile()).ok
    await ledger.redis.hincrby(ledger.keys.account(user_account("alice")), "cp", 1)
    report = await ledger.reconcile()
    assert not report.ok and report.sum_posted == 1
    assert any(user_account("alice") in m for m in report.mismatches)


ops = st.lists(st.tuples(
    st.sampled_from(["grant", "post", "hold", "capture", "void"]),
    st.integers(0, 3), st.integers(0, 3), st.integers(1, 400), st.integers(0, 30),
), max_size=40)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
async def test_random_operations_keep_the_books_balanced(ledger, ops):
    names = [user_account(f"p{i}") for i in range(4)]
    tag = uuid.uuid4().hex
    for n in names:
        await ledger.open_account(n, AccountKind.USER)
    holds: list[Hold] = []
    for i, (op, a, b, amount, pick) in enumerate(ops):
        tid = f"{tag}-{i}"
        if op == "grant":
            await ledger.post(tid, GRANTS, names[a], amount)
        elif op == "post":
            await ledger.post(tid, names[a], names[b], amount) if a != b else None
        elif op == "hold" and a != b:
            if (await ledger.hold(tid, names[a], names[b], amount, timeout=60)).ok:
                holds.append(Hold(tid, names[a], names[b], amount))
        elif op in ("capture", "void") and holds:
            hold = holds[pick % len(holds)]
            await (ledger.capture(hold) if op == "capture" else ledger.void(hold))
        for n in names:
            bal = await ledger.balance(n)
            assert bal.available >= 0, f"{n} overdrawn: {bal}"
    report = await ledger.reconcile()
    assert report.ok, report.mismatches


async def test_balance_checks_are_exact_near_2_53(ledger):
    """Finding 12: past 2^53 doubles round (step 512 at 2^61): cp 2^61+300 reads as 2^61+512 and dpend
    2^61+299 as 2^61+256, so a 1-sat available balance looked like 256 and paid a 120-sat call. Counters
    now stop at 2^53 - 1 (counter_limit), and the 120-sat hold is refused whatever got through."""
    from service.ledger import BITCOIN

    await open_users(ledger, "alice")
    alice = user_account("alice")
    credit = await ledger.post("g1", GRANTS, alice, 2**61 + 300)
    assert credit.outcome is Outcome.LIMIT
    held = [await ledger.hold("w1", alice, BITCOIN, 2**61, timeout=60),
            await ledger.hold("w2", alice, BITCOIN, 299, timeout=60)]
    call = await ledger.hold("call", alice, REVENUE, 120, timeout=60)
    assert call.outcome in (Outcome.INSUFFICIENT, Outcome.LIMIT), (held, call)
    assert (await ledger.balance(alice)).available >= 0
    assert (await ledger.reconcile()).ok


async def test_counters_stop_exactly_at_2_53_minus_1_and_stay_exact(ledger):
    from service.ledger import BITCOIN, MAX_COUNTER

    await open_users(ledger, "bob")
    bob = user_account("bob")
    assert (await ledger.post("g1", GRANTS, bob, MAX_COUNTER - 1)).ok
    assert (await ledger.post("g2", GRANTS, bob, 2)).outcome is Outcome.LIMIT   # would be 2^53: refused
    assert (await ledger.post("g3", GRANTS, bob, 1)).ok                          # exactly 2^53 - 1
    assert (await ledger.balance(bob)).posted == MAX_COUNTER
    assert (await ledger.hold("w", bob, BITCOIN, MAX_COUNTER - 1, timeout=60)).ok
    assert (await ledger.balance(bob)).available == 1
    assert (await ledger.hold("c1", bob, REVENUE, 2, timeout=60)).outcome is Outcome.INSUFFICIENT
    assert (await ledger.hold("c2", bob, REVENUE, 1, timeout=60)).ok
    assert (await ledger.balance(bob)).available == 0
    assert (await ledger.post("x", bob, REVENUE, MAX_COUNTER + 1)).outcome is Outcome.LIMIT
    assert (await ledger.reconcile()).ok


async def test_reconcile_flags_a_user_account_below_zero(ledger):
    """An overdrawn user account is reported even when the journal agrees with it (the old float bug)."""
    await open_users(ledger, "carol")
    carol = user_account("carol")
    assert (await ledger.post("g", GRANTS, carol, 1)).ok
    # what the old float comparison let through: a 120-sat debit from a 1-sat balance, journaled
    await ledger.redis.hincrby(ledger.keys.account(carol), "dp", 120)
    await ledger.redis.hincrby(ledger.keys.account(REVENUE), "cp", 120)
    await ledger.redis.xadd(ledger.journal_key, {"op": "post", "id": "bad", "debit": carol, "credit": REVENUE,
                                                 "amount": 120, "ts": 0})
    report = await ledger.reconcile()
    assert not report.ok
    assert report.mismatches == [f"{carol}: available balance -119 is below zero"]


async def test_post_all_stops_at_2_53_minus_1_and_changes_nothing(ledger):
    """The all-or-nothing multi-transfer script (coins of one on-chain payment) keeps the same exact bound."""
    from service.ledger import MAX_COUNTER

    await open_users(ledger, "dora")
    dora = user_account("dora")
    assert (await ledger.post("g", GRANTS, dora, MAX_COUNTER - 10)).ok
    before = (await ledger.balance(dora), await ledger.redis.xlen(ledger.journal_key))
    result = await ledger.post_all([("p1", GRANTS, dora, 5, {}), ("p2", GRANTS, dora, 6, {})])
    assert result.outcome is Outcome.LIMIT
    assert (await ledger.balance(dora), await ledger.redis.xlen(ledger.journal_key)) == before
    assert (await ledger.post_all([("p3", GRANTS, dora, 4, {}), ("p4", GRANTS, dora, 6, {})])).ok
    assert (await ledger.balance(dora)).posted == MAX_COUNTER
    assert (await ledger.reconcile()).ok
