"""The BitTransfer fast parser answers exactly as the marshmallow schema does, for any JSON object."""
from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st
from marshmallow import ValidationError

from service.payments.bittransfer import BitTransferSchema, parse_transfer

FIELDS = ["payer", "payer_pubkey", "payee_address", "payee_username", "amount", "timestamp", "description",
          "invoice", "nonce", "extra"]
values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-3, max_value=2**60), st.floats(),
                   st.text(max_size=3), st.text(min_size=60, max_size=70), st.lists(st.integers(), max_size=2))
GOOD = {"payer": "alice", "payer_pubkey": "A" * 44, "payee_address": "1abc", "payee_username": "api",
        "amount": 10, "timestamp": 1_700_000_000.5, "description": "http://x/v1/a", "nonce": "ab"}


def outcome(parse, raw: dict) -> object:
    try:
        return ("ok", parse(raw))
    except ValidationError as exc:
        return ("error", exc.messages)


def same(a: object, b: object) -> bool:
    """Equal, treating NaN as equal to itself (the schema refuses NaN anyway)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b) if not isinstance(a, (tuple, dict)) else (
        a.keys() == b.keys() and all(same(a[k], b[k]) for k in a) if isinstance(a, dict)
        else len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS), values), st.booleans())
def test_fast_parser_matches_the_schema(changes: dict, start_good: bool) -> None:
    raw = {**(GOOD if start_good else {}), **changes}
    assert same(outcome(parse_transfer, raw), outcome(BitTransferSchema().load, raw))


def test_a_well_formed_transfer_parses_to_the_schemas_result() -> None:
    assert parse_transfer(dict(GOOD, timestamp=1_700_000_000)) == BitTransferSchema().load(dict(GOOD, timestamp=1_700_000_000))
