"""On-chain payment of one call (21's OnChain): transactions built for real with bitcoinlib."""
from __future__ import annotations

import asyncio
import os

import pytest

from service.config import DEFAULT_TESTNET_ADDRESS
from service.ledger import BITCOIN, REVENUE, onchain_account
from service.payment_auth import receipt_reference

MANIFEST = b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n"
PRICE = 120


def pay(esplora, address: str, amount: int, *, extra_output: str | None = None, change: int = 90_000,
        fund: int = 100_000, prev: tuple[bytes, int] | None = None, locktime: int = 0,
        sequence: int = 0xFFFFFFFF, outputs: list[tuple[int, str]] | None = None) -> tuple[str, str]:
    """A signed testnet transaction paying `amount` to `address` from a confirmed output the fake Esplora
    knows (`fund` sat, or `prev`); (raw hex, txid)."""
    from bitcoinlib.keys import HDKey
    from bitcoinlib.transactions import Transaction

    payer = HDKey(network="testnet", witness_type="segwit")
    prev_txid, vout = prev or esplora.fund(fund)
    tx = Transaction(network="testnet", witness_type="segwit", locktime=locktime)
    tx.add_input(prev_txid=prev_txid, output_n=vout, keys=payer, value=fund, witness_type="segwit", sequence=sequence)
    tx.add_output(amount, address)
    for value, to in outputs or []:
        tx.add_output(value, to)
    if change:
        tx.add_output(change, extra_output or payer.address())
    tx.sign_and_update()
    return tx.raw_hex(), tx.txid


@pytest.fixture
async def url(aiohttp_server, chain_app) -> str:
    server = await aiohttp_server(chain_app())
    return str(server.make_url("/v1/qa/validate"))


async def invoice_address(http, url) -> str:
    async with http.post(url, data=MANIFEST) as r:
        assert r.status == 402
        body = await r.json()
    assert r.headers["Bitcoin-Address"] == body["invoice"]["address"]  # 21's OnChain pays this address
    return r.headers["Bitcoin-Address"]


async def test_onchain_payment_is_served_once(http, url, esplora, ledger, operator_key):
    address = await invoice_address(http, url)
    assert address == operator_key.subkey_for_path("0/0").address()  # derived from the vpub, index 0
    raw, txid = pay(esplora, address, 600)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200, await r.text()
        assert receipt_reference(r.headers["Payment-Receipt"]) == f"tx_{txid}"
    assert esplora.broadcasts == [raw]
    # the whole 600 sat entered the books: the price is revenue, the rest waits in the payment's account
    assert (await ledger.balance(REVENUE)).posted == PRICE and (await ledger.balance(BITCOIN)).posted == -600
    assert (await ledger.balance(onchain_account(txid))).available == 600 - PRICE
    assert (await ledger.transfer(f"coin:{txid}:0"))["amount"] == "600"
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200 and r.headers["Idempotent-Replayed"] == "true"  # the kept result, uncharged
    assert (await ledger.balance(REVENUE)).posted == PRICE
    assert (await ledger.reconcile()).ok


@pytest.mark.parametrize("case,status,code", [
    ("underpaid", 402, "underpaid"),
    ("wrong address", 402, "wrong_address"),
    ("dust", 402, "dust"),
    ("malformed hex", 400, "malformed_transaction"),
    ("not a transaction", 400, "malformed_transaction"),
])
async def test_bad_onchain_payments_change_nothing(http, url, esplora, ledger, case, status, code):
    address = await invoice_address(http, url)
    raw = {
        "underpaid": lambda: pay(esplora, address, 100)[0],
        "wrong address": lambda: pay(esplora, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600)[0],
        "dust": lambda: pay(esplora, address, 300)[0],   # covers the price but is below the dust limit
        "malformed hex": lambda: "zz" * 40,
        "not a transaction": lambda: "00" * 40,
    }[case]()
    journal = await ledger.redis.xlen(ledger.journal_key)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (status, code), body
    assert esplora.broadcasts == [] and await ledger.redis.xlen(ledger.journal_key) == journal


async def test_refused_broadcast_records_nothing_and_the_same_tx_can_be_retried(http, url, esplora, ledger):
    address = await invoice_address(http, url)
    raw, _ = pay(esplora, address, 600)
    esplora.reject = "sendrawtransaction RPC error: {\"code\":-26,\"message\":\"min relay fee not met\"}"
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (400, "broadcast_rejected") and "min relay fee" in body["detail"]
    assert (await ledger.balance(REVENUE)).posted == 0
    esplora.reject = None
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200
    assert (await ledger.reconcile()).ok


async def test_failed_call_keeps_the_coins_on_the_books(http, esplora, ledger, aiohttp_server, chain_app):
    from aiohttp import web

    from service.pricing import priced

    @priced("qa.validate")
    async def boom(request: web.Request) -> web.Response:
        return web.json_response({"error": "busy"}, status=503)

    app = chain_app()
    app.router.add_post("/test/boom", boom)
    server = await aiohttp_server(app)
    url = str(server.make_url("/test/boom"))
    async with http.post(url, data=b"{}") as r:
        address = r.headers["Bitcoin-Address"]
    raw, txid = pay(esplora, address, 600)
    async with http.post(url, data=b"{}", headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 503
    assert (await ledger.balance(REVENUE)).posted == 0
    assert (await ledger.balance(onchain_account(txid))).available == 600   # kept for a refund
    assert (await ledger.balance(BITCOIN)).posted == -600
    assert (await ledger.reconcile()).ok


async def test_price_above_the_zeroconf_limit_offers_no_onchain_payment(http, aiohttp_server, chain_app, esplora):
    server = await aiohttp_server(chain_app(onchain_max_zeroconf=100))
    async with http.post(server.make_url("/v1/qa/validate"), data=MANIFEST) as r:
        body = await r.json()
    assert [a["scheme"] for a in body["accepts"]] == ["bittransfer"]
    assert body["invoice"]["address"] == DEFAULT_TESTNET_ADDRESS  # no invoice address leased: no on-chain payment
    raw, _ = pay(esplora, r.headers["Bitcoin-Address"], 600)
    async with http.post(server.make_url("/v1/qa/validate"), data=MANIFEST,
                         headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "zeroconf_limit"


async def test_invoices_never_share_an_address_when_the_pool_is_leased(http, aiohttp_server, chain_app):
    """Attack: 30 anonymous 402s in a row; the 21st+ used to get an address already leased to another
    invoice. Now each address is one invoice's; past the gap limit the 402 offers no on-chain payment.
    (One client here, so without the per-client cap: tests/chain/test_invoice_pool.py.)"""
    url = (await aiohttp_server(chain_app(invoice_addresses_per_client=0))).make_url("/v1/qa/validate")
    addresses = [await invoice_address(http, url) for _ in range(20)]
    assert len(set(addresses)) == 20  # one per outstanding invoice, up to the gap limit
    for _ in range(10):
        async with http.post(url, data=MANIFEST) as r:
            body = await r.json()
        assert r.status == 402 and [a["scheme"] for a in body["accepts"]] == ["bittransfer"]
        assert body["invoice"]["address"] not in addresses


async def test_client_pays_on_chain_through_a_signer_callback(http, url, esplora, ledger):
    from service.client import PaidSession

    signed: list[tuple[str, int]] = []

    async def signer(address: str, amount: int) -> str:
        signed.append((address, amount))
        return pay(esplora, address, max(amount, 600))[0]

    async with PaidSession(max_price=500, onchain_signer=signer, session=http) as s:
        status, body, headers = await s.request("POST", url, data=MANIFEST)
    assert status == 200 and receipt_reference(headers["Payment-Receipt"]).startswith("tx_") and signed[0][1] == PRICE
    assert s.payments[0].amount == PRICE and len(esplora.broadcasts) == 1


# --- attacks: coins entering the ledger (issue 11, findings 1 and 2) -----------------------------------
@pytest.fixture
def book(ledger, settings, operator_key):
    from service.chain.addresses import AddressBook

    return AddressBook(ledger.redis, settings.redis_prefix, operator_key.public().wif(), settings.network)


async def books(ledger) -> tuple[int, int]:
    """(journal length, sats the chain account gave out): what an attack must leave unchanged."""
    return await ledger.redis.xlen(ledger.journal_key), -(await ledger.balance(BITCOIN)).posted


async def test_someone_elses_mined_deposit_pays_no_call(http, url, esplora, ledger, book, funded):
    """Attack: a victim's deposit tx, mined and credited, sent as Bitcoin-Transaction by someone else."""
    from service.chain.backends import Esplora
    from service.chain.watcher import credit_deposits

    victim = await funded(0)
    deposit = await book.deposit_address(victim.username)
    raw, txid = pay(esplora, deposit, 150_000, fund=250_000)
    await Esplora(esplora.url).broadcast(raw)               # the victim's own wallet broadcast it
    esplora.mine(txid, 3)
    assert await credit_deposits(book, Esplora(esplora.url), ledger, 3) == 1
    before = await books(ledger)
    await invoice_address(http, url)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert r.status == 402 and body["error"] == "wrong_address", body
    assert await books(ledger) == before == (before[0], 150_000)
    assert (await ledger.balance(REVENUE)).posted == 0


async def test_a_tx_the_network_knows_pays_only_when_we_broadcast_it_for_this_invoice(http, url, esplora, ledger):
    """Attack: a tx paying an invoice address, broadcast by its sender (or anyone) before the call: the
    node answers "already known", which is no payment. Our own broadcast whose answer was lost is."""
    from service.chain.backends import Esplora

    address = await invoice_address(http, url)
    raw, _ = pay(esplora, address, 600)
    await Esplora(esplora.url).broadcast(raw)
    before = await books(ledger)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert r.status == 402 and body["error"] == "input_spent", body
    assert await books(ledger) == before
    # our own broadcast: the network took it, every answer was lost: 503, then the retry is served once
    address = await invoice_address(http, url)
    raw, txid = pay(esplora, address, 600)
    esplora.lose_answers = 3
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 503 and (await r.json())["error"] == "chain_unavailable"
    assert txid in esplora.index and await books(ledger) == before
    esplora.lose_answers = 0
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200, await r.text()
        assert receipt_reference(r.headers["Payment-Receipt"]) == f"tx_{txid}"
    assert (await books(ledger))[1] == 600 and (await ledger.balance(REVENUE)).posted == PRICE
    assert (await ledger.reconcile()).ok


async def test_a_paid_invoice_address_pays_no_second_request(http, url, esplora, ledger):
    """Attack: a second, different tx paying an already-paid invoice's address, with the same request
    (same invoice) or another one."""
    address = await invoice_address(http, url)
    raw, _ = pay(esplora, address, 600)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200
    before = await books(ledger)
    for body in (MANIFEST, MANIFEST + b"---\n"):
        raw2, _ = pay(esplora, address, 600)
        async with http.post(url, data=body, headers={"Bitcoin-Transaction": raw2}) as r:
            answer = await r.json()
            assert r.status == 402 and answer["error"] in ("invoice_paid", "invoice_mismatch"), answer
    assert await books(ledger) == before and len(esplora.broadcasts) == 1


async def test_another_or_an_expired_invoices_address_pays_nothing(http, esplora, ledger, aiohttp_server, chain_app):
    server = await aiohttp_server(chain_app(invoice_ttl=4))  # long enough for the steps before expiry under load
    url = str(server.make_url("/v1/qa/validate"))
    other = MANIFEST.replace(b"name: a", b"name: b")
    mine = await invoice_address(http, url)
    async with http.post(url, data=other) as r:
        theirs = r.headers["Bitcoin-Address"]
        their_invoice = (await r.json())["invoice"]["id"]
    before = await books(ledger)
    raw, _ = pay(esplora, theirs, 600)   # another request's invoice address, found by its lease
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "invoice_mismatch"
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw, "Payment-Invoice": their_invoice}) as r:
        assert r.status == 402 and (await r.json())["error"] == "invoice_mismatch"
    raw, _ = pay(esplora, mine, 600, outputs=[(600, theirs)])   # pays two invoices at once: one would be lost
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "foreign_outputs"
    await asyncio.sleep(4.1)             # the invoice expired (its address is still leased: grace)
    raw, _ = pay(esplora, mine, 600)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "invoice_expired"
    assert await books(ledger) == before and esplora.broadcasts == []


async def test_paying_a_call_to_ones_own_deposit_address_counts_once(http, url, esplora, ledger, book, funded):
    """Attack: pay a call to one's own deposit address; once mined chainwatch would credit it again."""
    from service.chain.backends import Esplora
    from service.chain.watcher import credit_deposits
    from service.ledger import user_account

    alice = await funded(0)
    deposit = await book.deposit_address(alice.username)
    await invoice_address(http, url)
    raw, txid = pay(esplora, deposit, 10_000)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 402 and (await r.json())["error"] == "wrong_address"
    await Esplora(esplora.url).broadcast(raw)               # she sends it anyway: it is a deposit
    esplora.mine(txid, 3)
    await credit_deposits(book, Esplora(esplora.url), ledger, 3)
    assert (await ledger.balance(user_account(alice.username))).posted == 10_000
    assert (await ledger.balance(REVENUE)).posted == 0 and (await books(ledger))[1] == 10_000


def _unsigned(esplora, address):
    from bitcoinlib.transactions import Transaction

    prev, vout = esplora.fund(100_000)
    tx = Transaction(network="testnet", witness_type="segwit")
    tx.add_input(prev_txid=prev, output_n=vout, value=100_000, witness_type="segwit",
                 address="tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty")
    tx.add_output(600, address)
    return tx.raw_hex()


def _duplicate_input(esplora, address):
    from bitcoinlib.keys import HDKey
    from bitcoinlib.transactions import Transaction

    key = HDKey(network="testnet", witness_type="segwit")
    prev, vout = esplora.fund(100_000)
    tx = Transaction(network="testnet", witness_type="segwit")
    for _ in range(2):
        tx.add_input(prev_txid=prev, output_n=vout, keys=key, value=100_000, witness_type="segwit")
    tx.add_output(600, address)
    tx.add_output(190_000, key.address())
    tx.sign_and_update()
    return tx.raw_hex()


def _spent(esplora, address):
    prev = esplora.fund(100_000)
    from bitcoinlib.transactions import Transaction

    first, _ = pay(esplora, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 5_000, prev=prev)
    esplora.accept(Transaction.parse_hex(first, network="testnet"), height=esplora.tip)
    return pay(esplora, address, 600, prev=prev)[0]   # a double spend of a mined input


@pytest.mark.parametrize("case,status,code", [
    ("input the chain does not know", 402, "input_missing"),
    ("input already spent", 402, "input_spent"),
    ("duplicate input", 400, "duplicate_input"),
    ("unsigned input", 400, "unsigned_input"),
    ("nLockTime set", 402, "locktime"),
    ("relative timelock", 402, "relative_timelock"),
    ("no fee", 402, "fee_too_low"),
    ("outputs above the inputs", 402, "fee_too_low"),
    ("absurd fee", 402, "fee_too_high"),
    ("too many outputs", 400, "too_many_parts"),
])
async def test_exact_btc_rules_refuse_and_change_nothing(http, url, esplora, ledger, case, status, code):
    address = await invoice_address(http, url)
    raw = {
        "input the chain does not know": lambda: pay(esplora, address, 600, prev=(os.urandom(32), 0))[0],
        "input already spent": lambda: _spent(esplora, address),
        "duplicate input": lambda: _duplicate_input(esplora, address),
        "unsigned input": lambda: _unsigned(esplora, address),
        "nLockTime set": lambda: pay(esplora, address, 600, locktime=esplora.tip)[0],
        "relative timelock": lambda: pay(esplora, address, 600, sequence=10)[0],
        "no fee": lambda: pay(esplora, address, 600, change=99_400)[0],
        "outputs above the inputs": lambda: pay(esplora, address, 600, change=150_000)[0],
        "absurd fee": lambda: pay(esplora, address, 600, fund=5_000_000, change=1_000)[0],
        "too many outputs": lambda: pay(esplora, address, 600, change=0,
                                        outputs=[(1_000, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty")] * 50)[0],
    }[case]()
    before = await books(ledger)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (status, code), body
    assert esplora.broadcasts == [] and await books(ledger) == before


async def test_weight_and_network_rules(esplora):
    from service.payments import btc_rules as R

    raw, _ = pay(esplora, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600)
    tx = R.parse(raw, "testnet")
    rules = R.Rules(network="testnet", caip2="bip122:000000000933ea01ad0ee984209779ba")
    assert R.check_static(tx, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600, rules) is None
    heavy = R.Rules(network="testnet", max_weight=400)
    assert R.check_static(tx, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600, heavy).code == "too_heavy"
    assert R.check_static(tx, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 600, rules,
                          network="bip122:000000000019d6689c085ae165831e93").code == "wrong_network"
    assert R.check_chain(tx, {}, rules, replayed=True).code == "payment_replayed"


# --- finding 2: every on-chain payment has an owner; nothing it paid is lost -----------------------------
def signer_for(esplora, amount_paid: int | None = None):
    async def signer(address: str, amount: int) -> str:
        return pay(esplora, address, amount_paid or max(amount, 600))[0]
    return signer


async def test_a_qa_run_paid_on_chain_belongs_to_the_account_that_signed(http, esplora, ledger, aiohttp_server,
                                                                        chain_app, funded):
    """Attack/loss: a QA run paid anonymously on chain was owned by '' and nobody could ever read it."""
    import json

    from service.client import PaidSession

    server = await aiohttp_server(chain_app())
    runs = str(server.make_url("/v1/qa/runs"))
    body = json.dumps({"suite": "schema", "manifests": MANIFEST.decode()})
    async with http.post(runs, data=body, headers={"Content-Type": "application/json"}) as r:
        raw, _ = pay(esplora, r.headers["Bitcoin-Address"], int(r.headers["Price"]))
    before = await books(ledger)
    async with http.post(runs, data=body, headers={"Content-Type": "application/json", "Bitcoin-Transaction": raw}) as r:
        answer = await r.json()
        assert r.status == 401 and answer["error"] == "account_required", answer
    assert esplora.broadcasts == [] and await books(ledger) == before
    alice = await funded(0)
    async with PaidSession(alice, max_price=10_000, onchain_signer=signer_for(esplora), session=http) as s:
        status, run, headers = await s.request("POST", runs, data=body, headers={"Content-Type": "application/json"})
        assert status == 202, run
        status, view = await s.signed_get(str(server.make_url(f"/v1/qa/runs/{run['id']}")))
    assert status == 200 and view["receipt"] == receipt_reference(headers["Payment-Receipt"])


async def test_an_expert_question_is_not_paid_on_chain(http, esplora, ledger, aiohttp_server, chain_app, funded):
    """A question's price funds an escrow (refunded to the asker, paid to the expert): unconfirmed coins
    never reach it (test_zeroconf.py); the client is told to deposit first, nothing is broadcast or booked."""
    import json

    from service.client import PaidSession, PaymentRejected

    server = await aiohttp_server(chain_app())
    base = str(server.make_url("")).rstrip("/")
    alice, bob = await funded(0), await funded(0)
    async with PaidSession(bob, session=http) as s:
        status, _ = await s.signed("PUT", f"{base}/v1/experts/me",
                                   {"display_name": "Bob", "tags": ["k8s"], "price": 5_000, "reply_hours": 24})
        assert status == 200
    async with PaidSession(alice, max_price=10_000, onchain_signer=signer_for(esplora, 6_000), session=http) as s:
        with pytest.raises(PaymentRejected) as refused:
            await s.request("POST", f"{base}/v1/experts/{bob.username}/questions",
                            data=json.dumps({"text": "How do I drain a node?"}),
                            headers={"Content-Type": "application/json"})
    assert refused.value.status == 402 and refused.value.reason == "zeroconf_not_accepted"
    assert esplora.broadcasts == [] and (await books(ledger))[1] == 0
    assert (await ledger.reconcile()).ok


async def _cli(settings, esplora, operator_key, *args: str) -> tuple[int, str]:
    import sys

    env = {**os.environ, "REDIS_URL": settings.redis_url, "REDIS_PREFIX": settings.redis_prefix,
           "PAYEE_XPUB": operator_key.public().wif(), "CHAIN": "esplora", "CHAIN_URL": esplora.url,
           "NETWORK": "testnet", "DEPOSIT_CONFIRMATIONS": "3"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_an_anonymous_overpayment_is_booked_and_the_operator_settles_it(http, url, esplora, ledger, funded,
                                                                             settings, operator_key):
    """Loss: 50,000 sat paid for a 120 sat call booked 120; 49,880 were booked nowhere."""
    import json

    from service.ledger import user_account

    address = await invoice_address(http, url)
    raw, txid = pay(esplora, address, 50_000, fund=200_000, change=140_000)
    async with http.post(url, data=MANIFEST, headers={"Bitcoin-Transaction": raw}) as r:
        assert r.status == 200
    assert (await books(ledger))[1] == 50_000 and (await ledger.balance(REVENUE)).posted == PRICE
    rc, out = await _cli(settings, esplora, operator_key, "unclaimed", "list")
    assert rc == 0 and [(u["txid"], u["available"], u["payer"]) for u in json.loads(out)] == [(txid, 49_880, None)]
    bob = await funded(0)
    rc, out = await _cli(settings, esplora, operator_key, "unclaimed", "refund", txid, "--to", bob.username)
    assert rc == 0 and json.loads(out)["amount"] == 49_880
    rc, out = await _cli(settings, esplora, operator_key, "unclaimed", "refund", txid, "--to", bob.username)
    assert (await ledger.balance(user_account(bob.username))).posted == 49_880
    rc, out = await _cli(settings, esplora, operator_key, "unclaimed", "list")
    assert json.loads(out) == []
    rc, out = await _cli(settings, esplora, operator_key, "reconcile", "--chain")
    assert rc == 0, out
    coins_in = json.loads(out)["chain"]["in"]
    assert (coins_in["booked"], coins_in["booked_sat"], coins_in["received"], coins_in["received_sat"]) == (
        1, 50_000, 1, 50_000)


async def test_reconcile_chain_finds_coins_booked_but_never_received_and_received_but_never_booked(
        http, url, esplora, ledger, settings, operator_key, funded):
    """The audits' chain losses passed `reconcile`: now the chain boundary is checked."""
    import json

    from service.ledger import coin_id, user_account

    mallory = await funded(0)
    fake = os.urandom(32).hex()
    await ledger.post(coin_id(fake, 0), BITCOIN, user_account(mallory.username), 161_600, reason="double booking")
    rc, out = await _cli(settings, esplora, operator_key, "reconcile", "--chain")
    report = json.loads(out)
    assert rc == 1 and report["mismatches"] == [] and any(fake in d for d in report["chain"]["in"]["mismatches"])
    # and the other way: coins reach an invoice address but pay no call (sent late, broadcast by the sender)
    await ledger.post(f"undo:{fake}", user_account(mallory.username), BITCOIN, 161_600)
    address = await invoice_address(http, url)
    raw, txid = pay(esplora, address, 7_000)
    from bitcoinlib.transactions import Transaction
    esplora.accept(Transaction.parse_hex(raw, network="testnet"), height=esplora.tip - 3)
    rc, out = await _cli(settings, esplora, operator_key, "reconcile", "--chain")
    differences = json.loads(out)["chain"]["in"]["mismatches"]
    assert rc == 1 and any(txid in d and "booked nowhere" in d for d in differences), differences
    rc, out = await _cli(settings, esplora, operator_key, "chainwatch", "--once")
    assert rc == 0 and json.loads(out)["strays"] == 1, out
    rc, out = await _cli(settings, esplora, operator_key, "unclaimed", "list")
    assert [(u["txid"], u["available"]) for u in json.loads(out)] == [(txid, 7_000)]


async def test_two_deployments_never_derive_the_same_addresses(http, aiohttp_server, chain_app, funded, settings):
    """Attack: two deployments (REDIS_PREFIX) with one PAYEE_XPUB handed out the same deposit address and
    both credited its outputs in full. Now the second refuses to start until it has its own branch."""
    from service.chain.addresses import AddressConflict
    from service.client import PaidSession

    first = await aiohttp_server(chain_app())
    other_prefix = settings.redis_prefix + "-b"
    with pytest.raises(AddressConflict, match="PAYEE_BRANCH"):
        await aiohttp_server(chain_app(redis_prefix=other_prefix))
    with pytest.raises(AddressConflict, match="cannot change"):   # nor may the first one move its branch
        await aiohttp_server(chain_app(payee_branch=3))
    second = await aiohttp_server(chain_app(redis_prefix=other_prefix, payee_branch=2))
    addresses = []
    for server in (first, second):
        base = str(server.make_url("")).rstrip("/")
        async with http.post(f"{base}/v1/qa/validate", data=MANIFEST) as r:
            addresses.append(r.headers["Bitcoin-Address"])
    assert addresses[0] != addresses[1]
