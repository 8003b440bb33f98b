"""Issue 11, finding 4: a withdrawal round trip must not cost the operator the batch fee. Our own
addresses are refused as destinations, and each withdrawal bears its share of the fee."""
from __future__ import annotations

import json

from embit.networks import NETWORKS
from embit.transaction import Transaction

from service.ledger import user_account

DEST = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


async def test_own_addresses_are_refused_as_withdrawal_and_payout_destinations(chain_rig):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice = await rig.user(100_000)
    status, dep = await rig.signed(alice, "GET", "/v1/accounts/me/deposit-address")
    assert status == 200
    float_address = await rig.float_coins(10_000)                         # an address of the operator's wallet
    for address in (dep["address"], float_address):
        status, body = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals",
                                        {"amount": 50_000, "address": address})
        assert status == 422 and "address" in body["detail"], body
        status, body = await rig.signed(alice, "PUT", "/v1/accounts/me/payout", {"payout": f"address:{address}"})
        assert status == 422 and "payout" in body["detail"], body
    assert (await rig.ledger.balance(user_account(alice.username))).available == 100_000
    assert await rig.payouts.of(alice.username) == []


async def test_the_withdrawal_bears_the_batch_fee_not_the_operator(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice, bob = await rig.user(100_000), await rig.user(100_000)
    await rig.float_coins(500_000)
    _, a = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 50_000, "address": DEST})
    _, b = await rig.signed(bob, "POST", "/v1/accounts/me/withdrawals", {"amount": 30_000, "address": DEST})
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"), "--fee-rate", "10")
    assert rc == 0, err
    built = json.loads(out)
    signed = tmp_path / "s.psbt"
    signed.write_text(await rig.sign((tmp_path / "b.psbt").read_text().strip()))
    rc, out, err = await rig.cli("withdrawals", "broadcast", str(signed))
    assert rc == 0, err
    [raw] = rig.esplora.broadcasts
    ours = 0
    for o in Transaction.parse(bytes.fromhex(raw)).vout:
        ours += o.value if await rig.book.owns(o.script_pubkey.address(NETWORKS["test"])) else 0
    assert ours == 500_000 - 80_000                                       # the operator's float only lost what was booked out
    a, b = await rig.payouts.get(a["id"]), await rig.payouts.get(b["id"])
    assert a["fee"] + b["fee"] == built["fee"] > 0 and (a["sent"], b["sent"]) == (50_000 - a["fee"], 30_000 - b["fee"])
    assert (await rig.ledger.reconcile()).ok
