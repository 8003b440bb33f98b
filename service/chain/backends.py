"""Chain backends behind one interface: Esplora REST (mempool.space / blockstream style) and Bitcoin
Core JSON-RPC. Both time out, retry transient failures with backoff, and raise ChainError with a reason."""
from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp

__all__ = ["ChainError", "Received", "Prevout", "ChainBackend", "Esplora", "Bitcoind", "backend_from_settings",
           "already_known"]

# What a node answers when it has the transaction already (esplora's text, bitcoind's -27, either wording)
_ALREADY_KNOWN = ("already in block chain", "already-known", "already-in-mempool", "already in the mempool", "(-27)",
                  '"code":-27')


def already_known(reason: str) -> bool:
    """A broadcast refused only because the node has this tx already: it is on the network."""
    reason = reason.lower()
    return any(marker in reason for marker in _ALREADY_KNOWN)


class ChainError(Exception):
    """The backend refused (reason from the node) or could not be reached."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.transient = reason, transient


@dataclass(frozen=True)
class Received:
    """One output paying a watched address."""

    txid: str
    vout: int
    address: str
    value: int
    confirmations: int


@dataclass(frozen=True)
class Prevout:
    """An output some transaction spends, as the chain knows it now (mempool included)."""

    txid: str
    vout: int
    value: int
    address: str
    spent_by: str  # the txid spending it, "" while unspent, "?" when spent by a tx the node does not name


@runtime_checkable
class ChainBackend(Protocol):
    async def broadcast(self, tx_hex: str) -> str:
        """Submit a raw transaction; its txid, or ChainError with the node's reason."""

    async def received(self, address: str) -> list[Received]:
        """Outputs paying `address` (mempool included, with 0 confirmations)."""

    async def utxos(self, address: str) -> list[Received]:
        """Unspent outputs of `address` (what a withdrawal batch can spend)."""

    async def prevout(self, txid: str, vout: int) -> Prevout | None:
        """The output `txid:vout` and whether it is spent; None when the chain has no such output."""

    async def tx_confirmations(self, txid: str) -> int | None:
        """Confirmations of `txid` (0: in the mempool), None when the node does not know it. Raises
        ChainError when the node cannot say (never taken for a disappearance)."""

    async def close(self) -> None: ...


class _Http:
    def __init__(self, timeout: float, retries: int) -> None:
        self.timeout, self.retries = timeout, retries
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def retrying(self, call: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except ChainError as exc:
                if not exc.transient or attempt == self.retries:
                    raise
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt == self.retries:
                    raise ChainError(f"chain backend unreachable: {type(exc).__name__}", transient=True) from None
            await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")


class Esplora(_Http):
    def __init__(self, url: str, *, timeout: float = 10, retries: int = 2) -> None:
        super().__init__(timeout, retries)
        self.url = url.rstrip("/")

    async def _get(self, path: str) -> Any:
        async def call() -> Any:
            async with self.session().get(f"{self.url}{path}") as r:
                if r.status >= 500:
                    raise ChainError(f"esplora {r.status}", transient=True)
                if r.status != 200:
                    raise ChainError(f"esplora {r.status}: {(await r.text())[:200]}")
                return await r.json(content_type=None)
        return await self.retrying(call)

    async def broadcast(self, tx_hex: str) -> str:
        async def call() -> str:
            async with self.session().post(f"{self.url}/tx", data=tx_hex) as r:
                text = (await r.text()).strip()
                if r.status >= 500 and "bad-txns" not in text and "RPC error" not in text:
                    raise ChainError(f"esplora {r.status}", transient=True)
                if r.status != 200:
                    raise ChainError(f"rejected by the network: {text[:300]}")
                return text
        return await self.retrying(call)

    async def received(self, address: str) -> list[Received]:
        tip = int(await self._get("/blocks/tip/height"))
        out = []
        for tx in await self._get(f"/address/{address}/txs"):
            status = tx.get("status", {})
            conf = tip - status["block_height"] + 1 if status.get("confirmed") else 0
            for vout, o in enumerate(tx.get("vout", [])):
                if o.get("scriptpubkey_address") == address:
                    out.append(Received(tx["txid"], vout, address, int(o["value"]), conf))
        return out

    async def prevout(self, txid: str, vout: int) -> Prevout | None:
        """GET /tx/:txid, then GET /tx/:txid/outspend/:vout."""
        try:
            tx = await self._get(f"/tx/{txid}")
        except ChainError as exc:
            missing = exc.reason.startswith("esplora 404") or "not found" in exc.reason.lower()
            if exc.transient or not missing:
                raise
            return None
        outputs = tx.get("vout") or []
        if not 0 <= vout < len(outputs):
            return None
        spend = await self._get(f"/tx/{txid}/outspend/{vout}")
        return Prevout(txid, vout, int(outputs[vout]["value"]), outputs[vout].get("scriptpubkey_address") or "",
                       (spend.get("txid") or "?") if spend.get("spent") else "")

    async def tx_confirmations(self, txid: str) -> int | None:
        try:
            status = await self._get(f"/tx/{txid}/status")
        except ChainError as exc:
            if exc.reason.startswith("esplora 404"):
                return None
            raise
        if not status.get("confirmed"):
            return 0
        return int(await self._get("/blocks/tip/height")) - int(status["block_height"]) + 1

    async def utxos(self, address: str) -> list[Received]:
        tip = int(await self._get("/blocks/tip/height"))
        return [Received(u["txid"], u["vout"], address, int(u["value"]),
                         tip - u["status"]["block_height"] + 1 if u.get("status", {}).get("confirmed") else 0)
                for u in await self._get(f"/address/{address}/utxo")]


class Bitcoind(_Http):
    """Bitcoin Core JSON-RPC (URL with user:password, or a cookie file)."""

    def __init__(self, url: str, *, cookie_file: str | None = None, timeout: float = 10, retries: int = 2) -> None:
        super().__init__(timeout, retries)
        self.url, self.cookie_file = url, cookie_file

    def _auth(self) -> dict[str, str]:
        if self.cookie_file:
            with open(self.cookie_file) as f:
                return {"Authorization": "Basic " + base64.b64encode(f.read().strip().encode()).decode()}
        return {}

    async def rpc(self, method: str, *params: Any) -> Any:
        async def call() -> Any:
            body = {"jsonrpc": "1.0", "id": "microtasks", "method": method, "params": list(params)}
            async with self.session().post(self.url, json=body, headers=self._auth()) as r:
                if r.status == 401:
                    raise ChainError("bitcoind refused the credentials")
                payload = await r.json(content_type=None)
                if payload.get("error"):
                    err = payload["error"]
                    raise ChainError(f"bitcoind: {err.get('message')} ({err.get('code')})",
                                     transient=err.get("code") == -28)  # -28: warming up
                if r.status >= 500:
                    raise ChainError(f"bitcoind {r.status}", transient=True)
                return payload["result"]
        return await self.retrying(call)

    async def broadcast(self, tx_hex: str) -> str:
        return await self.rpc("sendrawtransaction", tx_hex)

    async def received(self, address: str) -> list[Received]:
        tip = await self.rpc("getblockcount")
        scan = await self.rpc("scantxoutset", "start", [f"addr({address})"])
        return [Received(u["txid"], u["vout"], address, round(u["amount"] * 100_000_000),
                         tip - u["height"] + 1 if u.get("height") else 0) for u in scan.get("unspents", [])]

    async def prevout(self, txid: str, vout: int) -> Prevout | None:
        """gettxout (unspent outputs, mempool included); a spent one is still found by getrawtransaction
        (mempool, or any block with -txindex), then reported spent by an unnamed tx."""
        out = await self.rpc("gettxout", txid, vout, True)
        if out:
            key = out.get("scriptPubKey", {})
            return Prevout(txid, vout, round(out["value"] * 100_000_000), key.get("address") or "", "")
        try:
            tx = await self.rpc("getrawtransaction", txid, True)
        except ChainError as exc:
            if exc.transient:
                raise
            return None
        outputs = tx.get("vout") or []
        if not 0 <= vout < len(outputs):
            return None
        key = outputs[vout].get("scriptPubKey", {})
        return Prevout(txid, vout, round(outputs[vout]["value"] * 100_000_000), key.get("address") or "", "?")

    async def tx_confirmations(self, txid: str) -> int | None:
        """Needs -txindex (synced): without it only the wallet's and the mempool's txs could be found."""
        if not (await self.rpc("getindexinfo", "txindex")).get("txindex", {}).get("synced"):
            raise ChainError("bitcoind needs -txindex (synced) to re-check deposits for reorgs")
        try:
            tx = await self.rpc("getrawtransaction", txid, True)
        except ChainError as exc:
            if "(-5)" in exc.reason:
                return None
            raise
        return int(tx.get("confirmations", 0))

    async def utxos(self, address: str) -> list[Received]:
        return await self.received(address)  # scantxoutset reports unspent outputs only


def backend_from_settings(kind: str, url: str, cookie_file: str | None = None) -> ChainBackend:
    if kind == "esplora":
        return Esplora(url)
    if kind == "bitcoind":
        return Bitcoind(url, cookie_file=cookie_file)
    raise ValueError(f"CHAIN must be esplora or bitcoind, got {kind!r}")
