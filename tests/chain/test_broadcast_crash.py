"""Issue 11 (fault): `python -m service withdrawals broadcast` SIGKILLed after the network took the batch
and before the ledger booked it out. The fake node stalls its answer (FakeEsplora.stall), which makes
the window deterministic. Whatever the operator runs next, the batch is paid once and booked out once."""
from __future__ import annotations

import asyncio
import json
import signal
import sys

from service.keys import BITCOIN, user_account

from .conftest import ROOT
from .test_withdrawal_holds import DEST, batch, paid_on_chain


async def _captures(rig, ids: list[str]) -> dict[str, int]:
    """How many times the journal captured each withdrawal's hold."""
    entries = [e for _, e in await rig.ledger.redis.xrange(rig.ledger.journal_key)]
    return {i: sum(1 for e in entries if e.get("op") == "capture" and e.get("id") == i) for i in ids}


async def _kill_mid_broadcast(rig, signed: str) -> None:
    """Start the operator's broadcast, SIGKILL it once the network has the transaction (its answer stalls)."""
    rig.esplora.stall = asyncio.Event()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "withdrawals", "broadcast", signed, env=rig.env, cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            while not rig.esplora.broadcasts:
                await asyncio.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        rig.esplora.stall.set()
        rig.esplora.stall = None
    assert proc.returncode == -signal.SIGKILL


async def test_a_broadcast_killed_before_its_captures_settles_once_when_run_again(chain_rig, tmp_path):
    rig = await chain_rig(minimum_withdrawal=1000)
    alice, bob = await rig.user(200_000), await rig.user(100_000)
    await rig.float_coins(500_000)
    ids = []
    for wallet, amount in ((alice, 50_000), (bob, 30_000)):
        status, wd = await rig.signed(wallet, "POST", "/v1/accounts/me/withdrawals", {"amount": amount, "address": DEST})
        assert status == 201, wd
        ids.append(wd["id"])
    rc, built, err = await batch(rig, tmp_path)
    assert rc == 0, err
    signed = tmp_path / "signed.psbt"
    signed.write_text(await rig.sign((tmp_path / "batch.psbt").read_text().strip()))

    await _kill_mid_broadcast(rig, str(signed))
    assert len(rig.esplora.broadcasts) == 1                                  # the network has it...
    assert await _captures(rig, ids) == {i: 0 for i in ids}                  # ...the ledger booked nothing yet
    rc, out, _ = await rig.cli("reconcile", "--chain")                       # the audit says what to do
    assert rc == 1 and "never settled here" in out and "withdrawals broadcast" in out, out
    rc, out, err = await rig.cli("withdrawals", "drop", built["txid"])      # never requeued: it would pay twice
    assert rc == 1 and "network" in err, (out, err)
    assert [(await rig.payouts.get(i))["state"] for i in ids] == ["batched", "batched"]

    for _ in range(2):                                                       # run again (and once more: idempotent)
        rc, out, err = await rig.cli("withdrawals", "broadcast", str(signed))
        assert rc == 0, err
        assert sorted(json.loads(out)["withdrawals"]) == sorted(ids)
    assert len(rig.esplora.broadcasts) == 1                                  # one transaction on the network
    assert await _captures(rig, ids) == {i: 1 for i in ids}                  # each hold captured exactly once
    fees = sum([(await rig.payouts.get(i))["fee"] for i in ids])
    assert await paid_on_chain(rig) + fees == 80_000                         # paid once, to the sat
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 150_000
    assert (await rig.ledger.balance(user_account(bob.username))).posted == 70_000
    assert (await rig.ledger.balance(BITCOIN)).posted == 80_000
    rc, batch_again, err = await batch(rig, tmp_path)                        # nothing left to pay
    assert rc == 1 and "no withdrawal" in err
    rc, out, _ = await rig.cli("reconcile", "--chain")
    assert rc == 0 and json.loads(out)["ok"], out
