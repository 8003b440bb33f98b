"""marshmallow schemas for every request body, and the one helper that turns their errors into 4xx."""
from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from . import crypto, webhooks
from .errors import BadRequest, Unprocessable
from .rates import parse_usd
from .state import SETTINGS
from .profile_links import HANDLE_RES
from .inputs import LIST_NAME_RE, USERNAME_RE, has_controls, identifier, undecodable

__all__ = ["RegisterSchema", "CreditSchema", "TokenSchema", "RunSchema", "RunnerSchema", "CrowdJobSchema", "ClaimSchema",
           "ResultSchema", "ProfileSchema", "QuestionSchema", "GithubProofSchema", "ListQuestionSchema", "ListSchema", "ReplySchema", "PayoutSchema", "WithdrawalSchema",
           "load_json", "USERNAME_RE", "MAX_AMOUNT"]

# Identifiers: matched whole (fullmatch) after canonicalisation (inputs.identifier), never with `$`
TAG_RE = r"[a-z0-9][a-z0-9.+-]{0,31}"
CHARITY_RE = r"[a-z0-9-]{1,64}"
PAYOUT_RE = rf"keep|charity:{CHARITY_RE}|address:[A-Za-z0-9]{{14,90}}"
ROUTE_RE = r"/[A-Za-z0-9/_.{}-]{0,200}"
MAX_AMOUNT = 21_000_000 * 100_000_000  # every satoshi there will ever be
RESERVED_USERNAMES = {"me", "admin", "microtasks", "root", "system"}


class Whole(fields.Integer):
    """An integer, also when written as an integral JSON number (`5.0`), as JSON Schema's `integer` (and so
    openapi.yaml) allows; never a fraction, a bool or a string."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # exact in a double
            value = int(value)
        return super()._validated(value)


class Identifier(fields.String):
    """A name that becomes part of a key: validated whole and canonical (inputs.identifier), or refused."""

    def __init__(self, pattern: str, what: str, *, lower: bool = True, error: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pattern, self.what, self.lower, self.error = re.compile(pattern), what, lower, error

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return identifier(text, self.pattern, self.what, lower=self.lower)
        except Unprocessable:
            raise ValidationError(self.error or f"not a valid {self.what}") from None


class Text(fields.String):
    """Free text shown to other people: decodable, and without control or invisible characters
    (newlines and tabs allowed where `multiline`)."""

    def __init__(self, *, multiline: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multiline = multiline

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if undecodable(text) or has_controls(text, allow_newlines=self.multiline):
            raise ValidationError("must not contain control characters" + ("" if self.multiline else " or line breaks"))
        return text


class WebhookUrl(fields.String):
    """A webhook target, checked against the SSRF policy (scheme, literal address) here and, after DNS
    resolution, by load_json; the sender checks the resolved address again."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        url = super()._deserialize(value, attr, data, **kwargs)
        if len(url) > 2000:
            raise ValidationError("at most 2000 characters")
        try:
            webhooks.check_url(url)
        except webhooks.TargetRefused as exc:
            raise ValidationError(str(exc)) from None
        return url


class RegisterSchema(Schema):
    username = Identifier(USERNAME_RE, "username", required=True,
                          error="2-39 characters: lowercase letters, digits, '_', '.', '-', starting with a letter or digit")
    pubkey = fields.String(required=True)

    @validates("username")
    def _username(self, value: str, data_key: str) -> None:
        if value in RESERVED_USERNAMES:
            raise ValidationError(f"{value!r} is reserved")

    @validates("pubkey")
    def _pubkey(self, value: str, data_key: str) -> None:
        try:
            crypto.parse_pubkey(value)
        except crypto.KeyError_ as exc:
            raise ValidationError(str(exc)) from None


class TokenSchema(Schema):
    max_total = Whole(required=True, validate=validate.Range(1, MAX_AMOUNT))
    max_per_call = Whole(load_default=None, validate=validate.Range(1, MAX_AMOUNT))
    expires_at = Whole(load_default=None, validate=validate.Range(1, 2**40))
    routes = fields.List(Identifier(ROUTE_RE, "route", lower=False),
                         load_default=list, validate=validate.Length(max=20))
    label = Text(load_default="", validate=validate.Length(max=100))


class RunSchema(Schema):
    suite = fields.String(required=True, validate=validate.Length(1, 64))
    kubernetes_version = fields.String(load_default=None, validate=validate.Length(max=16))
    manifests = fields.String(load_default=None)
    archive = fields.String(load_default=None)
    strict = fields.Boolean(load_default=False)
    webhook = WebhookUrl(load_default=None)

    @validates_schema
    def _one_source(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("manifests") is None) == (data.get("archive") is None):
            raise ValidationError("give exactly one of 'manifests' (YAML text) or 'archive' (base64 tar.gz)",
                                  field_name="manifests")


class RunnerSchema(Schema):
    labels = fields.Dict(keys=Identifier(r"[a-z0-9][a-z0-9._/-]{0,62}", "label"),
                         values=Text(validate=validate.Length(1, 63)), required=True,
                         validate=validate.Length(max=20))


class CrowdJobSchema(Schema):
    title = Text(required=True, validate=validate.Length(1, 200))
    instructions = fields.String(load_default="", validate=validate.Length(max=10_000))
    manifests = fields.String(load_default=None, validate=validate.Length(max=1024 * 1024))
    labels = fields.Dict(keys=Identifier(r"[a-z0-9][a-z0-9._/-]{0,62}", "label"), values=Text(validate=validate.Length(1, 63)),
                         load_default=dict,
                         validate=validate.Length(max=20))
    reward = Whole(required=True, validate=validate.Range(1, 10**9))
    results_wanted = Whole(required=True, validate=validate.Range(1, 100))
    expires_in = Whole(load_default=86_400, validate=validate.Range(10, 30 * 86_400))
    auto_accept = fields.Boolean(load_default=False)


class ClaimSchema(Schema):
    runner = Identifier(r"rn_[0-9a-f]{16}", "runner", required=True)
    wait = fields.Float(load_default=0.0, validate=validate.Range(0, 30))


class ResultSchema(Schema):
    runner = Identifier(r"rn_[0-9a-f]{16}", "runner", required=True)
    status = fields.String(required=True, validate=validate.OneOf(["passed", "failed"]))
    junit = fields.String(load_default="", validate=validate.Length(max=1024 * 1024))
    log = fields.String(load_default="", validate=validate.Length(max=64 * 1024))


ISSUE_URL_RE = r"https://github\.com/kubernetes(?:-[a-z0-9]+)*/[A-Za-z0-9_.-]{1,100}/(?:issues|pull)/[1-9][0-9]{0,9}"


class ProfileSchema(Schema):
    display_name = Text(required=True, validate=validate.Length(1, 100))
    bio = Text(load_default="", multiline=True, validate=validate.Length(max=4000))
    tags = fields.List(Identifier(TAG_RE, "tag"), load_default=list, validate=validate.Length(max=20))
    price = Whole(load_default=None, validate=validate.Range(1, 10**8))
    price_usd = Identifier(r"\$?[0-9]{1,6}(\.[0-9]{1,2})?", "price_usd", load_default=None,
                           error="a dollar amount such as 0.50 or $12")
    reply_hours = Whole(load_default=72, validate=validate.Range(1, 24 * 30))
    payout = Identifier(rf"keep|charity:{CHARITY_RE}", "payout", load_default=None)
    links = fields.Dict(keys=Text(validate=validate.Length(1, 32)), values=fields.Url(), load_default=dict,
                        validate=validate.Length(max=10))
    available_for_hire = fields.Boolean(load_default=False)
    webhook = WebhookUrl(load_default=None)
    github = Identifier(HANDLE_RES["github"], "GitHub handle", lower=False, load_default=None)
    twitter = Identifier(HANDLE_RES["twitter"], "Twitter/X handle", lower=False, load_default=None)
    linkedin = Identifier(HANDLE_RES["linkedin"], "LinkedIn handle", lower=False, load_default=None)

    @validates("price_usd")
    def _usd(self, value: str | None, data_key: str) -> None:
        """Refused here rather than failing every ask later: a price the paywall can charge."""
        if value is not None:
            try:
                parse_usd(value)
            except ValueError as exc:
                raise ValidationError(str(exc)) from None

    @validates_schema
    def _one_price(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("price") is None) == (data.get("price_usd") is None):
            raise ValidationError("give exactly one of 'price' (sat) or 'price_usd'", field_name="price")


class QuestionSchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 5000))
    issue = Identifier(ISSUE_URL_RE, "issue", lower=False, load_default=None,
                       error="a Kubernetes GitHub issue or pull request URL, "
                             "https://github.com/kubernetes*/<repo>/(issues|pull)/<number>")


class GithubProofSchema(Schema):
    gist = fields.String(required=True, validate=validate.Length(1, 200))


class FormFieldSchema(Schema):
    id = Identifier(r"[a-z0-9_]{1,32}", "field id", required=True)
    type = fields.String(required=True, validate=validate.OneOf(["choice", "number", "text"]))
    label = Text(required=True, validate=validate.Length(1, 500))
    options = fields.List(Text(validate=validate.Length(1, 200)), load_default=list,
                          validate=validate.Length(max=50))


class ListQuestionSchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 5000))
    max_responses = Whole(required=True, validate=validate.Range(1, 1000))
    hours = Whole(load_default=72, validate=validate.Range(1, 24 * 30))
    form = fields.List(fields.Nested(FormFieldSchema), load_default=None, validate=validate.Length(1, 50))


class ListSchema(Schema):
    name = Identifier(LIST_NAME_RE, "list name", required=True)
    description = Text(load_default="", multiline=True, validate=validate.Length(max=2000))
    price = Whole(required=True, validate=validate.Range(1, 10**8))
    approval_required = fields.Boolean(load_default=False)


class ReplySchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 20_000))
    answers = fields.Dict(load_default=None)


class PayoutSchema(Schema):
    payout = Identifier(PAYOUT_RE, "payout", lower=False, required=True,
                        error="keep, charity:<id> or address:<bitcoin address>")
    minimum = Whole(load_default=None, validate=validate.Range(1, MAX_AMOUNT))


class WithdrawalSchema(Schema):
    amount = Whole(required=True, validate=validate.Range(1, MAX_AMOUNT))
    address = Identifier(r"[A-Za-z0-9]{14,90}", "address", lower=False, required=True)


class CreditSchema(Schema):
    username = Identifier(USERNAME_RE, "username", required=True)
    amount = Whole(required=True, validate=validate.Range(1, MAX_AMOUNT))
    reason = Text(required=True, validate=validate.Length(1, 200))
    id = Identifier(r"[A-Za-z0-9._:-]{1,100}", "credit id", lower=False, load_default=None)


class NonFinite(ValueError):
    """NaN and ±Infinity are not JSON (RFC 8259), and 1e400 overflows to infinity: refused, never stored."""


def _no_constant(name: str) -> float:
    raise NonFinite(f"{name} is not a JSON number: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NonFinite(f"{text[:40]} is out of range: numbers must be finite")
    return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return undecodable(value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


async def load_json(request: web.Request, schema: Schema) -> dict[str, Any]:
    """Parse the body as JSON (400 if it is not) and validate it (422 naming each bad field)."""
    raw = await request.read()
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except ValueError as exc:
        detail = str(exc) if isinstance(exc, NonFinite) else "the request body must be a JSON object"
        raise BadRequest("invalid_json", detail) from None
    if not isinstance(data, dict):
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    if _has_lone_surrogate(data):
        raise BadRequest("invalid_json", "the body holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
    try:
        loaded = schema.load(data)
    except ValidationError as exc:
        raise Unprocessable("validation_error", exc.messages) from None
    for name, field in schema.fields.items():
        if isinstance(field, WebhookUrl) and loaded.get(name):
            s = request.app[SETTINGS]
            try:
                await webhooks.check_target(loaded[name], webhooks.policy_for(s.webhook_allow_http, tuple(s.webhook_allow)))
            except webhooks.TargetRefused as exc:
                raise Unprocessable("validation_error", {name: [str(exc)]}) from None
    return loaded
