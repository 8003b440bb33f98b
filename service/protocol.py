"""Wire names shared by server and client: 21's BitTransfer headers, x402 v2 headers, our own."""
import hashlib
from urllib.parse import urlsplit

__all__ = [
    "PRICE", "BITCOIN_ADDRESS", "USERNAME", "BITCOIN_TRANSFER", "AUTHORIZATION", "PAYMENT_RECEIPT",
    "PAYMENT_REQUIRED", "PAYMENT_SIGNATURE", "PAYMENT_RESPONSE", "REQUEST_ID", "X402_VERSION",
    "SIG_SCHEME", "TOKEN_SCHEME", "IDEMPOTENCY_KEY", "PAYMENT_INVOICE", "PAYMENT_AMOUNT", "METHOD_TOKEN",
    "METHOD_ONCHAIN", "BITCOIN_TRANSACTION", "SCHEME_EXACT", "SCHEME_BITTRANSFER", "METHOD_BITTRANSFER",
    "METHOD_EXACT_BTC", "request_message", "NONCE",
    "origin_of", "registration_message",
]

# 21 / two1.bitrequests
PRICE = "Price"
BITCOIN_ADDRESS = "Bitcoin-Address"
USERNAME = "Username"
BITCOIN_TRANSFER = "Bitcoin-Transfer"
BITCOIN_TRANSACTION = "Bitcoin-Transaction"
AUTHORIZATION = "Authorization"

# ours
PAYMENT_RECEIPT = "Payment-Receipt"
REQUEST_ID = "X-Request-Id"
IDEMPOTENCY_KEY = "Idempotency-Key"  # token payments: the same key pays once
PAYMENT_INVOICE = "Payment-Invoice"  # on-chain payments: the id of the invoice (402) the transaction pays
PAYMENT_AMOUNT = "Payment-Amount"  # token payments: the amount the client agreed to; must equal the price
TOKEN_SCHEME = "Token"  # spending tokens: "Authorization: Token <id>.<secret>"
SIG_SCHEME = "MT-Sig"  # signed requests: "Authorization: MT-Sig <username>:<unix ts>:<base64 sig>"
NONCE = "MT-Nonce"  # optional, signed: makes two identical requests in one second distinct (replays are refused)

# x402 v2 HTTP transport
X402_VERSION = 2
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
SCHEME_EXACT = "exact"  # only x402 exact-BTC (payments/x402_exact_btc.py): exact-scheme clients pay on chain
SCHEME_BITTRANSFER = "bittransfer"  # our ledger transfer as its own x402 scheme, never `exact`
METHOD_BITTRANSFER = "bittransfer"
METHOD_TOKEN = "token"
METHOD_ONCHAIN = "onchain"
METHOD_EXACT_BTC = "exact-btc"


def origin_of(url: str) -> str:
    """scheme://host[:port] of `url` as a deployment names itself (lower case, no default port): what a
    signature is bound to. ValueError for a URL without an http(s) scheme and host."""
    parts = urlsplit(url.strip())
    port = parts.port
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def request_message(method: str, path_qs: str, ts: str, body: bytes, nonce: str = "", *, origin: str) -> bytes:
    """What an MT-Sig request signature signs: the deployment's origin (so it cannot be replayed to another
    deployment), method, path?query, unix ts, sha256(body) hex, and the MT-Nonce header's value on a sixth
    line when the request has one."""
    message = f"{origin}\n{method.upper()}\n{path_qs}\n{ts}\n{hashlib.sha256(body).hexdigest()}"
    return (f"{message}\n{nonce}" if nonce else message).encode()


def registration_message(origin: str, body: bytes) -> bytes:
    """What a registration's proof of key possession signs: the deployment's origin, a newline, the exact
    body bytes (a registration sent to one deployment cannot register the key on another)."""
    return f"{origin}\n".encode() + body
