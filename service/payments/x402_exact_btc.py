"""x402 `exact` on Bitcoin, in the shape of coinbase/x402 PR #1491 (`specs/schemes/exact/scheme_exact_btc.md`,
closed unmerged; the most complete on-chain draft). The whole wire shape lives here, so whatever x402
merges later is a change to this file: the `accepts` entry, the payload `{psbt, txid, from}` decoded
into the raw transaction the on-chain path checks (payments/onchain.py, the rules of btc_rules.py), and
the signature checks only a PSBT allows (witnessUtxo, P2WPKH, SIGHASH_ALL, low-S). Settlement is the
broadcast, after the handler succeeded (OnChain.settle)."""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from .. import protocol as P
from ..errors import BadRequest, PaymentRequired, ServiceUnavailable
from ..invoices import Invoice
from ..keys import BITCOIN, onchain_account
from ..ledger import AccountKind, Ledger, Outcome, coin_id
from ..pricing import Quote
from . import Offer, Payment, x402_payload, x402_scheme
from .btc_rules import Refusal, dust_limit, paid_to
from .onchain import OnChain, onchain_error

__all__ = ["SCHEME", "ASSET", "requirements", "decode", "Decoded", "ExactBtc"]

SCHEME, ASSET = "exact", "btc"
MAGIC = b"psbt\xff"
SIGHASH_ALL = 0x01
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_EMBIT_NETWORK = {"mainnet": "main", "testnet": "test", "signet": "signet", "regtest": "regtest"}
MAX_PSBT = 150_000  # base64 characters: a standard transaction (400k WU) with its PSBT maps fits


def requirements(amount: int, pay_to: str, network: str, timeout: int, invoice_id: str) -> dict[str, Any]:
    """The draft's PaymentRequirements; `extra.invoice` names our invoice (the payment is bound to it)."""
    return {"scheme": SCHEME, "network": network, "amount": str(amount), "asset": ASSET, "payTo": pay_to,
            "maxTimeoutSeconds": timeout, "extra": {"invoice": invoice_id, "suggestedFeeRate": 2}}


@dataclass(frozen=True)
class Decoded:
    raw_hex: str                                            # the extracted, fully signed transaction
    txid: str
    payer: str                                              # address of the first input's witnessUtxo
    declared: dict[tuple[str, int], tuple[int, str]]        # outpoint -> (witnessUtxo value, its address)


def decode(payload: dict[str, Any], network: str) -> Decoded:
    """Rules 1 and 2 of the draft: a finalized PSBT whose every input is a P2WPKH spend signed with
    SIGHASH_ALL and a low-S signature that verifies over its BIP-143 sighash (the witnessUtxo values and
    scripts it commits to are checked against the chain by btc_rules.check_chain, rule 6)."""
    from embit.networks import NETWORKS  # noqa: PLC0415 - embit loads on the first PSBT only
    from embit.psbt import PSBT  # noqa: PLC0415

    text = payload.get("psbt")
    if not isinstance(text, str) or not 0 < len(text) <= MAX_PSBT:
        raise Refusal(1, "malformed_psbt", "payload.psbt must be a base64 PSBT", 400)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(1, "malformed_psbt", "payload.psbt is not base64", 400) from None
    if not data.startswith(MAGIC):
        raise Refusal(1, "malformed_psbt", "payload.psbt does not start with the PSBT magic bytes", 400)
    try:
        psbt = PSBT.parse(data)
        tx = psbt.tx
    except Exception:  # noqa: BLE001 - embit raises many types for malformed input
        raise Refusal(1, "malformed_psbt", "payload.psbt does not parse as a PSBT with a transaction", 400) from None
    if psbt.version not in (None, 0) or not psbt.inputs or not psbt.outputs:
        raise Refusal(1, "malformed_psbt", "a version 0 PSBT with inputs and outputs is expected", 400)
    net = NETWORKS[_EMBIT_NETWORK[network]]
    declared: dict[tuple[str, int], tuple[int, str]] = {}
    for n, inp in enumerate(psbt.inputs):
        utxo, witness = inp.witness_utxo, inp.final_scriptwitness
        if witness is None or not witness.items:
            raise Refusal(2, "unsigned_input", f"input {n} is not finalized (no finalScriptWitness)", 400)
        if utxo is None:
            raise Refusal(2, "unsigned_input", f"input {n} has no witnessUtxo", 400)
        spk = utxo.script_pubkey.data
        if len(spk) != 22 or spk[:2] != b"\x00\x14":
            raise Refusal(2, "unsupported_input", f"input {n} is not a P2WPKH spend", 400)
        _check_signature(tx, n, witness.items, spk, utxo.value)
        tx.vin[n].witness = witness
        declared[(tx.vin[n].txid.hex(), tx.vin[n].vout)] = (utxo.value, utxo.script_pubkey.address(net))
    txid = tx.txid().hex()
    claimed = payload.get("txid")
    if claimed is not None and claimed != txid:
        raise Refusal(2, "txid_mismatch", f"payload.txid is not the transaction's id ({txid})", 400)
    first = psbt.inputs[0].witness_utxo.script_pubkey
    return Decoded(tx.serialize().hex(), txid, first.address(net), declared)


def _check_signature(tx: Any, n: int, items: list[bytes], spk: bytes, value: int) -> None:
    import coincurve  # noqa: PLC0415
    from embit import script  # noqa: PLC0415

    if len(items) != 2:
        raise Refusal(2, "bad_witness", f"input {n}: a P2WPKH witness is [signature, pubkey]", 400)
    sig, pub = items
    if len(pub) not in (33, 65) or _hash160(pub) != spk[2:]:
        raise Refusal(2, "bad_witness", f"input {n}: the pubkey does not hash to the witnessUtxo script", 400)
    if not sig or sig[-1] != SIGHASH_ALL:
        raise Refusal(2, "sighash_not_all", f"input {n}: only SIGHASH_ALL signatures are accepted", 400)
    der = sig[:-1]
    s = _der_s(der)
    if s is None:
        raise Refusal(2, "bad_signature", f"input {n}: the signature is not strict DER", 400)
    if s > _ORDER // 2:
        raise Refusal(2, "high_s", f"input {n}: the signature's S is not low (BIP-146)", 400)
    digest = tx.sighash_segwit(n, script.p2pkh_from_p2wpkh(script.Script(spk)), value)
    try:
        ok = coincurve.PublicKey(pub).verify(der, digest, hasher=None)
    except ValueError:
        ok = False
    if not ok:
        raise Refusal(2, "bad_signature", f"input {n}: the signature does not verify", 400)


def _hash160(data: bytes) -> bytes:
    from embit.hashes import hash160  # noqa: PLC0415 - hashlib's ripemd160 depends on the OpenSSL build

    return hash160(data)


def _der_s(der: bytes) -> int | None:
    """S of a strict DER ECDSA signature (BIP-66 shape), None when it is not one."""
    if len(der) < 8 or der[0] != 0x30 or der[1] != len(der) - 2 or der[2] != 0x02:
        return None
    r_len = der[3]
    if 4 + r_len + 2 > len(der) or der[4 + r_len] != 0x02:
        return None
    s_len = der[5 + r_len]
    if 6 + r_len + s_len != len(der) or not s_len or der[6 + r_len] & 0x80:
        return None
    return int.from_bytes(der[6 + r_len:], "big")


class ExactBtc:
    """The x402 method: its 402 entry, the PSBT checked by the on-chain path (OnChain.check), the broadcast
    as settlement once the call succeeded. Until then the price is held against the chain account (the
    coins are not ours yet); the broadcast books them and repays that advance in one script."""

    name = P.METHOD_EXACT_BTC

    def __init__(self, onchain: OnChain) -> None:
        self.onchain, self.settings = onchain, onchain.settings
        self.rules = replace(onchain.rules, exact=True)

    def present(self, request: web.Request) -> bool:
        return x402_scheme(request) == SCHEME

    async def challenge(self, quote: Quote, invoice: Invoice) -> Offer | None:
        """Where 21's OnChain is (zero-conf limit, no escrow, an invoice address), and not below dust."""
        if not self.onchain.takes(quote, invoice) or quote.amount < dust_limit("p2wpkh"):
            return None
        return Offer(self.name, requirements(quote.amount, invoice.address, self.settings.caip2,
                                             self.settings.invoice_ttl, invoice.id))

    def offer_template(self, amount: int) -> dict[str, Any] | None:
        if not dust_limit("p2wpkh") <= amount <= self.settings.onchain_max_zeroconf:
            return None
        entry = requirements(amount, self.settings.payee_address, self.settings.caip2, self.settings.invoice_ttl, "")
        entry["extra"] = {"payTo": "each 402 names its invoice's own address", "minAmount": dust_limit("p2wpkh")}
        return entry

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        data = x402_payload(request)
        accepted, payload = data["accepted"], data["payload"]
        if accepted.get("network") != self.settings.caip2:  # rule 13 (the draft's 10)
            raise PaymentRequired("wrong_network", f"this server settles on {self.settings.caip2}")
        if accepted.get("asset") != ASSET or str(accepted.get("amount")) != str(quote.amount):  # the draft's 14
            raise PaymentRequired("wrong_amount", f"the price of this request is {quote.amount} sat ({ASSET})")
        try:
            decoded = decode(payload, self.settings.network)
        except Refusal as refusal:
            raise onchain_error(refusal) from None
        extra = accepted.get("extra") if isinstance(accepted.get("extra"), dict) else {}
        named = extra.get("invoice") if isinstance(extra.get("invoice"), str) else ""
        checked = await self.onchain.check(request, quote, decoded.raw_hex, named,
                                           replace(self.rules, declared=decoded.declared))
        return Payment(method=self.name, transfer_id=f"tx_{decoded.txid}", payer=checked.payer, amount=quote.amount,
                       debit=BITCOIN, x402=True, payer_id=decoded.payer,
                       settle_data={"txid": decoded.txid, "raw": decoded.raw_hex, "address": checked.address,
                                    "invoice": checked.invoice, "paid": str(quote.amount),
                                    "vouts": ",".join(str(vout) for vout, _ in paid_to(checked.tx, checked.address))})

    async def settle(self, ledger: Ledger, payment: Payment) -> None:
        """Broadcast (fail closed: a refusal is a 402, an unreachable backend a 503, nothing charged), then
        book the coin and repay the chain account's advance, in one script."""
        d = payment.settle_data
        txid, address = d["txid"], d["address"]
        try:
            await self.onchain.broadcast(d["raw"], txid, d["invoice"], address)
        except BadRequest as exc:
            raise PaymentRequired(exc.code, exc.detail) from None
        coins = [(coin_id(txid, vout), BITCOIN, onchain_account(txid), int(d["paid"]),
                  {"reason": f"on-chain payment {txid}:{vout}", "invoice": d["invoice"], "payer": payment.payer})
                 for vout in (int(v) for v in d.get("vouts", "").split(",") if v)]
        await ledger.open_account(onchain_account(txid), AccountKind.ESCROW)  # the advance's debit
        result = await ledger.post_all(coins + [(f"advance_{txid}", onchain_account(txid), BITCOIN, payment.amount,
                                                 {"reason": f"x402 exact-BTC {txid}: the hold's advance repaid"})],
                                       open_credit=AccountKind.ESCROW)
        if result.outcome not in (Outcome.APPLIED, Outcome.REPLAYED):
            raise ServiceUnavailable("ledger_refused", f"the coins could not be booked: {result.outcome.value}")
        await self.onchain.records.set_state(txid, "booked")
        await self.onchain.book.mark_paid(address)
        d["settled"] = "1"

    async def on_void(self, ledger: Ledger, payment: Payment) -> None:
        """The call was not charged: before the broadcast the payer keeps the coins (the claim goes); after
        it (a capture refused late) the advance goes back to the payment's account, the payer's refund."""
        d = payment.settle_data
        if d.get("settled"):
            await ledger.post(f"advance_back_{d['txid']}", BITCOIN, onchain_account(d["txid"]), payment.amount,
                              reason=f"x402 exact-BTC {d['txid']}: call not charged")
            await self.onchain.records.add_open(d["txid"], address=d["address"], payer=payment.payer, state="booked")
        else:
            await self.onchain.records.release(d["txid"], d["invoice"], d["address"])
