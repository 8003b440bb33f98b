"""An expert's linked accounts (GitHub, Twitter/X, LinkedIn), and the proof that the GitHub one is theirs.

The proof (keybase-style): the expert publishes a public gist, under the GitHub account, whose content is
`statement(...)` followed by a line `signature: <base64>` made with the key registered for their account
here (the two1-style signature of service/crypto.py). The service reads the gist through the GitHub REST
API (`GET {GITHUB_API_URL}/gists/{id}`), checks that its owner is the linked account and that the signature
verifies under the account's registered key. Changing the linked handle drops the verification.
"""
from __future__ import annotations

import re
from typing import Any

import aiohttp

from . import crypto
from .errors import ServiceUnavailable, Unprocessable
from .keys import user_account
from .ledger import Ledger

__all__ = ["statement", "accounts_view", "verify_github", "GIST_RE", "HANDLE_RES"]

HANDLE_RES = {"github": r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,37}[A-Za-z0-9])?",
              "twitter": r"[A-Za-z0-9_]{1,15}",
              "linkedin": r"[A-Za-z0-9][A-Za-z0-9-]{2,99}"}
_URLS = {"github": "https://github.com/{}", "twitter": "https://x.com/{}", "linkedin": "https://www.linkedin.com/in/{}"}
GIST_RE = re.compile(r"(?:https://gist\.github\.com/[A-Za-z0-9-]{1,39}/)?([0-9a-f]{20,40})")
_SIGNATURE = re.compile(r"signature: ([A-Za-z0-9+/=]{80,100})")
MAX_GIST_BYTES = 10_000


def statement(github: str, username: str) -> str:
    """The exact sentence the expert signs (one line; the gist adds `signature: ...` below it)."""
    return f"I am {github} on GitHub and {username} on k8s-microtasks; this gist proves it."


def accounts_view(handles: dict[str, str], github_proof: str) -> dict[str, Any]:
    """Handles with their profile URL; GitHub's `verified` holds only while the proof names the handle."""
    out: dict[str, Any] = {}
    for site, handle in handles.items():
        if handle:
            out[site] = {"handle": handle, "url": _URLS[site].format(handle), "verified": False}
    proved_handle, _, gist = github_proof.partition(" ")
    if "github" in out and proved_handle and proved_handle == handles["github"].lower():
        out["github"].update(verified=True, proof=f"https://gist.github.com/{handles['github']}/{gist}")
    return out


def _refused(reason: str, expected: str | None = None) -> Unprocessable:
    detail: dict[str, Any] = {"gist": [reason]}
    if expected:
        detail["statement"] = expected
    return Unprocessable("github_not_verified", detail)


async def verify_github(api_url: str, ledger: Ledger, username: str, github: str, gist: str) -> str:
    """Returns the gist id once the gist proves `username` owns GitHub account `github`; 422 otherwise."""
    m = GIST_RE.fullmatch(gist.strip())
    if not m:
        raise _refused("a gist id (hex) or its https://gist.github.com/<user>/<id> URL")
    gist_id = m.group(1)
    pubkey_hex = await ledger.account_meta(user_account(username), "pubkey")
    if not pubkey_hex:
        raise _refused("your account has no registered key to check the signature with")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(f"{api_url.rstrip('/')}/gists/{gist_id}",
                                   headers={"Accept": "application/vnd.github+json"}) as r:
                if r.status == 404:
                    raise _refused("no public gist with this id")
                if r.status != 200:
                    raise ServiceUnavailable("github_unavailable", f"GitHub answered {r.status}; retry later",
                                             headers={"Retry-After": "60"})
                body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ServiceUnavailable("github_unavailable", f"GitHub could not be reached: {type(exc).__name__}",
                                 headers={"Retry-After": "60"}) from None
    expected = statement(github, username)
    owner = ((body.get("owner") or {}).get("login") or "") if isinstance(body, dict) else ""
    if owner.lower() != github.lower():
        raise _refused(f"the gist must belong to the GitHub account {github}", expected)
    for f in (body.get("files") or {}).values():
        content = f.get("content") if isinstance(f, dict) else None
        if not isinstance(content, str) or len(content) > MAX_GIST_BYTES:
            continue
        lines = [line.strip() for line in content.strip().splitlines() if line.strip()]
        if len(lines) == 2 and lines[0] == expected and (sig := _SIGNATURE.fullmatch(lines[1])):
            try:
                if crypto.verify(bytes.fromhex(pubkey_hex), sig.group(1), expected.encode()):
                    return gist_id
            except crypto.KeyError_:
                pass
            raise _refused("the signature does not verify under your account's key", expected)
    raise _refused("no file of the gist holds the statement and its signature line", expected)
