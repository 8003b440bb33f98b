"""Withdrawal batches: one unsigned PSBT paying every queued withdrawal from the operator's UTXOs, signed
offline by the operator's wallet, then broadcast; the holds are posted only once the network took it.
PSBTs are built with embit (BIP174; bitcoinlib has no PSBT support)."""
from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from embit.psbt import PSBT
from embit.script import address_to_scriptpubkey
from embit.transaction import Transaction, TransactionInput, TransactionOutput

from ..bitcoin import DUST_LIMIT
from ..payouts import Payouts
from .addresses import AddressBook
from .backends import ChainBackend, ChainError

__all__ = ["build_batch", "broadcast_batch", "BatchError"]

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


async def build_batch(payouts: Payouts, book: AddressBook, backend: ChainBackend, fee_rate: int = 5) -> Batch:
    queued = [w for w in await payouts.queued() if w["state"] == "queued"]
    if not queued:
        raise BatchError("no withdrawal is queued")
    utxos = [u for a in await book.all_addresses() for u in await backend.utxos(a) if u.confirmations >= 1]
    utxos.sort(key=lambda u: -u.value)
    need = sum(w["amount"] for w in queued)
    chosen, total = [], 0
    for u in utxos:
        chosen.append(u)
        total += u.value
        fee = fee_rate * (_VBYTES_OVERHEAD + _VBYTES_IN * len(chosen) + _VBYTES_OUT * (len(queued) + 1))
        if total >= need + fee:
            break
    else:
        raise BatchError(f"confirmed UTXOs hold {total} sat; the queue needs {need} sat plus fees")
    change = total - need - fee
    outputs = [TransactionOutput(w["amount"], address_to_scriptpubkey(w["address"])) for w in queued]
    if change >= DUST_LIMIT:
        change_address = await book._new("change")
        outputs.append(TransactionOutput(change, address_to_scriptpubkey(change_address)))
    else:
        fee, change = fee + change, 0
    tx = Transaction(vin=[TransactionInput(bytes.fromhex(u.txid), u.vout) for u in chosen], vout=outputs)
    psbt = PSBT(tx)
    for i, u in enumerate(chosen):
        psbt.inputs[i].witness_utxo = TransactionOutput(u.value, address_to_scriptpubkey(u.address))
    txid = tx.txid().hex()
    await payouts.mark_batched([w["id"] for w in queued], txid)
    return Batch(psbt.to_string(), txid, [w["id"] for w in queued], fee, change)


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


async def broadcast_batch(payouts: Payouts, backend: ChainBackend, signed: str) -> dict[str, Any]:
    """Broadcast the signed batch and post the holds of the withdrawals it pays. A refused broadcast
    changes nothing: the holds stay until the operator retries or cancels."""
    raw = _final_hex(signed)
    txid = Transaction.parse(bytes.fromhex(raw)).txid().hex()
    ids = await payouts.batch(txid)
    if not ids:
        raise BatchError(f"transaction {txid} is not a batch built here")
    try:
        await backend.broadcast(raw)
    except ChainError as exc:
        raise BatchError(f"broadcast refused, holds kept: {exc.reason}") from None
    settled = [await payouts.settle(i, txid) for i in ids]
    return {"txid": txid, "withdrawals": [w["id"] for w in settled]}

