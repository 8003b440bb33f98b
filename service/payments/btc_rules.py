"""The 14 verification rules of the x402 exact-BTC draft (coinbase/x402 PR #1491,
`specs/schemes/exact/scheme_exact_btc.md`), in one place: a raw `Bitcoin-Transaction` today and an x402
PSBT payload later are checked by the same code. The caller parses, gathers facts from the chain
backend (the prevouts) and from our records (replay), and gets back the first rule broken, or None.

 1 parses              6 prevout value matches the declared one   11 weight <= 400,000 WU
 2 every input signed  7 no duplicate inputs                      12 no dust output to payTo
 3 pays payTo >= price 8 fee within bounds                        13 network matches ours
 4 prevouts exist      9 nLockTime 0                              14 txid not used before
 5 prevouts unspent   10 no relative timelock (nSequence)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..bitcoin import BITCOINLIB_NETWORK, DUST_LIMIT
from ..chain.backends import Prevout

__all__ = ["Refusal", "Rules", "dust_limit", "parse", "outpoints", "check_static", "check_chain"]

MAX_WEIGHT = 400_000            # standardness: a heavier tx is not relayed
SEQUENCE_DISABLE = 1 << 31      # BIP68: with this bit set nSequence carries no relative timelock


@dataclass
class Refusal(Exception):
    """A broken rule: `status` 400 for a malformed payment, 402 (pay again) or 409 (replay) otherwise."""

    rule: int
    code: str
    detail: str
    status: int = 402


@dataclass(frozen=True)
class Rules:
    network: str                        # ours: mainnet | testnet | signet | regtest
    caip2: str = ""                     # ours as CAIP-2, for payloads that name a network
    dust: int = DUST_LIMIT
    max_weight: int = MAX_WEIGHT
    min_feerate: float = 1.0            # sat/vB: below it the tx may never confirm
    max_feerate: float = 2_000.0        # sat/vB: above it the payer surely made a mistake
    declared: Mapping[tuple[str, int], tuple[int, str]] = field(default_factory=dict)  # PSBT witnessUtxo (value, address)
    exact: bool = False                 # x402 exact: one output pays exactly the price, no output is dust


def dust_limit(script_type: str) -> int:
    """Bitcoin Core's dust threshold at 3 sat/vB by output type (the exact-BTC draft's table)."""
    return {"p2wpkh": 294, "p2wsh": 330, "p2tr": 330}.get(script_type, 546)


def parse(raw_hex: str, network: str) -> Any:
    """Rule 1: a bitcoinlib Transaction, or Refusal (400)."""
    try:
        from bitcoinlib.transactions import Transaction  # noqa: PLC0415

        tx = Transaction.parse_hex(raw_hex, network=BITCOINLIB_NETWORK[network])
    except Exception:  # noqa: BLE001 - bitcoinlib raises many types for malformed input
        raise Refusal(1, "malformed_transaction", "the transaction does not parse", 400) from None
    if not tx.inputs or not tx.outputs:
        raise Refusal(1, "malformed_transaction", "the transaction has no inputs or no outputs", 400)
    if tx.raw_hex() != raw_hex.lower():
        raise Refusal(1, "malformed_transaction", "the transaction has trailing or non-canonical bytes", 400)
    return tx


def outpoints(tx: Any) -> list[tuple[str, int]]:
    return [(i.prev_txid.hex(), int(i.output_n_int)) for i in tx.inputs]


def paid_to(tx: Any, pay_to: str) -> list[tuple[int, int]]:
    """(vout, value) of every output paying `pay_to`."""
    return [(n, int(o.value)) for n, o in enumerate(tx.outputs) if o.address == pay_to]


def check_static(tx: Any, pay_to: str, amount: int, rules: Rules, network: str | None = None) -> Refusal | None:
    """The rules a transaction breaks on its own: 2, 3, 7, 9, 10, 11, 12, 13."""
    if network is not None and network not in (rules.caip2, rules.network):
        return Refusal(13, "wrong_network", f"the payment is for {network}; this service takes {rules.caip2}")
    for n, i in enumerate(tx.inputs):
        if not (i.witnesses and any(i.witnesses)) and not i.unlocking_script:
            return Refusal(2, "unsigned_input", f"input {n} carries neither a witness nor a scriptSig", 400)
    paying = paid_to(tx, pay_to)
    if not paying:
        return Refusal(3, "wrong_address", "no output pays this invoice's Bitcoin-Address")
    total = sum(v for _, v in paying)
    if rules.exact and [v for _, v in paying] != [amount]:
        return Refusal(3, "wrong_amount", f"one output must pay exactly {amount} sat to payTo; these pay {total}")
    if total < amount:
        return Refusal(3, "underpaid", f"the outputs pay {total} sat; the price is {amount} sat")
    if rules.exact:  # the draft: no output but OP_RETURN below its type's dust limit
        for n, o in enumerate(tx.outputs):
            if o.script_type != "nulldata" and int(o.value) < dust_limit(o.script_type):
                return Refusal(12, "dust", f"output {n} pays {int(o.value)} sat, below the "
                                           f"{dust_limit(o.script_type)} sat dust limit of {o.script_type}")
    elif any(v < rules.dust for _, v in paying):
        return Refusal(12, "dust", f"outputs below {rules.dust} sat are dust and are not accepted")
    points = outpoints(tx)
    if len(set(points)) != len(points):
        return Refusal(7, "duplicate_input", "the transaction spends the same output twice", 400)
    if int(tx.locktime) != 0:
        return Refusal(9, "locktime", "nLockTime must be 0: the payment must be final now")
    for n, i in enumerate(tx.inputs):
        if not int(i.sequence) & SEQUENCE_DISABLE:
            return Refusal(10, "relative_timelock", f"input {n}'s nSequence sets a relative timelock (BIP68)")
    weight = int(tx.weight_units)
    if weight > rules.max_weight:
        return Refusal(11, "too_heavy", f"weight {weight} WU is above {rules.max_weight}")
    return None


def check_chain(tx: Any, prevouts: Mapping[tuple[str, int], Prevout | None], rules: Rules, *,
                replayed: bool = False) -> Refusal | None:
    """The rules that need the chain's facts and our records: 4, 5, 6, 8, 14. `prevouts` maps every
    input's outpoint to what the backend reports (None: no such output)."""
    if replayed:
        return Refusal(14, "payment_replayed", "this transaction already paid for another request", 409)
    total_in = 0
    for n, point in enumerate(outpoints(tx)):
        prev = prevouts.get(point)
        if prev is None:
            return Refusal(4, "input_missing", f"input {n} spends {point[0]}:{point[1]}, which the chain does not know")
        if prev.spent_by:
            return Refusal(5, "input_spent", f"input {n} spends an output that is already spent"
                                             " (a transaction the network knows is not a new payment)")
        declared = rules.declared.get(point)
        if declared is not None and declared != (prev.value, prev.address):
            return Refusal(6, "input_value_mismatch", f"input {n}'s witnessUtxo claims {declared[0]} sat to "
                                                      f"{declared[1]}; the chain says {prev.value} sat to {prev.address}")
        total_in += prev.value
    fee = total_in - sum(int(o.value) for o in tx.outputs)
    vsize = max(1, int(tx.vsize))
    if fee < rules.min_feerate * vsize:
        return Refusal(8, "fee_too_low", f"the fee is {fee} sat for {vsize} vB; at least {rules.min_feerate} sat/vB")
    if fee > rules.max_feerate * vsize:
        return Refusal(8, "fee_too_high", f"the fee is {fee} sat for {vsize} vB; at most {rules.max_feerate} sat/vB")
    return None
