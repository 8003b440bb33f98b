"""marshmallow schemas for every request body, and the one helper that turns their errors into 4xx."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError, fields, validate, validates, validates_schema

from . import crypto, webhooks
from .errors import BadRequest, Unprocessable

__all__ = ["RegisterSchema", "CreditSchema", "TokenSchema", "RunSchema", "RunnerSchema", "CrowdJobSchema", "ClaimSchema",
           "ResultSchema", "ProfileSchema", "QuestionSchema", "ListQuestionSchema", "ListSchema", "ReplySchema", "PayoutSchema", "WithdrawalSchema",
           "load_json", "USERNAME_RE", "MAX_AMOUNT"]

USERNAME_RE = r"^[a-z0-9][a-z0-9_.-]{1,38}$"
MAX_AMOUNT = 21_000_000 * 100_000_000  # every satoshi there will ever be
RESERVED_USERNAMES = {"me", "admin", "microtasks", "root", "system"}


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
    username = fields.String(required=True, validate=validate.Regexp(
        USERNAME_RE, error="2-39 characters: lowercase letters, digits, '_', '.', '-', starting with a letter or digit"))
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
    max_total = fields.Integer(required=True, strict=True, validate=validate.Range(1, MAX_AMOUNT))
    max_per_call = fields.Integer(load_default=None, strict=True, validate=validate.Range(1, MAX_AMOUNT))
    expires_at = fields.Integer(load_default=None, strict=True, validate=validate.Range(1, 2**40))
    routes = fields.List(fields.String(validate=validate.Regexp(r"^/[A-Za-z0-9/_.{}-]{0,200}$")),
                         load_default=list, validate=validate.Length(max=20))
    label = fields.String(load_default="", validate=validate.Length(max=100))


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
    labels = fields.Dict(keys=fields.String(validate=validate.Regexp(r"^[a-z0-9][a-z0-9._/-]{0,62}$")),
                         values=fields.String(validate=validate.Length(1, 63)), required=True,
                         validate=validate.Length(max=20))


class CrowdJobSchema(Schema):
    title = fields.String(required=True, validate=validate.Length(1, 200))
    instructions = fields.String(load_default="", validate=validate.Length(max=10_000))
    manifests = fields.String(load_default=None, validate=validate.Length(max=1024 * 1024))
    labels = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict,
                         validate=validate.Length(max=20))
    reward = fields.Integer(required=True, strict=True, validate=validate.Range(1, 10**9))
    results_wanted = fields.Integer(required=True, strict=True, validate=validate.Range(1, 100))
    expires_in = fields.Integer(load_default=86_400, strict=True, validate=validate.Range(10, 30 * 86_400))
    auto_accept = fields.Boolean(load_default=False)


class ClaimSchema(Schema):
    runner = fields.String(required=True, validate=validate.Regexp(r"^rn_[0-9a-f]{16}$"))
    wait = fields.Float(load_default=0.0, validate=validate.Range(0, 30))


class ResultSchema(Schema):
    runner = fields.String(required=True, validate=validate.Regexp(r"^rn_[0-9a-f]{16}$"))
    status = fields.String(required=True, validate=validate.OneOf(["passed", "failed"]))
    junit = fields.String(load_default="", validate=validate.Length(max=1024 * 1024))
    log = fields.String(load_default="", validate=validate.Length(max=64 * 1024))


class ProfileSchema(Schema):
    display_name = fields.String(required=True, validate=validate.Length(1, 100))
    bio = fields.String(load_default="", validate=validate.Length(max=4000))
    tags = fields.List(fields.String(validate=validate.Regexp(r"^[a-z0-9][a-z0-9.+-]{0,31}$")), load_default=list,
                       validate=validate.Length(max=20))
    price = fields.Integer(load_default=None, strict=True, validate=validate.Range(1, 10**8))
    price_usd = fields.String(load_default=None, validate=validate.Regexp(
        r"^\$?\d{1,6}(\.\d{1,2})?$", error="a dollar amount such as 0.50 or $12"))
    reply_hours = fields.Integer(load_default=72, strict=True, validate=validate.Range(1, 24 * 30))
    payout = fields.String(load_default=None, validate=validate.Regexp(r"^(keep|charity:[a-z0-9-]{1,64})$"))
    links = fields.Dict(keys=fields.String(validate=validate.Length(1, 32)), values=fields.Url(), load_default=dict,
                        validate=validate.Length(max=10))
    available_for_hire = fields.Boolean(load_default=False)
    webhook = WebhookUrl(load_default=None)

    @validates_schema
    def _one_price(self, data: dict[str, Any], **kwargs: Any) -> None:
        if (data.get("price") is None) == (data.get("price_usd") is None):
            raise ValidationError("give exactly one of 'price' (sat) or 'price_usd'", field_name="price")


class QuestionSchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 5000))


class FormFieldSchema(Schema):
    id = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9_]{1,32}$"))
    type = fields.String(required=True, validate=validate.OneOf(["choice", "number", "text"]))
    label = fields.String(required=True, validate=validate.Length(1, 500))
    options = fields.List(fields.String(validate=validate.Length(1, 200)), load_default=list,
                          validate=validate.Length(max=50))


class ListQuestionSchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 5000))
    max_responses = fields.Integer(required=True, strict=True, validate=validate.Range(1, 1000))
    hours = fields.Integer(load_default=72, strict=True, validate=validate.Range(1, 24 * 30))
    form = fields.List(fields.Nested(FormFieldSchema), load_default=None, validate=validate.Length(1, 50))


class ListSchema(Schema):
    name = fields.String(required=True, validate=validate.Regexp(r"^[a-z0-9][a-z0-9-]{1,39}$"))
    description = fields.String(load_default="", validate=validate.Length(max=2000))
    price = fields.Integer(required=True, strict=True, validate=validate.Range(1, 10**8))
    approval_required = fields.Boolean(load_default=False)


class ReplySchema(Schema):
    text = fields.String(required=True, validate=validate.Length(1, 20_000))
    answers = fields.Dict(load_default=None)


class PayoutSchema(Schema):
    payout = fields.String(required=True, validate=validate.Regexp(
        r"^(keep|charity:[a-z0-9-]{1,64}|address:[A-Za-z0-9]{14,90})$",
        error="keep, charity:<id> or address:<bitcoin address>"))
    minimum = fields.Integer(load_default=None, strict=True, validate=validate.Range(1, MAX_AMOUNT))


class WithdrawalSchema(Schema):
    amount = fields.Integer(required=True, strict=True, validate=validate.Range(1, MAX_AMOUNT))
    address = fields.String(required=True, validate=validate.Length(14, 90))


class CreditSchema(Schema):
    username = fields.String(required=True, validate=validate.Regexp(USERNAME_RE))
    amount = fields.Integer(required=True, strict=True, validate=validate.Range(1, MAX_AMOUNT))
    reason = fields.String(required=True, validate=validate.Length(1, 200))
    id = fields.String(load_default=None, validate=validate.Regexp(r"^[A-Za-z0-9._:-]{1,100}$"))


async def load_json(request: web.Request, schema: Schema) -> dict[str, Any]:
    """Parse the body as JSON (400 if it is not) and validate it (422 naming each bad field)."""
    raw = await request.read()
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("invalid_json", "the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("invalid_json", "the request body must be a JSON object")
    try:
        loaded = schema.load(data)
    except ValidationError as exc:
        raise Unprocessable("validation_error", exc.messages) from None
    for name, field in schema.fields.items():
        if isinstance(field, WebhookUrl) and loaded.get(name):
            try:
                await webhooks.check_target(loaded[name])
            except webhooks.TargetRefused as exc:
                raise Unprocessable("validation_error", {name: [str(exc)]}) from None
    return loaded
