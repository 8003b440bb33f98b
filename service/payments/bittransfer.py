"""21's BitTransfer, settled on our own ledger: a JSON transfer signed by the payer's key.

Accepted as two1 sends it (`Bitcoin-Transfer` + `Authorization` headers) or inside an x402 v2
`PAYMENT-SIGNATURE` payload. A transfer's ledger id is the sha256 of its exact JSON string, so a given
signed transfer settles at most once, whatever its (malleable) signature bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .. import crypto
from .. import protocol as P
from ..config import Settings
from ..deployment import absolute_url, names_this_deployment, origin
from ..errors import BadRequest, PaymentRequired, Unauthorized
from ..invoices import Invoice, Invoices
from ..ledger import Ledger, user_account
from ..pricing import Quote
from . import Offer, Payment, x402_payload, x402_scheme

__all__ = ["BitTransfer", "BitTransferSchema", "parse_transfer", "transfer_id_of", "two1_headers"]


class BitTransferSchema(Schema):
    """two1's keys, plus our optional `invoice` and `nonce`; unknown keys are ignored."""

    class Meta:
        unknown = EXCLUDE

    payer = fields.String(required=True, validate=validate.Length(1, 64))
    payer_pubkey = fields.String(required=True, validate=validate.Length(1, 200))
    payee_address = fields.String(required=True, validate=validate.Length(1, 128))
    payee_username = fields.String(required=True, validate=validate.Length(1, 64))
    amount = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    timestamp = fields.Float(required=True, allow_nan=False)
    description = fields.String(load_default=None, validate=validate.Length(max=2048))
    invoice = fields.String(load_default=None, validate=validate.Length(max=128))
    nonce = fields.String(load_default=None, validate=validate.Length(max=128))


_transfer_schema = BitTransferSchema()
# the schema's string fields: (name, required, min length, max length)
_STRINGS = (("payer", True, 1, 64), ("payer_pubkey", True, 1, 200), ("payee_address", True, 1, 128),
            ("payee_username", True, 1, 64), ("description", False, 0, 2048), ("invoice", False, 0, 128),
            ("nonce", False, 0, 128))


def parse_transfer(raw: dict[str, Any]) -> dict[str, Any]:
    """BitTransferSchema().load(raw): the common well-formed case checked here in ~2 us (marshmallow takes
    ~100 on the paid hot path); anything else goes to the schema, so results and errors are the schema's."""
    out: dict[str, Any] = {}
    for name, required, lo, hi in _STRINGS:
        value = raw.get(name)
        if value is None and not required:
            out[name] = None
        elif type(value) is str and lo <= len(value) <= hi:
            out[name] = value
        else:
            return _transfer_schema.load(raw)
    amount, timestamp = raw.get("amount"), raw.get("timestamp")
    if type(amount) is not int or amount < 1:
        return _transfer_schema.load(raw)
    if type(timestamp) is int and abs(timestamp) < 2**53:
        timestamp = float(timestamp)
    if type(timestamp) is not float or not math.isfinite(timestamp):
        return _transfer_schema.load(raw)
    out["amount"], out["timestamp"] = amount, timestamp
    return out


def two1_headers(quote: Quote, invoice: Invoice) -> dict[str, str]:
    """21's 402 headers (two1.bitrequests reads them): the price and where to pay it."""
    return {P.PRICE: str(quote.amount), P.BITCOIN_ADDRESS: invoice.address, P.USERNAME: invoice.payee}


def transfer_id_of(transfer_json: str) -> str:
    return "bt_" + hashlib.sha256(transfer_json.encode()).hexdigest()


class BitTransfer:
    name = P.METHOD_BITTRANSFER

    def __init__(self, settings: Settings, invoices: Invoices, owns: Callable[[str], Awaitable[bool]] | None = None,
                 ledger: Ledger | None = None) -> None:
        self.settings = settings
        self.invoices = invoices
        self.owns = owns  # is this one of our derived receiving addresses? (with an xpub configured)
        self.ledger = ledger  # reads the payer's registered key before anything is counted against the payer
        self._keys: dict[str, str] = {}  # username -> registered pubkey hex (keys never change once registered)

    def present(self, request: web.Request) -> bool:
        """two1's headers, or any PAYMENT-SIGNATURE but exact-BTC's (a malformed one is refused here)."""
        return P.BITCOIN_TRANSFER in request.headers or (
            P.PAYMENT_SIGNATURE in request.headers and x402_scheme(request) != P.SCHEME_EXACT)

    async def challenge(self, quote: Quote, invoice: Invoice) -> Offer:
        """Its x402 entry, and 21's headers two1 pays a BitTransfer from."""
        entry = self.offer_template(quote.amount)
        entry["payTo"] = invoice.address
        entry["extra"]["invoice"] = invoice.id
        return Offer(self.name, entry, two1_headers(quote, invoice))

    def offer_template(self, amount: int) -> dict[str, Any]:
        s = self.settings
        return {
            "scheme": P.SCHEME_BITTRANSFER, "network": s.caip2, "amount": str(amount), "asset": "sat",
            "payTo": s.payee_address, "maxTimeoutSeconds": s.invoice_ttl,
            "extra": {"method": self.name, "username": s.payee_username},
        }

    def _extract(self, request: web.Request) -> tuple[str, str, bool]:
        """(transfer JSON string, base64 signature, came through x402)."""
        if P.BITCOIN_TRANSFER in request.headers:
            signature = request.headers.get(P.AUTHORIZATION)
            if not signature:
                raise BadRequest("malformed_signature", "Bitcoin-Transfer needs its signature in the Authorization header")
            return request.headers[P.BITCOIN_TRANSFER], signature, False
        data = x402_payload(request)
        accepted, payload = data["accepted"], data["payload"]
        if accepted.get("scheme") != P.SCHEME_BITTRANSFER:
            raise PaymentRequired("unsupported_scheme", f"this server takes the x402 schemes '{P.SCHEME_BITTRANSFER}' "
                                                        f"and '{P.SCHEME_EXACT}' (on-chain BTC, where offered)")
        if accepted.get("network") != self.settings.caip2:
            raise PaymentRequired("wrong_network", f"this server settles on {self.settings.caip2}")
        transfer, signature = payload.get("transfer"), payload.get("signature")
        if not isinstance(transfer, str) or not isinstance(signature, str):
            raise BadRequest("malformed_payment", "payload needs string fields 'transfer' and 'signature'")
        return transfer, signature, True

    async def verify(self, request: web.Request, quote: Quote) -> Payment:
        return await self.verify_transfer(request, quote, *self._extract(request))

    async def verify_transfer(self, request: web.Request, quote: Quote, transfer_json: str, signature: str,
                              via_x402: bool = False) -> Payment:
        """Check one signed transfer, whichever header carried it (21's, x402's, the Payment scheme's)."""
        if len(transfer_json) > 4096:
            raise BadRequest("malformed_transfer", "Bitcoin-Transfer is longer than 4096 bytes")
        try:
            raw = json.loads(transfer_json)
            if not isinstance(raw, dict):
                raise ValueError
        except ValueError:
            raise BadRequest("malformed_transfer", "Bitcoin-Transfer is not a JSON object") from None
        try:
            t = parse_transfer(raw)
        except ValidationError as exc:
            raise BadRequest("malformed_transfer", exc.messages) from None
        s = self.settings
        ours = t["payee_address"] == s.payee_address or (self.owns is not None and await self.owns(t["payee_address"]))
        if t["payee_username"] != s.payee_username or not ours:
            raise PaymentRequired("wrong_payee", f"pay {s.payee_username} at the invoice's Bitcoin-Address")
        if t["amount"] != quote.amount:
            raise PaymentRequired("wrong_amount", f"the price of this request is {quote.amount} sat, the transfer pays {t['amount']}")
        if abs(time.time() - t["timestamp"]) > s.transfer_window:
            raise PaymentRequired("stale_transfer", f"timestamp must be within {s.transfer_window} s of the server's clock")
        if t["invoice"] is not None:
            reason = self.invoices.check(t["invoice"], quote, t["payee_address"])
            if reason:
                raise PaymentRequired(reason, "the invoice was not issued for this request, or has expired")
        self._check_resource(request, t["description"], t["invoice"])
        try:
            pubkey = crypto.parse_pubkey(t["payer_pubkey"])
        except crypto.KeyError_ as exc:
            raise BadRequest("malformed_pubkey", f"payer_pubkey: {exc}") from None
        try:
            valid = crypto.verify(pubkey, signature, transfer_json.encode())
        except crypto.KeyError_ as exc:
            raise BadRequest("malformed_signature", f"Authorization: {exc}") from None
        if not valid:
            raise Unauthorized("bad_signature", "the signature does not verify for payer_pubkey over the transfer")
        await self._check_payer_key(t["payer"], pubkey.hex())
        return Payment(
            method=self.name, transfer_id=transfer_id_of(transfer_json), payer=t["payer"],
            amount=t["amount"], payer_pubkey=pubkey.hex(), x402=via_x402, payer_id=pubkey.hex(),
            replay_until=t["timestamp"] + s.transfer_window,  # later, verify refuses it as stale
        )

    def _check_resource(self, request: web.Request, description: str | None, invoice: str | None) -> None:
        """A transfer pays one request of one deployment: its description is this deployment's URL of this
        path (two1 clients send the URL they requested), or, without one, it answers our invoice (checked
        above; invoices are bound to the deployment)."""
        if not description:
            if invoice is None:
                raise PaymentRequired("wrong_resource", "description must be the URL you requested "
                                                        f"({absolute_url(self.settings, request)}), or give the invoice")
            return
        try:
            path = urlsplit(description).path
        except ValueError:
            path = None
        if path != request.path:
            raise PaymentRequired("wrong_resource", "the transfer's description names another resource")
        if not names_this_deployment(self.settings, request, description):
            raise PaymentRequired("wrong_deployment", "the transfer's description names another deployment; "
                                                      f"this one is {origin(self.settings, request)}")

    async def _check_payer_key(self, payer: str, pubkey_hex: str) -> None:
        """The transfer is signed by the payer's registered key, checked before the payer's rate limit is
        charged, so an outsider signing transfers in someone else's name cannot lock them out. (The hold
        checks it again, atomically with the balance.)"""
        if self.ledger is None:
            return
        registered = self._keys.get(payer)
        if registered is None:
            registered = await self.ledger.account_meta(user_account(payer), "pubkey")
            if registered is None:
                raise Unauthorized("unknown_payer", "no account is registered under this payer name")
            if len(self._keys) >= 100_000:
                self._keys.clear()
            self._keys[payer] = registered
        if registered != pubkey_hex:
            raise Unauthorized("pubkey_mismatch", "payer_pubkey is not the key registered for this payer")
