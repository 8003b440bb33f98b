"""Replay records (the ledger's `xfer:bt_*` hashes) live exactly as long as a replay could be accepted:
a signed transfer is refused as stale after its timestamp + TRANSFER_WINDOW, so its record expires
REPLAY_MARGIN later, never earlier; until then the same transfer is never charged twice."""
from __future__ import annotations

import asyncio
import base64
import json
import time

from service.keys import GRANTS, REVENUE
from service.ledger import AccountKind, Hold, user_account
from service.payment_auth import receipt_reference
from service.paywall import REPLAY_MARGIN

WINDOW = 6


def _signed(wallet, settings, url: str, timestamp: float, price: int) -> dict[str, str]:
    body = {"payer": wallet.username, "payer_pubkey": base64.b64encode(wallet.pubkey).decode() + "\n",
            "payee_address": settings.payee_address, "payee_username": settings.payee_username,
            "amount": price, "timestamp": timestamp, "description": url}
    transfer = json.dumps(body)
    return {"Bitcoin-Transfer": transfer, "Authorization": wallet.sign(transfer.encode())}


async def test_a_replay_just_inside_the_window_is_409_and_the_record_expires_after_it(
        aiohttp_server, make_app, http, admin_post, settings, ledger, manifest):
    from service.client import PaidSession, Wallet

    server = await aiohttp_server(make_app(transfer_window=WINDOW, hold_timeout=2))
    base = str(server.make_url("")).rstrip("/")
    wallet = Wallet.generate("replayer")
    async with PaidSession(wallet, max_price=0, session=http) as s:
        assert (await s.register(base))[0] == 201
    async with http.post(f"{base}/v1/admin/credits", json={"username": wallet.username, "amount": 1000, "reason": "t"},
                         headers={"Authorization": f"Bearer {settings.admin_token}"}) as r:
        assert r.status == 201
    url = f"{base}/v1/qa/validate"
    async with http.post(url, data=manifest) as r:
        assert r.status == 402
        price = int(r.headers["Price"])
    stamp = time.time() - WINDOW + 4  # valid for 4 more seconds
    headers = _signed(wallet, settings, url, stamp, price)
    async with http.post(url, data=manifest, headers=headers) as r:
        assert r.status == 200, await r.text()
        receipt = receipt_reference(r.headers["Payment-Receipt"])
    ttl_ms = await ledger.redis.pttl(ledger.keys.transfer(receipt))
    # expires REPLAY_MARGIN after the transfer's last valid moment: never before, and not kept forever
    last_valid_ms = (stamp + WINDOW - time.time()) * 1000
    assert last_valid_ms + REPLAY_MARGIN * 1000 - 2000 <= ttl_ms <= last_valid_ms + REPLAY_MARGIN * 1000 + 1000
    await asyncio.sleep(2.5)  # the kept response (hold_timeout) is gone; the transfer is still inside the window
    assert time.time() < stamp + WINDOW
    async with http.post(url, data=manifest, headers=headers) as r:
        assert r.status == 409 and (await r.json())["error"] == "payment_replayed"
    await asyncio.sleep(max(0.0, stamp + WINDOW - time.time()) + 0.5)
    async with http.post(url, data=manifest, headers=headers) as r:  # outside the window: stale
        assert r.status == 402 and (await r.json())["error"] == "stale_transfer"
    assert (await ledger.balance(user_account(wallet.username))).posted == 1000 - price  # charged once
    assert (await ledger.reconcile()).ok


async def test_a_hold_keeps_its_record_while_pending(ledger):
    """A record past its keep_until while its hold is still pending is kept until it resolves, then a minute."""
    await ledger.open_account(user_account("p"), AccountKind.USER)
    await ledger.post("grant-1", GRANTS, user_account("p"), 100)
    result = await ledger.hold("bt_x", user_account("p"), REVENUE, 10, timeout=30, keep_until=time.time() - 5)
    assert result.ok
    assert await ledger.redis.pttl(ledger.keys.transfer("bt_x")) == -1  # pending: no expiry
    await ledger.capture(Hold("bt_x", user_account("p"), REVENUE, 10))
    assert 55_000 <= await ledger.redis.pttl(ledger.keys.transfer("bt_x")) <= 60_000
