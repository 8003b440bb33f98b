"""Pay this service from Coinbase's x402 SDK (PyPI `x402`, extra `[x402]`): a scheme client for our
`bittransfer` scheme, which signs a BitTransfer from the caller's account on our ledger.

    from x402 import x402Client
    from x402.http.clients import wrapHttpxWithPayment
    from service.x402_plugin import Wallet, register_bittransfer
    client = register_bittransfer(x402Client(), Wallet.load("wallet.json"), max_sat=500)
    async with wrapHttpxWithPayment(client) as http: await http.post(url, content=manifest)

It defines no `find_default_asset`: the SDK would apply its $1 default at 8 decimals; the cap is the
`max_sat` spend control, in satoshis, that `register_bittransfer` sets.
"""
from __future__ import annotations

from typing import Any, TypeVar

from . import protocol as P
from .client import Wallet, transfer_headers

__all__ = ["BitTransferScheme", "register_bittransfer", "NETWORKS", "Wallet"]

NETWORKS = "bip122:*"  # every Bitcoin network; the payload names the one the 402 offered
C = TypeVar("C")


class BitTransferScheme:
    """x402 `SchemeNetworkClient` for the `bittransfer` scheme: the payload is a transfer signed by the
    wallet's registered key, bound to the 402's invoice (`extra.invoice`)."""

    scheme = P.SCHEME_BITTRANSFER

    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet

    def create_payment_payload(self, requirements: Any) -> dict[str, Any]:
        extra = requirements.extra or {}
        headers = transfer_headers(self.wallet, amount=int(requirements.amount), payee_username=extra["username"],
                                   payee_address=requirements.pay_to, url="", invoice=extra.get("invoice"))
        return {"transfer": headers[P.BITCOIN_TRANSFER], "signature": headers[P.AUTHORIZATION]}


def register_bittransfer(client: C, wallet: Wallet, *, max_sat: int) -> C:
    """Register the scheme on an `x402Client` / `x402ClientSync` for `bip122:*` and allow paying in
    satoshis up to `max_sat` per call (the SDK refuses unknown assets until told)."""
    scheme = BitTransferScheme(wallet)
    client.register(NETWORKS, scheme)  # type: ignore[attr-defined]
    client.set_spend_controls(  # type: ignore[attr-defined]
        {"allowed_assets": [{"network": NETWORKS, "asset": "sat", "max_amount_per_payment": str(max_sat)}]})
    return client
