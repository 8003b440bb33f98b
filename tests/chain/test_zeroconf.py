"""Zero-confirmation on-chain payments never become money a user can move: routes that fund an escrow
(paid on to a third party, refunded to the asker) refuse them; a call payment whose transaction then
vanishes is reversed in the open by chainwatch; the withdrawal batch is not built over unbacked coins."""
from __future__ import annotations

import json

from service.client import signed_headers
from service.ledger import BITCOIN, REVENUE, onchain_account, user_account
from service.metrics import REGISTRY

from .test_onchain import MANIFEST, pay

PRICE = 50_000
DEST = "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty"


async def _expert(rig) -> object:
    expert = await rig.user(0)
    status, body = await rig.signed(expert, "PUT", "/v1/experts/me",
                                    {"display_name": "Any expert", "tags": ["networking"], "price": PRICE,
                                     "reply_hours": 24})
    assert status == 200, body
    return expert


def drop(esplora, txid: str) -> None:
    """The transaction is double-spent: the node forgets it, its outputs never show."""
    esplora.index.pop(txid, None)
    for txs in esplora.txs.values():
        txs[:] = [t for t in txs if t["txid"] != txid]
    for utxos in esplora.utxos.values():
        utxos[:] = [u for u in utxos if u["txid"] != txid]
    esplora.spends = {k: v for k, v in esplora.spends.items() if v != txid}


async def test_an_unconfirmed_tx_never_funds_an_escrow_the_asker_can_withdraw(chain_rig):
    """Attack (a07c): ask a 50,000 sat expert with a 0-conf tx, withdraw the question at once (the escrow
    is refunded to the asker's balance), double-spend the tx, withdraw the balance: paid from others' coins."""
    rig = await chain_rig(minimum_withdrawal=1000)
    asker, expert = await rig.user(0), await _expert(rig)
    path = f"/v1/experts/{expert.username}/questions"
    url, body = f"{rig.url}{path}", json.dumps({"text": "how do I pay with an unconfirmed tx?"}).encode()
    async with rig.http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 402
        challenge = await r.json()
    assert [a["scheme"] for a in challenge["accepts"]] == ["bittransfer"]  # no on-chain (exact-BTC) offer here
    assert "Price" in r.headers  # 21's headers stay (BitTransfer)
    leased = (await rig.book.infos([r.headers["Bitcoin-Address"], challenge["invoice"]["address"]])).values()
    assert "invoice" not in [i.get("purpose") for i in leased]  # no invoice address leased for it either
    async with rig.http.get(f"{rig.url}/.well-known/x402") as r:              # nor does discovery
        items = {i["resource"].rsplit("/v1/", 1)[1]: i for i in (await r.json())["items"]}
    assert not [path for path in items if "{" in path]  # expert-priced routes have no one amount to list
    assert "exact" not in [a["scheme"] for a in items["qa/validate"]["accepts"]]  # 120 sat: below P2WPKH dust
    # a tx sent anyway (to an address an invoice would lease) is refused before anything is broadcast
    address = await rig.book.for_invoice(600)
    raw, txid = pay(rig.esplora, address, PRICE, fund=100_000, change=40_000)
    headers = {**signed_headers(asker, "POST", url, body), "Content-Type": "application/json",
               "Bitcoin-Transaction": raw, "Payment-Invoice": challenge["invoice"]["id"]}
    async with rig.http.post(url, data=body, headers=headers) as r:
        refused = await r.json()
        assert r.status == 402, refused
    assert refused["error"] == "zeroconf_not_accepted" and "deposit first" in refused["detail"]
    assert rig.esplora.broadcasts == []                                   # nothing broadcast
    assert await rig.ledger.transfer(f"coin:{txid}:0") is None            # nothing booked
    assert await rig.ledger.balance(onchain_account(txid)) is None
    status, me = await rig.signed(asker, "GET", "/v1/accounts/me")
    assert status == 200 and me["balance"] == 0
    status, body = await rig.signed(asker, "POST", "/v1/accounts/me/withdrawals", {"amount": PRICE, "address": DEST})
    assert status in (402, 409), body                                       # nothing to withdraw
    assert (await rig.ledger.reconcile()).ok


async def pay_call_zeroconf(rig, amount: int = 600) -> str:
    """A revenue call (qa/validate, 120 sat) paid with an unconfirmed tx of `amount` sat: its txid."""
    url = f"{rig.url}/v1/qa/validate"
    async with rig.http.post(url, data=MANIFEST) as r:
        assert r.status == 402
        address = (await r.json())["invoice"]["address"]
    raw, txid = pay(rig.esplora, address, amount)
    async with rig.http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200, await r.text()
    return txid


async def test_no_batch_pays_out_coins_the_chain_never_paid_us(chain_rig, tmp_path):
    """Attack (a07b): coins booked for a tx that was then double-spent; the next batch would pay them out
    of an honest user's deposit. The builder refuses while the IN side of the chain audit is short."""
    rig = await chain_rig(minimum_withdrawal=1000)
    await rig.float_coins(500_000)
    alice = await rig.user(100_000)
    status, body = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 40_000, "address": DEST})
    assert status == 201, body
    txid = await pay_call_zeroconf(rig)
    drop(rig.esplora, txid)
    rc, _, _ = await rig.cli("reconcile")
    assert rc == 0                                                          # the ledger alone cannot see it
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"))
    assert rc == 1 and "never paid us" in err and txid in err, (out, err)
    assert await rig.payouts.built_batches() == [] and not (tmp_path / "b.psbt").exists()
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"), "--force")
    assert rc == 0, err                                                     # the operator's explicit choice
    assert json.loads(out)["txid"] in await rig.payouts.built_batches()


async def test_a_vanished_call_payment_is_reversed_in_the_open(chain_rig, tmp_path):
    """A revenue call paid at zero confirmations (the operator's own risk), then double-spent: chainwatch
    sees it, takes the coins back to the chain account (rest from the payment account, the price from
    revenue), logs an error and counts it; the chain audit balances again and batches are built again."""
    rig = await chain_rig(minimum_withdrawal=1000)
    await rig.float_coins(500_000)
    alice = await rig.user(100_000)
    status, _ = await rig.signed(alice, "POST", "/v1/accounts/me/withdrawals", {"amount": 40_000, "address": DEST})
    assert status == 201
    txid = await pay_call_zeroconf(rig, 600)                                # 120 sat price, 480 sat rest
    revenue = (await rig.ledger.balance(REVENUE)).posted
    rc, out, err = await rig.cli("chainwatch", "--once")
    assert rc == 0 and json.loads(out)["reorg"]["payments_vanished"] == 0, err  # in the mempool: fine
    drop(rig.esplora, txid)
    rc, out, err = await rig.cli("chainwatch", "--once")
    assert rc == 0, err
    assert json.loads(out)["reorg"]["payments_vanished"] == 1
    assert "onchain_payment_vanished" in err and txid in err
    rest, price = await rig.ledger.transfer(f"reorg:{txid}:0"), await rig.ledger.transfer(f"reorg:{txid}:0:+481")
    assert (rest["debit"], rest["credit"], int(rest["amount"])) == (onchain_account(txid), BITCOIN, 480)
    assert (price["debit"], price["credit"], int(price["amount"])) == (REVENUE, BITCOIN, 120)
    assert (await rig.ledger.balance(REVENUE)).posted == revenue - 120        # the loss, shown to the operator
    assert (await rig.ledger.balance(onchain_account(txid))).posted == 0
    rc, out, err = await rig.cli("chainwatch", "--once")                     # nothing twice
    assert rc == 0 and json.loads(out)["reorg"]["payments_vanished"] == 0
    assert (await rig.ledger.balance(REVENUE)).posted == revenue - 120
    rc, out, _ = await rig.cli("reconcile", "--chain")
    assert json.loads(out)["chain"]["in"]["ok"], out
    rc, out, err = await rig.cli("withdrawals", "batch", "--out", str(tmp_path / "b.psbt"))
    assert rc == 0, err                                                     # backed again: the queue is paid
    assert (await rig.ledger.balance(user_account(alice.username))).posted == 100_000


async def test_the_vanished_payments_metric_counts(chain_rig):
    from service.chain.backends import Esplora
    from service.chain.reorgs import recheck_deposits

    """...and a vanished payment that confirms after all is given back where it was taken from."""
    rig = await chain_rig()
    txid = await pay_call_zeroconf(rig, 600)
    revenue = (await rig.ledger.balance(REVENUE)).posted
    tx = rig.esplora.index[txid]
    drop(rig.esplora, txid)
    before = REGISTRY.get_sample_value("microtasks_onchain_payments_vanished_total") or 0
    backend = Esplora(rig.esplora.url, timeout=5, retries=0)
    try:
        stats = await recheck_deposits(rig.ledger, backend, rig.payouts, confirmations=3, safe_depth=6)
        assert stats["payments_vanished"] == 1
        assert REGISTRY.get_sample_value("microtasks_onchain_payments_vanished_total") == before + 1
        assert (await rig.ledger.balance(REVENUE)).posted == revenue - 120
        tx["status"] = {"confirmed": True, "block_height": rig.esplora.tip - 2}  # mined after all: 3 confirmations
        rig.esplora.index[txid] = tx
        rig.esplora.txs.setdefault(tx["vout"][0]["scriptpubkey_address"], []).append(tx)
        stats = await recheck_deposits(rig.ledger, backend, rig.payouts, confirmations=3, safe_depth=6)
    finally:
        await backend.close()
    assert stats["payments_restored"] == 1 and stats["payments_vanished"] == 0
    assert (await rig.ledger.balance(REVENUE)).posted == revenue
    assert (await rig.ledger.balance(onchain_account(txid))).posted == 480
    assert (await rig.ledger.reconcile()).ok
