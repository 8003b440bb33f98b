"""The chain reconcile (`python -m service reconcile --chain`): the ledger's books at the chain boundary
must match what the chain did. IN side: every coin booked from the chain account (ledger.coin_id, one
per outpoint, by call payments, deposits and stray coins alike) is an output the chain shows paying one
of our invoice or deposit addresses, with that value; every such output with DEPOSIT_CONFIRMATIONS is
booked; the chain account is debited under coin ids only. OUT side: the coins booked out (withdrawal holds captured to
`sys:bitcoin`) equal what our broadcast batches paid to withdrawal addresses plus the fee shares the
withdrawals bore; every booked withdrawal was sent by a batch and every sent one was booked; a built
batch the node knows was broadcast (outside `withdrawals broadcast`?) and must be booked too."""
from __future__ import annotations

from collections import Counter
from typing import Any, AsyncIterator

from embit.networks import NETWORKS
from embit.transaction import Transaction

from ..ledger import BITCOIN, Ledger
from ..payouts import Payouts
from .addresses import AddressBook
from .backends import ChainBackend, ChainError

__all__ = ["audit_in", "audit_out"]


def _embit_network(network: str) -> dict:
    return NETWORKS[{"mainnet": "main", "testnet": "test", "signet": "signet", "regtest": "regtest"}[network]]


async def _journal(ledger: Ledger) -> AsyncIterator[dict[str, str]]:
    """Every journal entry, oldest first, read in pages."""
    start = "-"
    while True:
        entries = await ledger.redis.xrange(ledger.journal_key, start, "+", count=5000)
        for _, e in entries:
            yield e
        if len(entries) < 5000:
            return
        start = "(" + entries[-1][0]


async def _booked_out(ledger: Ledger) -> dict[str, int]:
    """Withdrawal id → amount captured to sys:bitcoin, from the journal (what the ledger says left)."""
    out: dict[str, int] = {}
    async for e in _journal(ledger):
        if e.get("op") == "capture" and e.get("credit") == BITCOIN and e.get("id", "").startswith("wd_"):
            out[e["id"]] = out.get(e["id"], 0) + int(e["amount"])
    return out


async def audit_out(ledger: Ledger, payouts: Payouts, network: str,
                    backend: ChainBackend | None = None) -> dict[str, Any]:
    """Compare the withdrawals booked out with the batches sent (read-only)."""
    mismatches: list[str] = []
    booked = await _booked_out(ledger)
    net = _embit_network(network)
    sent_total = fees_total = 0
    in_batches: set[str] = set()
    for txid in await payouts.sent_batches():
        info = await payouts.batch_info(txid)
        outputs = Counter()
        for o in Transaction.parse(bytes.fromhex(info["raw"])).vout:
            address = o.script_pubkey.address(net)
            if not await payouts.is_ours(address):
                outputs[(address, o.value)] += 1
        paid = sum(a * n for (_, a), n in outputs.items())
        expected, booked_here, fees = Counter(), 0, 0
        for wd_id in await payouts.batch(txid):
            wd = await payouts.get(wd_id)
            in_batches.add(wd_id)
            expected[(wd["address"], wd.get("sent", wd["amount"]))] += 1
            fees += wd.get("fee", 0)
            booked_here += booked.get(wd_id, 0)
            if wd_id not in booked:
                mismatches.append(f"{wd_id}: sent on chain by {txid} but not booked out by the ledger")
        if outputs != expected:
            mismatches.append(f"batch {txid}: pays {dict(outputs)} to others, its withdrawals expect {dict(expected)}")
        if booked_here != paid + fees:
            mismatches.append(f"batch {txid}: booked out {booked_here} sat, sent {paid} sat + {fees} sat fee shares")
        sent_total, fees_total = sent_total + paid, fees_total + fees
        if backend is not None:
            try:
                if await backend.tx_confirmations(txid) is None:
                    mismatches.append(f"batch {txid}: broadcast, but the node does not know it (dropped? rebroadcast it)")
            except ChainError as exc:
                mismatches.append(f"batch {txid}: cannot ask the node ({exc.reason})")
    for wd_id in sorted(booked.keys() - in_batches):
        mismatches.append(f"{wd_id}: booked out ({booked[wd_id]} sat) but no broadcast batch sent it")
    if backend is not None:
        for txid in await payouts.built_batches():
            try:
                known = await backend.tx_confirmations(txid) is not None
            except ChainError:
                continue
            if known:
                mismatches.append(f"batch {txid}: on the network but never settled here "
                                  f"(run `withdrawals broadcast` with its signed PSBT to book it out)")
    booked_total = sum(booked.values())
    if booked_total != sent_total + fees_total:
        mismatches.append(f"coins booked out {booked_total} sat != sent {sent_total} sat + fee shares {fees_total} sat")
    return {"ok": not mismatches, "booked_out": booked_total, "sent_on_chain": sent_total, "fee_shares": fees_total,
            "batches": len(await payouts.sent_batches()), "mismatches": mismatches}


async def _booked_in(ledger: Ledger) -> tuple[dict[tuple[str, int], int], list[str]]:
    """(outpoint -> sat still booked: coin minus reorg reversals) of every coin booked in, and every other
    debit of the chain account, from the journal."""
    coins: dict[tuple[str, int], int] = {}
    strange: list[str] = []
    async for e in _journal(ledger):
        if e.get("op") not in ("post", "capture") or BITCOIN not in (e.get("debit"), e.get("credit")):
            continue
        parts = e["id"].split(":")
        coin = (parts[1], int(parts[2])) if len(parts) >= 3 and parts[2].isdigit() else None
        sign = 1 if e.get("debit") == BITCOIN else -1
        if coin and (parts[0], sign) in (("coin", 1), ("reorg-restore", 1), ("reorg", -1)):
            coins[coin] = coins.get(coin, 0) + sign * int(e["amount"])   # reorg reversals net out
        elif sign == 1:
            strange.append(f"{e['id']}: {e['amount']} sat left the chain account under no coin id")
    return coins, strange


async def audit_in(ledger: Ledger, book: AddressBook, backend: ChainBackend, confirmations: int) -> dict[str, Any]:
    """Coins booked in == coins our invoice and deposit addresses received (read-only). Change outputs
    of our own batches are the OUT side's."""
    booked, mismatches = await _booked_in(ledger)
    received: dict[tuple[str, int], tuple[int, str, int]] = {}
    for purpose in ("invoice", "deposit"):
        for address in await book.addresses(purpose):
            for r in await backend.received(address):
                received[(r.txid, r.vout)] = (r.value, address, r.confirmations)
    booked = {k: v for k, v in booked.items() if v}
    for (txid, vout), amount in sorted(booked.items()):
        seen = received.get((txid, vout))
        if seen is None:
            mismatches.append(f"coin {txid}:{vout}: {amount} sat booked, but no address of ours received it")
        elif seen[0] != amount:
            mismatches.append(f"coin {txid}:{vout}: {amount} sat booked, the chain says {seen[0]} sat")
    unbacked = list(mismatches)  # money in the books the chain never paid us (the batch refuses over it)
    counted = {k: v for k, v in received.items() if k in booked or v[2] >= confirmations}
    for (txid, vout), (value, address, confs) in sorted(counted.items()):
        if (txid, vout) not in booked:
            mismatches.append(f"coin {txid}:{vout}: {value} sat received on {address} ({confs} confirmations), "
                              "booked nowhere")
    return {"ok": not mismatches, "booked": len(booked), "booked_sat": sum(booked.values()),
            "received": len(counted), "received_sat": sum(v for v, _, _ in counted.values()), "mismatches": mismatches,
            "unbacked": unbacked}
