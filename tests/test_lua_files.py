"""Every atomic Redis step is a `service/lua/*.lua` file whose header says what it takes and returns."""
import pathlib
import re

import pytest

from service.ledger import MAX_COUNTER
from service.scripts import LUA_DIR, lua

SCRIPTS = sorted(p.stem for p in LUA_DIR.glob("*.lua"))


def _header(text: str) -> str:
    lines = text.split("\n")
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("--"))])


@pytest.mark.parametrize("name", SCRIPTS)
def test_header_documents_keys_argv_and_returns(name: str) -> None:
    text = lua(name)
    header = _header(text)
    assert "KEYS" in header and "ARGV" in header and "Returns" in header, name
    if "KEYS[1]" in header:  # indexed style: every key the script touches is listed
        used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", text.removeprefix(header))}
        listed = {int(n) for n in re.findall(r"\[(\d+)\]", header.split("ARGV")[0])}
        assert used <= listed, f"{name}: KEYS {sorted(used - listed)} used but not documented"


def test_max_literal_is_the_ledgers_max_counter() -> None:
    for name in ("ledger_transfer", "ledger_post_all"):
        assert f"local MAX = {MAX_COUNTER}\n" in lua(name)


def test_no_lua_left_in_python_strings() -> None:
    service = pathlib.Path(__file__).resolve().parents[1] / "service"
    offenders = [str(p) for p in service.rglob("*.py") if "redis.call(" in p.read_text()]
    assert offenders == []
