"""Withdrawal batches: one unsigned PSBT paying every queued withdrawal from the operator's UTXOs, signed
offline by the operator's wallet, then broadcast; the holds are locked while the batch waits for its
signature and posted only once the network took it.
PSBTs are built with embit (BIP174; bitcoinlib has no PSBT support)."""
from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from embit.psbt import PSBT
from embit.script import address_to_scriptpubkey
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from ..bitcoin import DUST_LIMIT
from ..errors import ApiError
from ..payouts import Payouts
from .addresses import AddressBook
from .backends import ChainBackend, ChainError, already_known

__all__ = ["build_batch", "broadcast_batch", "drop_batch", "refuse_unbacked", "BatchError"]

_VBYTES_OVERHEAD, _VBYTES_IN, _VBYTES_OUT = 11, 68, 31  # p2wpkh


class BatchError(Exception):
    pass


@dataclass
class Batch:
    psbt: str            # base64
    txid: str
    withdrawals: list[str]
    fee: int
    change: int


def _vbytes(inputs: int, outputs: int) -> int:
    return _VBYTES_OVERHEAD + _VBYTES_IN * inputs + _VBYTES_OUT * outputs


async def build_batch(payouts: Payouts, book: AddressBook, backend: ChainBackend, fee_rate: int = 5, *,
                      confirmations: int = 3, force: bool = False) -> Batch:
    """One PSBT paying every withdrawal whose hold is pending; each withdrawal bears an equal share of the
    fee (it receives amount − share), so a round trip costs its maker, not the operator. The holds are
    locked for this batch: they can no longer expire or be cancelled until it is dropped or broadcast.
    Refused while the chain audit's IN side finds coins booked that our addresses never received (a
    double-spent payment not yet reversed): they would be paid out of other users' coins (`force`: anyway)."""
    queued = await payouts.batchable()  # one scan of the queue; a hold that changes meanwhile fails its lock
    if not force and queued:  # (nothing queued: said below)
        await refuse_unbacked(payouts, book, backend, confirmations)
    utxos = [u for a in await book.all_addresses() for u in await backend.utxos(a) if u.confirmations >= 1]
    utxos.sort(key=lambda u: -u.value)
    change_address = ""
    for attempt in range(3):  # holds that expire or get cancelled meanwhile: plan again without them
        if attempt:
            queued = await payouts.batchable()
        if not queued:
            raise BatchError("no withdrawal is queued with a pending hold")
        need = sum(w["amount"] for w in queued)  # the outputs plus the fee, which the withdrawals bear
        chosen, total = [], 0
        for u in utxos:
            chosen.append(u)
            total += u.value
            if total >= need:
                break
        else:
            raise BatchError(f"confirmed UTXOs hold {total} sat; the queue needs {need} sat")
        share = -(-fee_rate * _vbytes(len(chosen), len(queued) + 1) // len(queued))
        small = [w["id"] for w in queued if w["amount"] - share < DUST_LIMIT]
        if small:
            raise BatchError(f"at {fee_rate} sat/vB the fee share ({share} sat) leaves dust for {', '.join(small)}")
        outputs = [TransactionOutput(w["amount"] - share, address_to_scriptpubkey(w["address"])) for w in queued]
        change = total - need
        fee = share * len(queued)
        if change >= DUST_LIMIT:
            change_address = change_address or await book._new("change")
            outputs.append(TransactionOutput(change, address_to_scriptpubkey(change_address)))
        else:
            fee, change = fee + change, 0
        tx = Transaction(vin=[TransactionInput(bytes.fromhex(u.txid), u.vout) for u in chosen], vout=outputs)
        psbt = PSBT(tx)
        for i, u in enumerate(chosen):
            psbt.inputs[i].witness_utxo = TransactionOutput(u.value, address_to_scriptpubkey(u.address))
        txid = tx.txid().hex()
        ids = [w["id"] for w in queued]
        failed = await payouts.lock_for_batch(ids, txid)
        if failed:
            await payouts.unlock([i for i in ids if i not in failed], txid)
            continue
        await payouts.mark_batched({i: share for i in ids}, txid, fee)
        return Batch(psbt.to_string(), txid, ids, fee, change)
    raise BatchError("withdrawals kept changing while the batch was built; run it again")


async def refuse_unbacked(payouts: Payouts, book: AddressBook, backend: ChainBackend, confirmations: int) -> None:
    """BatchError when the ledger holds money the chain never paid us (audit_in): an operator safety net."""
    from .audit import audit_in  # noqa: PLC0415

    try:
        unbacked = (await audit_in(payouts.ledger, book, backend, confirmations))["unbacked"]
    except ChainError as exc:
        raise BatchError(f"cannot check the coins booked in against the chain ({exc.reason}); no batch built") from None
    if unbacked:
        raise BatchError(f"no batch built: {len(unbacked)} coin(s) are booked that the chain never paid us, and a "
                         "batch would pay them out of other users' coins (run chainwatch to reverse a vanished "
                         "payment; see `reconcile --chain`; --force builds anyway): " + "; ".join(unbacked[:5]))


def _final_hex(signed: str) -> str:
    """A finalized PSBT (base64) or a raw transaction (hex) → raw hex."""
    text = signed.strip()
    try:
        return bytes.fromhex(text).hex()
    except ValueError:
        pass
    try:
        psbt = PSBT.from_string(text)
    except (ValueError, binascii.Error) as exc:
        raise BatchError(f"neither a raw transaction in hex nor a PSBT in base64: {exc}") from None
    from embit.finalizer import finalize_psbt  # noqa: PLC0415

    tx = finalize_psbt(psbt)
    if tx is None:
        raise BatchError("the PSBT is not fully signed")
    return tx.serialize().hex()


async def drop_batch(payouts: Payouts, backend: ChainBackend, txid: str) -> list[str]:
    """Forget a built batch and queue its withdrawals again, only once the node says the network does not
    have it: a broadcast killed before its captures leaves a built batch that is already paid (dropping
    it would pay its withdrawals twice and leave the coins it sent never booked out)."""
    try:
        known = await backend.tx_confirmations(txid) is not None
    except ChainError as exc:
        raise BatchError(f"batch {txid} not dropped: the node cannot say whether the network has it "
                         f"({exc.reason})") from None
    if known:
        raise BatchError(f"batch {txid} is on the network, not dropped: run `withdrawals broadcast` with its "
                         "signed PSBT again to book it out")
    return await payouts.drop(txid)


async def broadcast_batch(payouts: Payouts, backend: ChainBackend, signed: str) -> dict[str, Any]:
    """Broadcast the signed batch and post the holds of the withdrawals it pays. A batch whose holds are
    not all pending and locked by it is refused before broadcast; a refused broadcast changes nothing;
    a capture that does not apply after the broadcast fails loudly (BatchError)."""
    raw = _final_hex(signed)
    txid = Transaction.parse(bytes.fromhex(raw)).txid().hex()
    ids = await payouts.batch(txid)
    if not ids:
        raise BatchError(f"transaction {txid} is not a batch built here")
    state = (await payouts.batch_info(txid)).get("state", "built")
    if state == "dropped":
        raise BatchError(f"batch {txid} was dropped; its withdrawals went back to the queue: build a new batch")
    if state != "sent":  # a re-run after the network took it only settles what is left
        problems = await payouts.check_batch(txid)
        if problems:
            raise BatchError(f"batch {txid} not broadcast, its holds are not all locked by it: {'; '.join(problems)}")
        try:
            await backend.broadcast(raw)
        except ChainError as exc:
            if not already_known(exc.reason):
                raise BatchError(f"broadcast refused, holds kept: {exc.reason}") from None
        await payouts.record_broadcast(txid, raw)
    settled, failed = [], []
    for wd_id in ids:
        try:
            settled.append((await payouts.settle(wd_id, txid))["id"])
        except ApiError as exc:
            failed.append(str(exc.detail))
    if failed:
        raise BatchError(f"batch {txid} is on the network but {len(failed)} withdrawal(s) were not booked out: "
                         + "; ".join(failed))
    return {"txid": txid, "withdrawals": settled}
