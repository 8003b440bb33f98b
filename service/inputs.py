"""The one reader of raw client text: numbers, header values, query values and identifiers.

Python is generous where a server must not be: `str.isdigit()` is true for "²" and "٣" (then `int()`
fails or reads a foreign digit), `re.match(r"^…$")` accepts a final newline, and aiohttp hands undecodable
header bytes over as lone surrogates that blow up when encoded. Everything a client sends goes through
here: numbers are ASCII digits of bounded length, text is decodable and free of control characters,
identifiers are validated whole and made canonical (NFKC, lower case) before they become a key.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Awaitable, Callable

from aiohttp import web

from . import protocol as P
from .errors import BadRequest, NotFound, Unauthorized, Unprocessable

__all__ = ["ascii_int", "has_controls", "undecodable", "query_int", "identifier", "input_middleware",
           "CONTROLS", "USERNAME_RE", "LIST_NAME_RE", "RESOURCE_ID_RE", "PATH_PARAMS", "IDEMPOTENCY_KEY_RE", "CAPABILITY_RE"]

# Identifiers: matched whole (fullmatch) after canonicalisation (identifier()), never with `$`
USERNAME_RE = r"[a-z0-9][a-z0-9_.-]{1,38}"
LIST_NAME_RE = r"[a-z0-9][a-z0-9-]{1,39}"
RESOURCE_ID_RE = r"[A-Za-z0-9_.:-]{1,128}"  # question, run, job, result, token and receipt ids
CAPABILITY_RE = r"[A-Za-z0-9_-]{43}"  # a web ask's private link: secrets.token_urlsafe(32) (page_asks.py)
IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,128}")  # Idempotency-Key: printable ASCII, used with fullmatch
# every path parameter of the route table, by name: checked before a handler turns it into a key
PATH_PARAMS: dict[str, tuple[re.Pattern[str], bool]] = {
    "username": (re.compile(USERNAME_RE), True), "name": (re.compile(LIST_NAME_RE), True),
    "id": (re.compile(RESOURCE_ID_RE), False), "rid": (re.compile(RESOURCE_ID_RE), False),
    "capability": (re.compile(CAPABILITY_RE), False),
}

_DIGITS = {n: re.compile(rf"[0-9]{{1,{n}}}") for n in (10, 12, 16, 19)}
# C0 and C1 controls, DEL, and the invisible format characters (zero-width, bidi overrides, BOM)
CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def ascii_int(text: str | None, max_digits: int = 19) -> int | None:
    """An unsigned integer written in ASCII digits only, at most `max_digits` long; None otherwise."""
    if text is None:
        return None
    pattern = _DIGITS.get(max_digits) or re.compile(rf"[0-9]{{1,{max_digits}}}")
    return int(text) if pattern.fullmatch(text) else None


def undecodable(text: str) -> bool:
    """True for text holding lone surrogates (bytes that were not UTF-8, or JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def has_controls(text: str, allow_newlines: bool = False) -> bool:
    """Control or invisible characters (CR, LF, ESC, zero-width...); newlines and tabs allowed when asked."""
    if allow_newlines:
        text = text.replace("\n", "").replace("\t", "")
    return CONTROLS.search(text) is not None


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """A query parameter that must be an integer in [lo, hi] (400 naming it otherwise)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = ascii_int(raw, 10)
    if value is None or not lo <= value <= hi:
        raise BadRequest("invalid_parameter", f"{name} must be an integer from {lo} to {hi}")
    return value


def identifier(value: str, pattern: re.Pattern[str], what: str, *, lower: bool = True) -> str:
    """The canonical form of an identifier (NFKC, lower case) if the whole of it matches `pattern`;
    422 otherwise. Canonical before matching, so a look-alike never maps onto a real name silently:
    the pattern is ASCII, and NFKC of a Cyrillic 'а' is still not 'a'."""
    if not isinstance(value, str) or undecodable(value) or has_controls(value):
        raise Unprocessable("validation_error", {what: ["must not contain control or invisible characters"]})
    canonical = unicodedata.normalize("NFKC", value)
    if lower:
        canonical = canonical.lower()
    if canonical != value or not pattern.fullmatch(canonical):
        raise Unprocessable("validation_error", {what: [f"not a valid {what}"]})
    return canonical


@web.middleware
async def input_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Refuse undecodable header or query text before any handler reads it (401 when it is the credentials)."""
    for name, value in request.headers.items():
        if undecodable(value) or "\x00" in value:
            if name.lower() == P.AUTHORIZATION.lower():
                raise Unauthorized("malformed_auth", "the Authorization header is not valid UTF-8 text")
            raise BadRequest("invalid_header", f"the {name} header is not valid UTF-8 text")
    for name, value in request.query.items():
        if undecodable(name) or undecodable(value) or "\ufffd" in value or "\x00" in value:
            raise BadRequest("invalid_parameter", f"the query parameter {name!r} is not valid UTF-8 text")
    for name, value in request.match_info.items():
        pattern, lower = PATH_PARAMS.get(name, (None, False))
        if pattern is None:  # a route added with a new parameter name must be given a pattern above
            raise BadRequest("invalid_parameter", f"the path parameter {name!r} has no validation rule")
        try:
            identifier(value, pattern, name, lower=lower)
        except Unprocessable:
            raise NotFound("not_found", f"no {name} {value[:64]!r}") from None
    return await handler(request)
