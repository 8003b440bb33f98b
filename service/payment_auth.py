"""The IETF "Payment" HTTP authentication scheme's wire format (draft-httpauth-payment-01, Tempo/Stripe "MPP"),
shared by server and client: challenge ids, the `WWW-Authenticate: Payment` value, credentials, receipts.

Pure functions, no server imports (the client uses them). The challenge id is computed exactly as pympp 0.16's
`generate_challenge_id`: base64url(HMAC-SHA256(key, "realm|method|intent|request|expires|digest|[header|]opaque"))
with empty strings for absent fields, and the `header` slot only when the credential travels in a header other
than `Authorization` (tests/test_payment_auth.py checks it against pympp itself).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "SCHEME", "METHOD", "INTENT", "CREDENTIAL_HEADER", "PROBLEM_BASE", "b64url", "unb64url", "canonical_b64url",
    "challenge_id", "format_challenge", "body_digest", "rfc3339", "parse_rfc3339", "parse_credential",
    "encode_credential", "encode_receipt", "decode_receipt", "receipt_reference", "problem",
]

SCHEME = "Payment"
METHOD = "bittransfer"  # private-use method name (no registered method settles a ledger transfer): our BitTransfer
INTENT = "charge"
CREDENTIAL_HEADER = "Payment-Authorization"  # the draft's `header` parameter: Authorization carries MT-Sig / Token
PROBLEM_BASE = "https://paymentauth.org/problems/"
MAX_CREDENTIAL = 64 * 1024  # as pympp: a credential echoes its challenge
_TOKEN_68 = re.compile(r"[A-Za-z0-9_-]+")
# our 402 `error` codes → the draft's problem types; any other refusal of a payment is verification-failed
_PROBLEMS = {"payment_required": "payment-required", "malformed_credential": "malformed-credential",
             "invalid_challenge": "invalid-challenge", "payment_expired": "payment-expired"}


def problem(error: str) -> dict[str, Any]:
    """RFC 9457 members (type, title, status) for a 402 whose x402 `error` is `error`."""
    slug = _PROBLEMS.get(error, "verification-failed")
    return {"type": PROBLEM_BASE + slug, "title": slug.replace("-", " "), "status": 402}


def b64url(data: bytes) -> str:
    """base64url without padding (the draft's encoding for request, opaque, credentials and receipts)."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def unb64url(text: str) -> bytes:
    """Inverse of b64url; ValueError for anything but unpadded (or padded) base64url."""
    stripped = text.rstrip("=")
    if not _TOKEN_68.fullmatch(stripped):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


def canonical_b64url(value: Any) -> str:
    """base64url of the JCS (RFC 8785) serialisation, as the challenge's `request` and `opaque` are sent."""
    import rfc8785  # noqa: PLC0415  (server side only; the client echoes what it received)

    return b64url(rfc8785.dumps(value))


def challenge_id(key: str, *, realm: str, method: str, intent: str, request_b64: str, expires: str = "",
                 digest: str = "", header: str = "", opaque_b64: str = "") -> str:
    """The stateless challenge id: what the server recomputes from a credential's echo to know it issued it."""
    parts = [realm, method, intent, request_b64, expires or "", digest or ""]
    if header and header.lower() != "authorization":
        parts.append(header)
    parts.append(opaque_b64 or "")
    return b64url(hmac.new(key.encode(), "|".join(parts).encode(), hashlib.sha256).digest())


def _quoted(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("auth-param values cannot hold CR or LF")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_challenge(params: dict[str, str]) -> str:
    """`Payment id="…", realm="…", …`: every value a quoted-string, in the order given."""
    return f"{SCHEME} " + ", ".join(f"{name}={_quoted(value)}" for name, value in params.items())


def body_digest(body: bytes) -> str:
    """The challenge's `digest` of a request body, as pympp computes it (`sha-256=<base64>`)."""
    return "sha-256=" + base64.b64encode(hashlib.sha256(body).digest()).decode()


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(int(unix), timezone.utc).isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Unix seconds; ValueError for a timestamp without an offset (it names no instant)."""
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError("no offset")
    return stamp.timestamp()


def parse_credential(value: str) -> dict[str, Any]:
    """`Payment <base64url JSON>` → {"challenge": {...}, "payload": {...}, "source"?}; ValueError otherwise."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != SCHEME.lower() or len(value) > MAX_CREDENTIAL:
        raise ValueError("expected `Payment <base64url JSON>`")
    try:
        data = json.loads(unb64url(token.strip()))
    except ValueError as exc:
        raise ValueError("the credential is not base64url of a JSON object") from exc
    if not isinstance(data, dict) or not isinstance(data.get("challenge"), dict) \
            or not isinstance(data.get("payload"), dict):
        raise ValueError("the credential needs objects `challenge` and `payload`")
    return data


def encode_credential(challenge: dict[str, str], payload: dict[str, Any], source: str | None = None) -> str:
    """The credential header value for `challenge` (the auth-params as received) and a method payload."""
    data: dict[str, Any] = {"challenge": challenge, "payload": payload}
    if source:
        data["source"] = source
    return f"{SCHEME} " + b64url(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())


def encode_receipt(method: str, reference: str, timestamp: float) -> str:
    """`Payment-Receipt`: base64url JSON {"status": "success", "method", "timestamp" (RFC 3339), "reference"}."""
    receipt = {"method": method, "reference": reference, "status": "success", "timestamp": rfc3339(timestamp)}
    return b64url(json.dumps(receipt, separators=(",", ":")).encode())


def decode_receipt(value: str) -> dict[str, Any]:
    receipt = json.loads(unb64url(value.strip()))
    if not isinstance(receipt, dict) or not isinstance(receipt.get("reference"), str):
        raise ValueError("not a Payment-Receipt")
    return receipt


def receipt_reference(value: str) -> str:
    """The transfer id a `Payment-Receipt` names (look it up with GET /v1/receipts/{id})."""
    return decode_receipt(value)["reference"]
