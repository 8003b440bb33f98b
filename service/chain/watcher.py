"""The deposit watcher (`python -m service chainwatch`): credits confirmed deposits to their account,
exactly once per output (ledger transfer id `coin:<txid>:<vout>`, see ledger.coin_id), however many watchers run. A deposit
that a reorg removes before DEPOSIT_CONFIRMATIONS was never credited; after that it is final."""
from __future__ import annotations

import structlog

from ..ledger import BITCOIN, Ledger, Outcome, coin_id, user_account
from .addresses import AddressBook
from .backends import ChainBackend

__all__ = ["credit_deposits"]

log = structlog.get_logger("chainwatch")


async def credit_deposits(book: AddressBook, backend: ChainBackend, ledger: Ledger, confirmations: int) -> int:
    credited = 0
    for address, owner in (await book.deposit_addresses()).items():
        for r in await backend.received(address):
            if r.confirmations < confirmations:
                continue
            result = await ledger.post(coin_id(r.txid, r.vout), BITCOIN, user_account(owner), r.value,
                                       reason=f"deposit {r.txid}:{r.vout} ({r.confirmations} confirmations)")
            if result.outcome is Outcome.APPLIED:
                credited += 1
                await book.mark_paid(address)  # the next deposit-address request gets a fresh one
                log.info("deposit_credited", owner=owner, txid=r.txid, vout=r.vout, amount=r.value)
    return credited
