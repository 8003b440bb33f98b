"""Issue 11: `reconcile --chain`, OUT side: coins booked out == coins our batches sent (+ fee shares)."""
from __future__ import annotations

import json

from embit.psbt import PSBT

DEST = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


async def reconcile(rig) -> tuple[int, dict]:
    rc, out, err = await rig.cli("reconcile", "--chain")
    assert out, err
    return rc, json.loads(out)


async def build(rig, tmp_path) -> dict:
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"))
    assert rc == 0, err
    signed = tmp_path / "s.psbt"
    signed.write_text(await rig.sign((tmp_path / "b.psbt").read_text().strip()))
    return {**json.loads(out), "signed": str(signed)}


async def test_batches_broadcast_by_the_service_reconcile(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice, bob = await rig.user(100_000), await rig.user(100_000)
    await rig.float_coins(500_000)
    await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 40_000, "address": DEST})
    await rig.signed(bob, "POST", "/v1/accounts/me/withdrawals", {"amount": 25_000, "address": DEST})
    built = await build(rig, tmp_path)
    rc, out, err = await rig.cli("withdrawals", "broadcast", built["signed"])
    assert rc == 0, err
    rig.esplora.txs.setdefault(DEST, []).append({"txid": built["txid"], "status": {"confirmed": False}, "vout": []})
    rc, report = await reconcile(rig)
    assert rc == 0 and report["ok"], report
    out_side = report["chain"]["out"]
    assert out_side["booked_out"] == 65_000 == out_side["sent_on_chain"] + out_side["fee_shares"]


async def test_coins_booked_out_without_a_batch_fail_the_chain_reconcile(chain_rig):
    """What the audits saw: a withdrawal marked sent whose coins never matched a batch (or the reverse)."""
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(100_000)
    wd = await rig.payouts.withdraw(alice.username, 40_000, DEST)
    await rig.payouts.settle(wd["id"], "ab" * 32)                         # booked out, nothing on chain
    rc, _, _ = await rig.cli("reconcile")
    assert rc == 0                                                        # the ledger alone cannot see it
    rc, report = await reconcile(rig)
    assert rc == 1 and not report["ok"]
    assert any(wd["id"] in m and "no broadcast batch" in m for m in report["chain"]["out"]["mismatches"])


async def test_a_batch_broadcast_outside_the_service_is_flagged_until_settled(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(100_000)
    await rig.float_coins(500_000)
    await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 40_000, "address": DEST})
    built = await build(rig, tmp_path)
    # the operator's wallet broadcasts it itself: the network has it, the ledger has not booked it out
    from embit.finalizer import finalize_psbt
    raw = finalize_psbt(PSBT.from_string(open(built["signed"]).read().strip())).serialize().hex()
    async with rig.http.post(f"{rig.esplora.url}/tx", data=raw) as r:
        assert r.status == 200
    rig.esplora.txs.setdefault(DEST, []).append({"txid": built["txid"], "status": {"confirmed": False}, "vout": []})
    rc, report = await reconcile(rig)
    assert rc == 1 and any("never settled" in m for m in report["chain"]["out"]["mismatches"]), report
    rc, out, err = await rig.cli("withdrawals", "broadcast", built["signed"])  # "already known": settles it
    assert rc == 0, err
    rc, report = await reconcile(rig)
    assert rc == 0 and report["chain"]["out"]["booked_out"] == 40_000, report
