"""Receiving addresses derived from the operator's extended public key (BIP32/BIP84; the server never
holds a private key). Each invoice and each deposit gets its own index, allocated atomically in Redis
(INCR), so no two share an address across server processes. Invoice addresses that expire unpaid go
back to a pool and are handed out again, so the run of unused addresses stays within the gap limit
that wallets restored from the xpub scan."""
from __future__ import annotations

import hashlib
import ipaddress
import time
from functools import lru_cache
from typing import Any

import redis.asyncio as aioredis

from ..bitcoin import BITCOINLIB_NETWORK
from ..keys import Keys
from ..scripts import register

__all__ = ["AddressBook", "AddressConflict", "derive", "fingerprint", "REGISTRY_TAG"]

GAP_LIMIT = 20
REGISTRY_TAG = "{microtasks-xpubs}"  # one registry per Redis, across every REDIS_PREFIX (one key per claim)
LEASE_GRACE = 120  # seconds an invoice address stays leased after its invoice expired


@lru_cache(maxsize=8)
def _account_key(xpub: str, network: str) -> Any:
    from bitcoinlib.keys import HDKey  # noqa: PLC0415

    key = HDKey(xpub, network=BITCOINLIB_NETWORK[network])
    if key.is_private:
        raise ValueError("PAYEE_XPUB must be an extended PUBLIC key; the server never holds private keys")
    return key


@lru_cache(maxsize=16)
def _chain(xpub: str, network: str, branch: int) -> Any:
    return _account_key(xpub, network).child_public(branch)  # branch 0: the external (receiving) chain


@lru_cache(maxsize=65536)
def derive(xpub: str, network: str, index: int, branch: int = 0) -> str:
    """Address `index` of chain `branch` (xpub/branch/index; p2wpkh for zpub/vpub, as the key's type says)."""
    return _chain(xpub, network, branch).child_public(index).address()


def fingerprint(xpub: str, network: str) -> str:
    """The same key whatever its encoding (xpub, tpub, zpub, vpub) and network."""
    key = _account_key(xpub, network)
    return hashlib.sha256(key.public_byte + key.chain + network.encode()).hexdigest()[:24]


class AddressConflict(ValueError):
    """Another deployment derives its addresses from the same key and branch: refuse to start."""


_LEASE_ATTEMPTS = 64  # each retry follows an index another caller took: bounded by the pool, not by load


def _client_share(client: str) -> str:
    """Whose share of the pool a lease counts against: the IPv4 address, or the IPv6 /64 (one host
    usually holds a whole /64, so per-address caps would not hold it)."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)


class AddressBook:
    """Owns the `{prefix}:addr:*` keys."""

    def __init__(self, redis: aioredis.Redis, prefix: str, xpub: str, network: str, branch: int = 0, *,
                 pool: int = GAP_LIMIT, per_client: int = 0) -> None:
        self.redis, self.xpub, self.network, self.branch, self.pool = redis, xpub, network, branch, pool
        self.per_client = per_client  # invoice addresses one client IP may hold leased at once (0: no cap)
        self.prefix = prefix
        self.keys = Keys(prefix)
        self._lease = register(redis, "address_lease")
        self._claim = register(redis, "address_claim")
        _chain(xpub, network, branch)  # fail at startup on a bad key

    async def claim(self, owner: str | None = None) -> None:
        """Make this deployment the only one deriving from (PAYEE_XPUB, PAYEE_BRANCH) on this Redis, and pin
        its branch: AddressConflict when another REDIS_PREFIX holds them, or this one used another branch.
        A ledger split into shards gives each shard its own branch (each claims it here), so no two
        counters ever hand out the same address."""
        owner = owner or self.prefix
        mine = await self.redis.get(self._k("branch"))
        if mine is not None and int(mine) != self.branch:
            raise AddressConflict(f"this deployment derived its addresses from PAYEE_BRANCH={mine}; it cannot change "
                                  f"to {self.branch} (its addresses would no longer be watched)")
        entry = f"{REGISTRY_TAG}:{fingerprint(self.xpub, self.network)}:{self.branch}"
        holder = await self._claim(keys=[entry, f"{REGISTRY_TAG}:claims"], args=[owner])
        holder = holder.decode() if isinstance(holder, bytes) else holder
        if holder != owner:
            raise AddressConflict(
                f"PAYEE_XPUB branch {self.branch} is already used by the deployment with REDIS_PREFIX={holder!r} on "
                f"this Redis: both would hand out the same addresses and credit each other's coins. Give this "
                f"deployment its own PAYEE_BRANCH (e.g. 2, 3, ...) or its own key")
        await self.redis.set(self._k("branch"), self.branch)

    def _k(self, *parts: str) -> str:
        return self.keys.of("addr", *parts)

    async def _new(self, purpose: str, **fields: Any) -> str:
        index = await self.redis.incr(self._k("next")) - 1
        address = derive(self.xpub, self.network, index, self.branch)
        await self.redis.hset(self._k("info", address), mapping={"index": index, "branch": self.branch,
                                                                  "purpose": purpose, **fields})
        await self.redis.sadd(self._k("all"), address)
        return address

    async def for_invoice(self, lease_seconds: int, client: str = "") -> str | None:
        """An address for one invoice alone: a free one from the pool, else the next index while the pool
        is below INVOICE_ADDRESS_POOL (the gap limit), decided and leased in one script (so no concurrency
        derives past the pool); None when every pooled address is leased, or `client` (an IP) already
        holds INVOICE_ADDRESSES_PER_CLIENT of them (the 402 then offers no on-chain payment: two invoices
        never share an address, and one client cannot lease the whole pool). The lease outlasts the
        invoice by LEASE_GRACE, so a payment sent at the last second is not mistaken for the next invoice's."""
        now = int(time.time() * 1000)
        lease_ms = (lease_seconds + LEASE_GRACE) * 1000
        client = _client_share(client)
        keys = [self._k("lease"), self._k("next"), self._k("derived"), self._k("all"), self._k("client", client)]
        args = [now, lease_ms, self.pool, self.per_client if client else 0, self._k("info", ""), self.branch, client]
        for _ in range(_LEASE_ATTEMPTS):
            answer = await self._lease(keys=keys, args=args)
            answer = answer.decode() if isinstance(answer, bytes) else answer
            if not answer.startswith("derive:"):
                return answer or None
            index = int(answer.removeprefix("derive:"))
            await self.redis.hset(self._k("derived"), str(index), derive(self.xpub, self.network, index, self.branch))
        return None

    async def bind(self, address: str, invoice_id: str) -> None:
        """Record which invoice holds the lease (a payment naming no invoice is matched by address)."""
        await self.redis.hset(self._k("info", address), "invoice", invoice_id)

    async def mark_paid(self, address: str) -> None:
        """A paid invoice address leaves the pool for good (it now has history), and its client's share."""
        client = await self.redis.hget(self._k("info", address), "client")
        if client:
            await self.redis.zrem(self._k("client", client), address)
        await self.redis.zrem(self._k("lease"), address)
        await self.redis.sadd(self._k("used"), address)

    async def deposit_address(self, username: str) -> str:
        """The account's deposit address; a fresh one once the current one has received funds."""
        current = await self.redis.hget(self._k("deposit"), username)
        if current and not await self.redis.sismember(self._k("used"), current):
            return current
        address = await self._new("deposit", owner=username)
        await self.redis.hset(self._k("deposit"), username, address)
        await self.redis.sadd(self._k("deposits"), address)
        return address

    async def deposit_addresses(self) -> dict[str, str]:
        """address -> owner, for the watcher."""
        out = {}
        for address in await self.redis.smembers(self._k("deposits")):
            owner = await self.redis.hget(self._k("info", address), "owner")
            if owner:
                out[address] = owner
        return out

    async def owns(self, address: str) -> bool:
        return bool(await self.redis.sismember(self._k("all"), address))

    async def infos(self, addresses: list[str]) -> dict[str, dict[str, str]]:
        """address -> info for those of `addresses` we derived (one round trip)."""
        unique = list(dict.fromkeys(addresses))
        if not unique:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for address in unique:
                pipe.hgetall(self._k("info", address))
            rows = await pipe.execute()
        return {a: row for a, row in zip(unique, rows) if row}

    async def info(self, address: str) -> dict[str, str]:
        return await self.redis.hgetall(self._k("info", address))

    async def addresses(self, purpose: str) -> list[str]:
        """Every derived address of one purpose (invoice, deposit, change)."""
        infos = await self.infos(await self.all_addresses())  # one round trip, in sorted order
        return [a for a, info in infos.items() if info.get("purpose") == purpose]

    async def all_addresses(self) -> list[str]:
        return sorted(await self.redis.smembers(self._k("all")))
