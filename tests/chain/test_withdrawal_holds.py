"""Issue 11, finding 3: the ledger hold decides what a withdrawal batch pays. Driven as the operator
would: withdrawals over HTTP, `python -m service withdrawals batch|cancel|drop|broadcast` in a subprocess."""
from __future__ import annotations

import json

from embit.networks import NETWORKS

from service.ledger import BITCOIN, user_account

DEST = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


async def paid_on_chain(rig) -> int:
    """Satoshis every broadcast transaction paid to addresses that are not ours."""
    from embit.transaction import Transaction

    total = 0
    for raw in rig.esplora.broadcasts:
        for out in Transaction.parse(bytes.fromhex(raw)).vout:
            address = out.script_pubkey.address(NETWORKS["test"])
            if not await rig.book.owns(address):
                total += out.value
    return total


async def batch(rig, tmp_path) -> tuple[int, dict, str]:
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "batch.psbt"))
    return rc, (json.loads(out) if rc == 0 else {}), err


async def broadcast(rig, tmp_path) -> tuple[int, str, str]:
    signed = tmp_path / "signed.psbt"
    signed.write_text(await rig.sign((tmp_path / "batch.psbt").read_text().strip()))
    return await rig.cli("withdrawals", "broadcast", str(signed))


async def test_a_batched_withdrawal_cannot_be_cancelled_and_is_booked_out_once(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(200_000)
    await rig.float_coins(500_000)
    status, wd = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 50_000, "address": DEST})
    assert status == 201
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    assert built["withdrawals"] == [wd["id"]]
    rc, out, err = await rig.cli("withdrawals", "cancel", wd["id"])
    assert rc == 1 and "batch" in err and "drop" in err, (out, err)
    account = user_account(alice.username)
    assert (await rig.ledger.balance(account)).available == 150_000      # still held: the batch will pay it
    rc, out, err = await broadcast(rig, tmp_path)
    assert rc == 0, err
    assert (await rig.payouts.get(wd["id"]))["state"] == "sent"
    assert (await rig.ledger.balance(account)).posted == 150_000
    assert await paid_on_chain(rig) + (await rig.payouts.get(wd["id"]))["fee"] == 50_000
    rc, out, err = await rig.cli("withdrawals", "cancel", wd["id"])
    assert rc == 1 and "already sent" in err                              # never "cancelled"
    assert (await rig.payouts.get(wd["id"]))["state"] == "sent"
    assert (await rig.ledger.reconcile()).ok


async def test_dropping_a_batch_requeues_it_and_its_signed_psbt_is_then_refused(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(200_000)
    await rig.float_coins(500_000)
    _, wd = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 50_000, "address": DEST})
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    rc, out, err = await rig.cli("withdrawals", "drop", built["txid"])
    assert rc == 0 and json.loads(out)["requeued"] == [wd["id"]], err
    rc, out, err = await rig.cli("withdrawals", "cancel", wd["id"])
    assert rc == 0 and json.loads(out)["state"] == "cancelled", err
    assert (await rig.ledger.balance(user_account(alice.username))).available == 200_000
    rc, out, err = await broadcast(rig, tmp_path)
    assert rc == 1 and "dropped" in err
    assert rig.esplora.broadcasts == [] and (await rig.ledger.balance(BITCOIN)).posted == 0
    assert (await rig.ledger.reconcile()).ok


async def test_an_expired_withdrawal_leaves_the_queue_and_is_never_paid(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000, withdrawal_hold_days=0)   # the hold times out at once
    alice = await rig.user(200_000)
    await rig.float_coins(500_000)
    status, wd = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 50_000, "address": DEST})
    assert status == 201
    rc, built, err = await batch(rig, tmp_path)                          # timed out, not yet swept: not paid
    assert rc == 1 and "no withdrawal" in err
    rc, out, err = await rig.cli("sweep")
    assert rc == 0 and json.loads(out)["voided"] == 1, err
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 1 and "no withdrawal" in err
    assert (await rig.payouts.get(wd["id"]))["state"] == "expired"
    assert await rig.payouts.queued() == []
    assert (await rig.ledger.balance(user_account(alice.username))).available == 200_000
    assert rig.esplora.broadcasts == []


async def test_a_hold_that_expires_after_batching_is_neither_voided_nor_double_spent(chain_rig, tmp_path):
    """The batch locks the hold: the sweeper cannot void it while the operator signs."""
    rig = await chain_rig(minimum_withdrawal=1000, withdrawal_hold_days=0)
    alice = await rig.user(60_000)
    await rig.float_coins(500_000)
    rig.payouts.hold_seconds = 3600                                       # queued with a live hold...
    wd = await rig.payouts.withdraw(alice.username, 50_000, DEST)
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    hold = await rig.ledger.transfer(wd["id"])
    await rig.ledger.redis.zadd(rig.ledger.keys.pending, {wd["id"]: 0})  # ...a stale sweep entry
    assert await rig.ledger.sweep_expired() == 0
    assert (await rig.ledger.transfer(wd["id"]))["state"] == hold["state"] == "pending"
    assert (await rig.ledger.balance(user_account(alice.username))).available == 10_000
    rc, out, err = await broadcast(rig, tmp_path)
    assert rc == 0, err
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 10_000
    assert (await rig.ledger.reconcile()).ok


async def test_automatic_payouts_never_queue_more_than_the_balance(chain_rig, tmp_path):
    """Issue 11 3(c): with a short hold, each expiry used to queue another full withdrawal, all paid."""
    rig = await chain_rig(minimum_withdrawal=1000, withdrawal_hold_days=0)
    alice = await rig.user(20_000)
    await rig.float_coins(500_000)
    status, _ = await rig.signed(alice, "PUT", "/v1/accounts/me/payout", {"payout": f"address:{DEST}", "minimum": 1000})
    assert status == 200
    for _ in range(8):                     # what the server's sweeper loop does every few seconds
        await rig.payouts.auto_withdraw()
        await rig.ledger.sweep_expired()
    rig.payouts.hold_seconds = 3600        # the last one is still held when the operator batches
    assert await rig.payouts.auto_withdraw() == 1
    assert await rig.payouts.auto_withdraw() == 0   # one at a time
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    assert len(built["withdrawals"]) == 1
    rc, out, err = await broadcast(rig, tmp_path)
    assert rc == 0, err
    assert await paid_on_chain(rig) + built["fee"] == 20_000
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 0
    assert (await rig.ledger.reconcile()).ok


async def test_settling_a_batch_whose_capture_cannot_apply_fails_loudly(chain_rig, tmp_path):
    """A batch whose hold was voided behind its back (e.g. by hand in Redis) is refused before broadcast."""
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(100_000)
    await rig.float_coins(500_000)
    _, wd = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 50_000, "address": DEST})
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    from service.ledger import Hold
    await rig.ledger.void(Hold(wd["id"], user_account(alice.username), BITCOIN, 50_000), "by hand")
    rc, out, err = await broadcast(rig, tmp_path)
    assert rc == 1 and "not broadcast" in err and wd["id"] in err
    assert rig.esplora.broadcasts == []


async def test_two_operators_batching_at_once_never_put_a_withdrawal_in_two_batches(chain_rig):
    import asyncio

    from service.chain.backends import Esplora
    from service.chain.batch import BatchError, build_batch

    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(100_000)
    await rig.float_coins(500_000)
    await rig.float_coins(500_000)
    wd = await rig.payouts.withdraw(alice.username, 50_000, DEST)
    backend = Esplora(rig.esplora.url, timeout=5, retries=0)
    try:
        results = await asyncio.gather(*[build_batch(rig.payouts, rig.book, backend) for _ in range(4)],
                                       return_exceptions=True)
    finally:
        await backend.close()
    built = [r for r in results if not isinstance(r, Exception)]
    assert len({b.txid for b in built}) == 1 and all(b.withdrawals == [wd["id"]] for b in built)
    assert all(isinstance(r, BatchError) for r in results if isinstance(r, Exception))
    assert (await rig.ledger.transfer(wd["id"]))["locked"] == f"batch:{built[0].txid}"
