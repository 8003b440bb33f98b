"""21's OnChain payment: `Bitcoin-Transaction: <raw tx hex>` paying the invoice's address at least the
price. The tx is parsed (bitcoinlib) and checked, broadcast through the chain backend, and only then
recorded atomically under `tx_<txid>` (one txid pays once, ever). Broadcasting first means a refused
broadcast leaves no record at all (the client may retry the same tx), and a retry after a lost answer
finds the tx "already known" by the node and is then told it was used (409). Zero-confirmation risk is
bounded by ONCHAIN_MAX_ZEROCONF: above it the 402 offers no on-chain payment (deposit first)."""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import protocol as P
from ..bitcoin import BITCOINLIB_NETWORK, DUST_LIMIT
from ..chain.backends import ChainBackend, ChainError
from ..config import Settings
from ..errors import BadRequest, PaymentRequired, ServiceUnavailable
from ..invoices import Invoice
from ..ledger import BITCOIN, UNCLAIMED, Ledger
from ..pricing import Quote
from . import Payment

__all__ = ["OnChain"]
_HEX = re.compile(r"\A[0-9a-fA-F]+\Z")


class OnChain:
    name = P.METHOD_ONCHAIN

    def __init__(self, settings: Settings, backend: ChainBackend, owns: Callable[[str], Awaitable[bool]],
                 mark_paid: Callable[[str], Awaitable[None]]) -> None:
        self.settings, self.backend, self.owns, self.mark_paid = settings, backend, owns, mark_paid

    def present(self, request: web.Request) -> bool:
        return P.BITCOIN_TRANSACTION in request.headers

    def offer(self, quote: Quote, invoice: Invoice) -> dict[str, Any] | None:
        if quote.amount > self.settings.onchain_max_zeroconf:
            return None
        entry = self.offer_template(quote.amount)
        entry["payTo"] = invoice.address
        entry["extra"]["invoice"] = invoice.id
        return entry

    def offer_template(self, amount: int) -> dict[str, Any]:
        s = self.settings
        return {"scheme": P.SCHEME_EXACT, "network": s.caip2, "amount": str(amount), "asset": "BTC",
                "payTo": s.payee_address, "maxTimeoutSeconds": s.invoice_ttl,
                "extra": {"method": self.name, "header": P.BITCOIN_TRANSACTION,
                          "maxZeroConf": s.onchain_max_zeroconf}}

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        raw = request.headers[P.BITCOIN_TRANSACTION].strip()
        if len(raw) > 200_000 or len(raw) % 2 or not _HEX.match(raw):
            raise BadRequest("malformed_transaction", "Bitcoin-Transaction must be a raw transaction in hex")
        if quote.amount > self.settings.onchain_max_zeroconf:
            raise PaymentRequired("zeroconf_limit", f"prices above {self.settings.onchain_max_zeroconf} sat are not "
                                                    "taken at zero confirmations; deposit first and pay from your balance")
        try:
            from bitcoinlib.transactions import Transaction  # noqa: PLC0415

            tx = Transaction.parse_hex(raw, network=BITCOINLIB_NETWORK[self.settings.network])
        except Exception:  # noqa: BLE001 - bitcoinlib raises many types for malformed input
            raise BadRequest("malformed_transaction", "the transaction does not parse") from None
        if not tx.inputs or not tx.outputs:
            raise BadRequest("malformed_transaction", "the transaction has no inputs or no outputs")
        paying = [(o.address, int(o.value)) for o in tx.outputs
                  if o.address and (o.address == self.settings.payee_address or await self.owns(o.address))]
        if not paying:
            raise PaymentRequired("wrong_address", "no output pays this invoice's Bitcoin-Address")
        total = sum(value for _, value in paying)
        if total < quote.amount:
            raise PaymentRequired("underpaid", f"the outputs pay {total} sat; the price is {quote.amount} sat")
        if any(value < DUST_LIMIT for _, value in paying):
            raise PaymentRequired("dust", f"outputs below {DUST_LIMIT} sat are dust and are not accepted")
        try:
            await self.backend.broadcast(raw)
        except ChainError as exc:
            if exc.transient:
                raise ServiceUnavailable("chain_unavailable", f"could not broadcast: {exc.reason}") from None
            if not _already_known(exc.reason):
                raise BadRequest("broadcast_rejected", exc.reason) from None
        for address, _ in paying:
            await self.mark_paid(address)
        return Payment(method=self.name, transfer_id=f"tx_{tx.txid}", payer="", amount=quote.amount,
                       debit=BITCOIN, settle_data={"paid": str(total), "txid": tx.txid})

    async def on_void(self, ledger: Ledger, payment: Payment) -> None:
        """The call failed after the coins were broadcast: keep the money on the books for a refund."""
        await ledger.post(f"unclaimed:{payment.settle_data['txid']}", BITCOIN, UNCLAIMED,
                          int(payment.settle_data["paid"]), reason="on-chain payment for a failed call")


def _already_known(reason: str) -> bool:
    """The node has this tx already (a retried request): not an error for us."""
    reason = reason.lower()
    return any(s in reason for s in ("already in block chain", "already-known", "already-in-mempool",
                                     "already in the mempool", "(-27)"))
