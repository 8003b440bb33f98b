"""x402 `exact` on Bitcoin (coinbase/x402 PR #1491): real PSBTs built and signed with embit, paid through
PAYMENT-SIGNATURE, checked by the on-chain path's rules, broadcast only after the call succeeded."""
from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest
from aiohttp import web

from service.keys import BITCOIN, REVENUE, onchain_account
from service.pricing import priced

MANIFEST = b"---\n".join([b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"] * 10)
PRICE = 100 + 10 * 20  # ten documents: above the 294 sat dust limit of the P2WPKH output that pays it
ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
ELSEWHERE = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


def _der(r: int, s: int) -> bytes:
    def part(x: int) -> bytes:
        b = x.to_bytes(32, "big").lstrip(b"\0")
        return b"\x02" + bytes([len(b) + (b[0] >= 0x80)]) + (b"\0" if b[0] >= 0x80 else b"") + b
    body = part(r) + part(s)
    return b"\x30" + bytes([len(body)]) + body


def build_psbt(esplora: Any, pay_to: str, amount: int = PRICE, *, fund: int = 100_000, change: int = 90_000,
               locktime: int = 0, sequence: int = 0xFFFFFFFF, sighash: int = 1, high_s: bool = False,
               declared: int | None = None, lie_script: bool = False, other_signer: bool = False,
               duplicate: bool = False, prev: tuple[bytes, int] | None = None, outputs: list[tuple[int, str]] = (),
               finalize: bool = True, witness_items: int = 2, witness_utxo: bool = True) -> tuple[str, str, str]:
    """A finalized PSBT paying `amount` to `pay_to` from a confirmed P2WPKH output the fake Esplora knows;
    (base64 PSBT, txid, payer address). Every knob breaks one rule."""
    from embit import ec, script
    from embit.networks import NETWORKS
    from embit.psbt import PSBT
    from embit.transaction import Transaction, TransactionInput, TransactionOutput

    key = ec.PrivateKey(os.urandom(32))
    pub = key.get_public_key()
    spk = script.p2wpkh(pub)
    address = spk.address(NETWORKS["test"])
    prev_txid, vout = prev or esplora.fund(fund, ELSEWHERE if lie_script else address)
    vin = [TransactionInput(prev_txid, vout, sequence=sequence) for _ in range(2 if duplicate else 1)]
    vouts = [TransactionOutput(amount, script.address_to_scriptpubkey(pay_to))]
    vouts += [TransactionOutput(value, script.address_to_scriptpubkey(to)) for value, to in outputs]
    if change:
        vouts.append(TransactionOutput(change, spk))
    psbt = PSBT(Transaction(vin=vin, vout=vouts, locktime=locktime))
    value = declared or fund
    signer = ec.PrivateKey(os.urandom(32)) if other_signer else key
    for n, inp in enumerate(psbt.inputs):
        if witness_utxo:
            inp.witness_utxo = TransactionOutput(value, spk)
        if not finalize:
            continue
        sig = signer.sign(psbt.tx.sighash_segwit(n, script.p2pkh(pub), value, sighash)).serialize()
        if high_s:
            r_len = sig[3]
            r, s = int.from_bytes(sig[4:4 + r_len], "big"), int.from_bytes(sig[6 + r_len:], "big")
            sig = _der(r, ORDER - s)
        items = [sig + bytes([sighash]), pub.sec()] + [b"\x01"] * (witness_items - 2)
        inp.final_scriptwitness = script.Witness(items)
    tx = psbt.tx
    return psbt.to_base64(), tx.txid().hex(), address


def signature(required: dict[str, Any], accepted: dict[str, Any], psbt: str, txid: str | None, payer: str) -> str:
    payload = {"x402Version": 2, "resource": required["resource"], "accepted": accepted,
               "payload": {"psbt": psbt, "txid": txid, "from": payer}}
    return base64.b64encode(json.dumps(payload).encode()).decode()


async def challenge(http: Any, url: str, data: bytes = MANIFEST) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PaymentRequired as the header carries it, its exact-BTC entry)."""
    async with http.post(url, data=data) as r:
        assert r.status == 402
        required = json.loads(base64.b64decode(r.headers["PAYMENT-REQUIRED"]))
        assert required == await r.json()
    exact = [a for a in required["accepts"] if a["scheme"] == "exact"]
    assert len(exact) == 1, required["accepts"]
    return required, exact[0]


async def books(ledger) -> tuple:
    return ((await ledger.balance(REVENUE)).posted, (await ledger.balance(BITCOIN)).posted,
            await ledger.redis.xlen(ledger.journal_key))


@pytest.fixture
async def url(aiohttp_server, chain_app) -> str:
    server = await aiohttp_server(chain_app())
    return str(server.make_url("/v1/qa/validate"))


async def test_the_402_offers_exact_btc_in_the_drafts_shape(http, url, settings):
    required, exact = await challenge(http, url)
    assert exact["network"] == "bip122:000000000933ea01ad0ee984209779ba" and exact["asset"] == "btc"
    assert exact["amount"] == str(PRICE) and exact["payTo"] == required["invoice"]["address"]
    assert exact["extra"]["invoice"] == required["invoice"]["id"]
    assert exact["payTo"] != settings.payee_address  # the invoice's own derived address
    assert [a["scheme"] for a in required["accepts"]] == ["bittransfer", "exact"]


async def test_a_psbt_pays_once_and_is_broadcast_after_the_call(http, url, esplora, ledger):
    required, exact = await challenge(http, url)
    psbt, txid, payer = build_psbt(esplora, exact["payTo"])
    header = signature(required, exact, psbt, txid, payer)
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": header}) as r:
        assert r.status == 200, await r.text()
        response = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
    assert response == {"success": True, "transaction": txid, "network": exact["network"], "payer": payer}
    assert len(esplora.broadcasts) == 1 and esplora.index[txid]
    assert (await ledger.balance(REVENUE)).posted == PRICE
    assert (await ledger.balance(BITCOIN)).posted == -PRICE  # only the price: the draft pays exactly, no change to us
    assert (await ledger.balance(onchain_account(txid))).posted == 0
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": header}) as r:  # a retry: kept answer
        assert r.status == 200 and r.headers.get("Idempotent-Replayed") == "true"
    assert (await ledger.balance(REVENUE)).posted == PRICE and len(esplora.broadcasts) == 1
    assert (await ledger.reconcile()).ok


async def test_the_same_psbt_pays_no_other_request(http, url, esplora, ledger):
    required, exact = await challenge(http, url)
    psbt, txid, payer = build_psbt(esplora, exact["payTo"])
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, exact, psbt, txid, payer)}) as r:
        assert r.status == 200
    other = MANIFEST.replace(b"name: a", b"name: b")
    required2, exact2 = await challenge(http, url, other)
    before = await books(ledger)
    async with http.post(url, data=other, headers={"PAYMENT-SIGNATURE": signature(required2, exact2, psbt, txid, payer)}) as r:
        assert r.status in (402, 409)
        failure = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
        assert failure["success"] is False and failure["errorReason"] in ("payment_replayed", "invoice_mismatch")
    assert await books(ledger) == before


@pytest.fixture
async def failing(aiohttp_server, chain_app) -> str:
    @priced("qa.validate")
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    app = chain_app(validate_base_price=PRICE)  # this route counts no documents: its price is the base
    app.router.add_post("/test/unavailable", boom)
    server = await aiohttp_server(app)
    return str(server.make_url("/test/unavailable"))


async def test_a_failed_call_broadcasts_nothing_and_the_psbt_stays_the_payers(http, failing, esplora, ledger):
    required, exact = await challenge(http, failing)
    psbt, txid, payer = build_psbt(esplora, exact["payTo"])
    before = await books(ledger)
    async with http.post(failing, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, exact, psbt, txid, payer)}) as r:
        assert r.status == 503
    assert esplora.broadcasts == [] and (await books(ledger))[:2] == before[:2]
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("reject,status", [("sendrawtransaction RPC error: bad-txns-inputs-missingorspent", 402),
                                           (None, 503)])
async def test_a_broadcast_that_fails_serves_nothing_and_charges_nothing(http, url, esplora, ledger, reject, status):
    required, exact = await challenge(http, url)
    psbt, txid, payer = build_psbt(esplora, exact["payTo"])
    before = await books(ledger)
    if reject:
        esplora.reject = reject
    else:
        esplora.lose_answers = 10  # every retry's answer lost: the network may have it, nobody can say: fail closed
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, exact, psbt, txid, payer)}) as r:
        body = await r.json()
        assert r.status == status, body
        assert "valid" not in body  # the resource is not served
        if status == 402:
            failure = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
            assert failure["success"] is False and failure["errorReason"] == "broadcast_rejected"
    assert (await books(ledger))[:2] == before[:2]


def _garbage(esplora, pay_to):
    return base64.b64encode(b"psbt\xff" + os.urandom(40)).decode(), None, "x"


CASES: dict[str, tuple[Any, int, str]] = {
    # rule 1: format
    "not base64": (lambda e, a: ("%%%", None, "x"), 400, "malformed_psbt"),
    "no PSBT magic": (lambda e, a: (base64.b64encode(b"nope" + os.urandom(20)).decode(), None, "x"), 400, "malformed_psbt"),
    "does not parse": (_garbage, 400, "malformed_psbt"),
    # rule 2: every input finalized and verified
    "input not finalized": (lambda e, a: build_psbt(e, a, finalize=False), 400, "unsigned_input"),
    "no witnessUtxo": (lambda e, a: build_psbt(e, a, witness_utxo=False), 400, "unsigned_input"),
    "witness of 3 items": (lambda e, a: build_psbt(e, a, witness_items=3), 400, "bad_witness"),
    "signed by another key": (lambda e, a: build_psbt(e, a, other_signer=True), 400, "bad_signature"),
    "high-S signature": (lambda e, a: build_psbt(e, a, high_s=True), 400, "high_s"),
    "SIGHASH_NONE": (lambda e, a: build_psbt(e, a, sighash=2), 400, "sighash_not_all"),
    "SIGHASH_ALL|ANYONECANPAY": (lambda e, a: build_psbt(e, a, sighash=0x81), 400, "sighash_not_all"),
    "txid that is not the tx's": (lambda e, a: (*build_psbt(e, a)[:1], "00" * 32, build_psbt(e, a)[2]), 400, "txid_mismatch"),
    # rule 3: an output paying exactly the amount to payTo
    "overpays": (lambda e, a: build_psbt(e, a, PRICE + 1000), 402, "wrong_amount"),
    "underpays": (lambda e, a: build_psbt(e, a, PRICE - 1), 402, "wrong_amount"),
    "pays elsewhere": (lambda e, a: build_psbt(e, ELSEWHERE, 1000), 402, "wrong_address"),
    # rules 4-6: the chain's facts
    "UTXO unknown": (lambda e, a: build_psbt(e, a, prev=(os.urandom(32), 0)), 402, "input_missing"),
    "witnessUtxo value lies": (lambda e, a: build_psbt(e, a, declared=1_000_000, change=990_000), 402,
                               "input_value_mismatch"),
    "witnessUtxo script lies": (lambda e, a: build_psbt(e, a, lie_script=True), 402, "input_value_mismatch"),
    # rule 7: duplicate inputs
    "duplicate input": (lambda e, a: build_psbt(e, a, duplicate=True, change=190_000), 400, "duplicate_input"),
    # rule 8: fee bounds
    "fee too low": (lambda e, a: build_psbt(e, a, change=100_000 - PRICE), 402, "fee_too_low"),
    "fee too high": (lambda e, a: build_psbt(e, a, fund=5_000_000, change=1_000), 402, "fee_too_high"),
    # rules 9-10: timelocks
    "nLockTime": (lambda e, a: build_psbt(e, a, locktime=800_000), 402, "locktime"),
    "relative timelock": (lambda e, a: build_psbt(e, a, sequence=10), 402, "relative_timelock"),
    # rule 12 (the draft's 11): dust
    "dust change": (lambda e, a: build_psbt(e, a, outputs=[(100, ELSEWHERE)]), 402, "dust"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_rule_refuses_and_changes_nothing(http, url, esplora, ledger, case):
    make, status, code = CASES[case]
    required, exact = await challenge(http, url)
    psbt, txid, payer = make(esplora, exact["payTo"])
    before = await books(ledger)
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, exact, psbt, txid, payer)}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (status, code), body
        failure = json.loads(base64.b64decode(r.headers["PAYMENT-RESPONSE"]))
        assert failure["success"] is False and failure["errorReason"] == code and failure["network"] == exact["network"]
    assert esplora.broadcasts == [] and await books(ledger) == before


async def test_the_network_and_the_spent_input_rules(http, url, esplora, ledger):
    required, exact = await challenge(http, url)
    psbt, txid, payer = build_psbt(esplora, exact["payTo"])
    wrong = {**exact, "network": "bip122:000000000019d6689c085ae165831e93"}  # rule 13: mainnet
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, wrong, psbt, txid, payer)}) as r:
        assert r.status == 402 and (await r.json())["error"] == "wrong_network"
    prev = esplora.fund(100_000)
    esplora.spends[(prev[0].hex(), prev[1])] = "ab" * 32  # rule 5: the UTXO is spent already
    esplora.index["ab" * 32] = {"txid": "ab" * 32, "status": {"confirmed": True, "block_height": 1},
                                "vin": [{"txid": prev[0].hex(), "vout": prev[1]}], "vout": []}
    psbt, txid, payer = build_psbt(esplora, exact["payTo"], prev=prev)
    async with http.post(url, data=MANIFEST, headers={"PAYMENT-SIGNATURE": signature(required, exact, psbt, txid, payer)}) as r:
        assert r.status == 402 and (await r.json())["error"] in ("input_spent", "input_value_mismatch")
    assert esplora.broadcasts == []
