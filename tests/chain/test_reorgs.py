"""Issue 11, finding 5: a deposit credited at DEPOSIT_CONFIRMATIONS and then reorganised away is
reversed in the open, the account's withdrawals go on hold, and the operator is alerted."""
from __future__ import annotations

import json

from service.chain.backends import Esplora
from service.ledger import BITCOIN, user_account
from service.metrics import REGISTRY

DEST = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


async def deposit(rig, wallet, value: int) -> tuple[str, str]:
    status, body = await rig.signed(wallet, "GET", "/v1/accounts/me/deposit-address")
    assert status == 200
    return body["address"], rig.esplora.deposit(body["address"], value, height=rig.esplora.tip - 2)  # 3 confirmations


def reorg_away(rig, address: str) -> None:
    rig.esplora.txs[address].clear()
    rig.esplora.utxos[address].clear()
    rig.esplora.tip += 1


async def chainwatch(rig) -> dict:
    rc, out, err = await rig.cli("chainwatch", "--once")
    assert rc == 0, err
    return json.loads(out), err


async def test_a_reorged_deposit_is_reversed_and_the_accounts_withdrawals_held(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000, deposit_confirmations=3, reorg_safe_depth=6)
    alice = await rig.user(0)
    await rig.float_coins(500_000)
    address, txid = await deposit(rig, alice, 25_000)
    got, _ = await chainwatch(rig)
    assert got["credited"] == 1
    account = user_account(alice.username)
    status, wd = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 15_000, "address": DEST})
    assert status == 201                                             # 15,000 held, 10,000 available
    reorg_away(rig, address)
    got, err = await chainwatch(rig)
    assert (await rig.ledger.balance(account)).available == 0
    reversal = await rig.ledger.transfer(f"reorg:{txid}:1")           # the visible compensating entry
    assert (reversal["debit"], reversal["credit"], int(reversal["amount"])) == (account, BITCOIN, 10_000)
    assert got["reorg"]["reversed"] == 1 and "deposit_reorged" in err and txid in err
    from service.chain.reorgs import reversed_deposits
    [open_debt] = await reversed_deposits(rig.ledger.redis, rig.env["REDIS_PREFIX"])
    assert (open_debt["outpoint"], open_debt["debt"]) == (f"{txid}:1", 15_000)
    status, body = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 1_000, "address": DEST})
    assert (status, body["error"]) == (409, "withdrawals_on_hold") and "reorg" in body["detail"]
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"))
    assert rc == 1 and "no withdrawal" in err                          # the queued one stays out of batches
    # the operator cancels the queued withdrawal; the next pass takes the rest back
    rc, out, err = await rig.cli("withdrawals", "cancel", wd["id"])
    assert rc == 0, err
    got, _ = await chainwatch(rig)
    assert got["reorg"]["collected"] == 15_000
    assert (await rig.ledger.balance(account)).posted == 0
    assert (await rig.ledger.balance(BITCOIN)).posted == 0           # the chain boundary is square again
    assert await reversed_deposits(rig.ledger.redis, rig.env["REDIS_PREFIX"]) != []   # until it confirms again
    rc, _, err = await rig.cli("withdrawals", "release", alice.username)
    assert rc == 0, err
    assert (await rig.ledger.reconcile()).ok


async def test_a_reversed_deposit_that_confirms_again_is_given_back(chain_rig):
    from service.chain.reorgs import reversed_deposits
    rig = await chain_rig(deposit_confirmations=3, reorg_safe_depth=6)
    alice = await rig.user(0)
    address, txid = await deposit(rig, alice, 25_000)
    await chainwatch(rig)
    saved = list(rig.esplora.txs[address])
    reorg_away(rig, address)
    got, _ = await chainwatch(rig)
    assert got["reorg"]["reversed"] == 1
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 0
    saved[0]["status"] = {"confirmed": True, "block_height": rig.esplora.tip - 2}   # mined again, 3 deep
    rig.esplora.txs[address] = saved
    got, _ = await chainwatch(rig)
    assert got["reorg"]["restored"] == 1
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 25_000
    assert await reversed_deposits(rig.ledger.redis, rig.env["REDIS_PREFIX"]) == []
    assert (await rig.ledger.reconcile()).ok


async def test_deposits_are_rechecked_only_until_the_safe_depth_and_an_outage_reverses_nothing(chain_rig):
    from service.chain.reorgs import recheck_deposits
    rig = await chain_rig(deposit_confirmations=3, reorg_safe_depth=6)
    alice = await rig.user(0)
    address, _ = await deposit(rig, alice, 25_000)
    got, _ = await chainwatch(rig)
    assert got["reorg"]["watching"] == 1
    backend = Esplora(rig.esplora.url, timeout=5, retries=0)
    try:
        rig.esplora.tip += 10                                             # 13 deep: final
        stats = await recheck_deposits(rig.ledger, backend, rig.payouts, confirmations=3, safe_depth=6)
        assert (stats["final"], stats["watching"]) == (1, 0)
        reorg_away(rig, address)                                          # deeper than the safe depth: not re-checked
        stats = await recheck_deposits(rig.ledger, backend, rig.payouts, confirmations=3, safe_depth=6)
        assert stats["reversed"] == 0
    finally:
        await backend.close()
    bob = await rig.user(0)
    address, _ = await deposit(rig, bob, 25_000)
    await chainwatch(rig)
    before = REGISTRY.get_sample_value("microtasks_deposits_reorged_total") or 0
    down = Esplora("http://127.0.0.1:9", timeout=1, retries=0)            # the node is unreachable
    try:
        stats = await recheck_deposits(rig.ledger, down, rig.payouts, confirmations=3, safe_depth=6)
    finally:
        await down.close()
    assert stats["reversed"] == 0 and (await rig.ledger.balance(user_account(bob.username))).posted == 25_000
    reorg_away(rig, address)
    backend = Esplora(rig.esplora.url, timeout=5, retries=0)
    try:
        stats = await recheck_deposits(rig.ledger, backend, rig.payouts, confirmations=3, safe_depth=6)
    finally:
        await backend.close()
    assert stats["reversed"] == 1
    assert REGISTRY.get_sample_value("microtasks_deposits_reorged_total") == before + 1


async def test_a_deposit_archived_while_chainwatch_was_down_is_still_watched(chain_rig, tmp_path):
    """The journal archiver may move a coin credit out of Redis before chainwatch's next pass: the reorg
    watch reads the archive first, so that deposit is still reversed if the chain drops it."""
    from service.journal_archive import JournalArchive, archive_once
    rig = await chain_rig(minimum_withdrawal=1000, deposit_confirmations=3, reorg_safe_depth=6)
    alice = await rig.user(0)
    address, txid = await deposit(rig, alice, 25_000)
    got, _ = await chainwatch(rig)                       # credits the first deposit, the cursor moves past it
    assert got["credited"] == 1
    address2, txid2 = await deposit(rig, alice, 7_000)
    account = user_account(alice.username)
    # the credit a pass wrote just before chainwatch died, then archived out of Redis while it was down
    await rig.ledger.post(f"coin:{txid2}:1", BITCOIN, account, 7_000)
    rig.ledger.archive_dir = tmp_path / "var" / "journal"
    assert await archive_once(rig.ledger, JournalArchive(rig.ledger.archive_dir), older_than=0) > 0
    assert await rig.ledger.redis.xlen(rig.ledger.journal_key) == 0
    reorg_away(rig, address2)
    got, err = await chainwatch(rig)
    assert got["reorg"]["new"] == 1 and got["reorg"]["reversed"] == 1, (got, err)
    assert (await rig.ledger.balance(account)).posted == 25_000
