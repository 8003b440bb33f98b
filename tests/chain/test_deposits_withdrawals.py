"""Deposits credited exactly once at N confirmations; withdrawal batches as PSBTs the operator signs."""
from __future__ import annotations

import asyncio

from service.chain.addresses import AddressBook
from service.chain.backends import Esplora
from service.chain.batch import BatchError, broadcast_batch, build_batch
from service.chain.watcher import credit_deposits
from service.client import PaidSession
from service.ledger import BITCOIN, user_account
from service.payouts import Payouts

import pytest


@pytest.fixture
def rails(ledger, settings, esplora, operator_key):
    book = AddressBook(ledger.redis, settings.redis_prefix, operator_key.public().wif(), settings.network)
    payouts = Payouts(ledger.redis, settings.redis_prefix, ledger, network=settings.network, minimum_withdrawal=1000)
    return book, Esplora(esplora.url, timeout=5, retries=0), payouts


async def test_deposit_address_is_the_accounts_own(http, aiohttp_server, chain_app, funded):
    server = await aiohttp_server(chain_app())
    base = str(server.make_url("")).rstrip("/")
    from service.client import Wallet

    alice = Wallet.generate("dep-alice")
    async with PaidSession(alice, session=http) as s:
        await s.register(base)
        status, first = await s.signed_get(f"{base}/v1/accounts/me/deposit-address")
        _, again = await s.signed_get(f"{base}/v1/accounts/me/deposit-address")
    assert status == 200 and first["address"].startswith("tb1q") and first == again


async def test_deposit_is_credited_once_at_n_confirmations_even_with_two_watchers(rails, esplora, ledger, funded):
    book, backend, _ = rails
    alice = await funded(0)
    address = await book.deposit_address(alice.username)
    esplora.deposit(address, 25_000, height=None)                      # in the mempool
    assert await credit_deposits(book, backend, ledger, 3) == 0
    esplora.txs[address][0]["status"] = {"confirmed": True, "block_height": esplora.tip - 1}  # 2 confirmations
    assert await credit_deposits(book, backend, ledger, 3) == 0
    esplora.tip += 1                                                     # 3 confirmations
    results = await asyncio.gather(*[credit_deposits(book, backend, ledger, 3) for _ in range(2)])
    assert sorted(results) == [0, 1]
    assert await credit_deposits(book, backend, ledger, 3) == 0
    assert (await ledger.balance(user_account(alice.username))).posted == 25_000
    assert await book.deposit_address(alice.username) != address        # used: a fresh one next time
    assert (await ledger.reconcile()).ok


async def test_reorged_deposit_before_n_confirmations_is_never_credited(rails, esplora, ledger, funded):
    book, backend, _ = rails
    alice = await funded(0)
    address = await book.deposit_address(alice.username)
    esplora.deposit(address, 25_000, height=esplora.tip)               # 1 confirmation
    assert await credit_deposits(book, backend, ledger, 3) == 0
    esplora.txs[address].clear()                                         # the block was reorganised away
    esplora.tip += 5
    assert await credit_deposits(book, backend, ledger, 3) == 0
    assert (await ledger.balance(user_account(alice.username))).posted == 0


async def test_withdrawal_batch_psbt_pays_exactly_the_queue_then_settles(rails, esplora, ledger, funded, operator_key):
    from bitcoinlib.transactions import Transaction
    from embit import bip32
    from embit.networks import NETWORKS
    from embit.psbt import PSBT

    book, backend, payouts = rails
    alice, bob = await funded(80_000), await funded(50_000)
    # the operator's wallet holds a confirmed output on one of its deposit addresses
    funding = await book.deposit_address("operator-float")
    esplora.deposit(funding, 200_000, height=esplora.tip - 10)
    a = await payouts.withdraw(alice.username, 30_000, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty")
    b = await payouts.withdraw(bob.username, 45_000, "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm")
    batch = await build_batch(payouts, book, backend, fee_rate=2)
    psbt = PSBT.from_string(batch.psbt)
    tx = Transaction.parse_bytes(psbt.tx.serialize(), network="testnet")  # parses back with bitcoinlib
    outputs = [(o.address, int(o.value)) for o in tx.outputs]
    share = batch.fee // 2                                                # each withdrawal bears half the fee
    assert share * 2 == batch.fee and share > 0
    assert sorted(outputs[:2]) == [("tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty", 30_000 - share),
                                   ("tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm", 45_000 - share)]
    assert sum(v for _, v in outputs) + batch.fee == 200_000 and await book.owns(outputs[2][0])
    # a refused broadcast keeps the holds
    esplora.reject = "bad-txns-inputs-missingorspent"
    signer = bip32.HDKey.from_seed(bytes.fromhex("000102030405060708090a0b0c0d0e0f"), version=NETWORKS["test"]["xprv"])
    index = int((await book.info(funding))["index"])
    psbt.sign_with(signer.derive(f"m/84h/1h/0h/0/{index}"))
    with pytest.raises(BatchError):
        await broadcast_batch(payouts, backend, psbt.to_string())
    assert (await ledger.balance(user_account(alice.username))).pending_debits == 30_000
    esplora.reject = None
    result = await broadcast_batch(payouts, backend, psbt.to_string())
    assert result["txid"] == batch.txid and sorted(result["withdrawals"]) == sorted([a["id"], b["id"]])
    assert (await ledger.balance(user_account(alice.username))).posted == 50_000
    assert (await ledger.balance(user_account(bob.username))).posted == 5_000
    assert (await ledger.balance(BITCOIN)).posted == 75_000
    assert (await ledger.reconcile()).ok


async def test_batch_without_enough_confirmed_coins_is_refused(rails, esplora, funded):
    book, backend, payouts = rails
    alice = await funded(80_000)
    await payouts.withdraw(alice.username, 30_000, "tb1qs9s2swst702zygp94y2q3gaeykd80qm58tfrty")
    with pytest.raises(BatchError, match="needs"):
        await build_batch(payouts, book, backend)
