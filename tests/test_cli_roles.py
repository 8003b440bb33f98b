"""`microtasks` for every role (issue 15): asker, expert, list owner and member, surveyor, crowd runner and
buyer, account holder; each user has their own wallet, all against the real server over HTTP."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli.main import build_parser, main
from service.ledger import user_account

ADDRESS = "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"  # testnet: the test settings' network


class User:
    """One person at a terminal: their own wallet file, the server's URL."""

    def __init__(self, name: str, base_url: str, home: Path) -> None:
        self.name, self.base_url, self.wallet = name, base_url, home / f"{name}.json"

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        return await run(["--server", self.base_url, "--wallet", str(self.wallet), *args])

    async def json(self, *args: str) -> Any:
        code, out, err = await self("--json", *args)
        assert code == 0, out + err
        return json.loads(out)


async def run(argv: list[str]) -> tuple[int, str, str]:
    """main() in a thread (its own event loop) with its own stdout and stderr; the server keeps serving
    (and logging to the process's stdout, which argparse's usage errors also reach)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, argv, out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def people(base_url, admin_post, tmp_path, monkeypatch):
    monkeypatch.setenv("MICROTASKS_CONFIG_DIR", str(tmp_path / "config"))
    for var in ("MICROTASKS_SERVER", "MICROTASKS_TOKEN", "MICROTASKS_WALLET"):
        monkeypatch.delenv(var, raising=False)

    async def make(name: str, amount: int = 0) -> User:
        user = User(f"{name}-{tmp_path.name[-6:]}".lower().replace("_", "-")[:30], base_url, tmp_path)
        assert (await user("wallet", "init", user.name))[0] == 0
        code, out, err = await user("register")
        assert code == 0 and f"registered {user.name}" in out, out + err
        if amount:
            assert (await admin_post("/v1/admin/credits", {"username": user.name, "amount": amount, "reason": "t"}))[0] == 201
        return user

    return make


def leaf_commands(parser=None, prefix=()) -> list[tuple[str, ...]]:
    parser = parser or build_parser()
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]  # noqa: SLF001
    if not subs:
        return [prefix]
    return [leaf for name, child in subs[0].choices.items() for leaf in leaf_commands(child, (*prefix, name))]


async def test_every_command_has_help_and_json():
    leaves = leaf_commands()
    assert len(leaves) >= 35
    for leaf in leaves:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([*leaf, "--help"])
        assert code == 0 and out.getvalue().startswith("usage: microtasks") and "--json" in out.getvalue(), leaf


async def test_expert_and_asker(people, ledger):
    expert, asker = await people("expert"), await people("asker", 2_000)
    code, out, err = await expert("profile", "set", "--price", "300")
    assert code == 2 and "--display-name" in err  # a new profile needs a name
    code, out, err = await expert("profile", "set", "--display-name", "Kube Expert", "--price", "300", "--tag",
                                  "networking", "--github", "octocat", "--twitter", "@kube", "--linkedin", "kexpert",
                                  "--hire", "--reply-hours", "24")
    assert code == 0, err
    assert out.startswith(f"{expert.name}: Kube Expert, 300 sat per question, replies within 24 h")
    await expert("profile", "set", "--bio", "CNI and Services")  # one flag: the rest is kept
    shown = await asker.json("profile", "show", expert.name)
    assert shown["price"] == 300 and shown["bio"] == "CNI and Services" and shown["available_for_hire"]
    assert {site: (a["handle"], a["verified"]) for site, a in shown["accounts"].items()} == \
        {"github": ("octocat", False), "twitter": ("kube", False), "linkedin": ("kexpert", False)}
    assert shown["accounts"]["github"]["url"] == "https://github.com/octocat"
    code, out, _ = await asker("experts", "--tag", "networking")
    assert code == 0 and expert.name in out and out.splitlines()[0].startswith("USERNAME")

    code, out, err = await asker("ask", expert.name, "Which CNI for a 3-node lab?", "--max-price", "200")
    assert code == 2 and "exceeds max_price" in err
    code, out, err = await asker("ask", expert.name, "Which CNI for a 3-node lab?", "--max-price", "300")
    assert code == 0, err
    qid = out.split("question ")[1].split(",")[0]
    assert (await ledger.balance(user_account(asker.name))).posted == 1_700
    code, out, _ = await expert("inbox")
    assert code == 0 and qid in out and "Which CNI" in out
    code, out, err = await expert("reply", qid, "Cilium")
    assert code == 0 and f"replied to {qid}: 300 sat paid" in out, err
    code, out, _ = await asker("question", "show", qid)
    assert code == 0 and "reply from" in out and "Cilium" in out

    code, out, err = await asker("hire", expert.name, "Review our ingress setup; mail ops@example.org", "--max-price", "300")
    assert code == 0, err
    hire_id = out.split("question ")[1].split(",")[0]
    requests = await expert.json("inbox", "--hire")
    assert [q["id"] for q in requests["questions"]] == [hire_id]

    code, out, err = await asker("ask", expert.name, "Never mind", "--max-price", "300")
    withdrawn = out.split("question ")[1].split(",")[0]
    assert (await ledger.balance(user_account(asker.name))).posted == 1_100
    code, out, err = await asker("question", "withdraw", withdrawn)
    assert code == 0 and ("withdrawn" in out or "closed" in out), out + err
    assert (await ledger.balance(user_account(asker.name))).posted == 1_400  # the escrow came back
    code, _, err = await expert("question", "withdraw", hire_id)  # not the expert's to withdraw
    assert code == 1 and "error: HTTP" in err


async def test_list_owner_member_and_surveyor(people, tmp_path, ledger):
    owner, member, surveyor = await people("owner"), await people("member"), await people("surveyor", 1_000)
    name = f"k8s-{tmp_path.name[-6:]}".lower().replace("_", "-")
    code, out, err = await owner("list", "create", name, "--price", "50", "--approval", "--description", "CNI folks")
    assert code == 0, err
    assert (await member.json("list", "join", name))["state"] == "pending"
    code, out, _ = await owner("list", "members", name)
    assert code == 0 and out.splitlines()[1].split() == [member.name, "pending"]
    code, _, err = await member("list", "approve", name, member.name)  # only the owner approves
    assert code == 1 and "error: HTTP 403" in err
    assert (await owner.json("list", "approve", name, member.name))["state"] == "approved"
    assert member.name in (await surveyor.json("list", "show", name))["members"]
    code, out, _ = await surveyor("list", "all")
    assert code == 0 and name in out

    form = tmp_path / "form.yaml"
    form.write_text(yaml.safe_dump({"fields": [
        {"id": "cni", "type": "choice", "label": "Which CNI?", "options": ["cilium", "calico", "flannel"]},
        {"id": "nodes", "type": "number", "label": "How many nodes?"}]}))
    code, out, err = await surveyor("survey", "ask", name, "Your cluster", "--form", str(form),
                                    "--max-responses", "2", "--max-price", "100")
    assert code == 0, err
    qid = out.split("question ")[1].split(",")[0]
    assert (await ledger.balance(user_account(surveyor.name))).posted == 900
    inbox = await member.json("inbox")
    assert inbox["questions"][0]["form"][0]["id"] == "cni"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"cni": "cilium", "nodes": 3}))
    code, out, err = await member("reply", qid, "=HYPERLINK(\"x\")", "--answers", str(answers))
    assert code == 0, err
    report = tmp_path / "responses.csv"
    code, out, err = await surveyor("survey", "responses", qid, "--out", str(report))
    assert code == 0 and f"written to {report}" in out, err
    rows = list(csv.DictReader(report.open()))
    assert [(r["by"], r["cni"], r["nodes"], r["text"]) for r in rows] == [(member.name, "cilium", "3", "'=HYPERLINK(\"x\")")]
    responses = await surveyor.json("survey", "responses", qid)
    assert responses[0]["answers"] == {"cni": "cilium", "nodes": 3}
    assert (await member.json("list", "leave", name))["state"] == "left"


async def test_crowd_runner_and_buyer(people, tmp_path, ledger):
    buyer, runner = await people("buyer", 1_000), await people("runner", 100)
    manifests = tmp_path / "job.yaml"
    manifests.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    job = await buyer.json("job", "create", "Validate on arm64", "--reward", "200", "--results-wanted", "1",
                           "--manifests", str(manifests), "--label", "arch=arm64")
    assert (await ledger.balance(user_account(buyer.name))).available == 800
    rn = await runner.json("runner", "register", "--label", "arch=arm64")
    code, out, err = await runner("runner", "claim", rn["id"], "--manifests", str(tmp_path / "got.yaml"))
    assert code == 0 and f"job: {job['id']}" in out, out + err
    assert (tmp_path / "got.yaml").read_text() == manifests.read_text()
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite name="x" tests="1" failures="0"><testcase classname="ConfigMap/a" name="ok"/></testsuite></testsuites>')
    code, out, err = await runner("runner", "submit", job["id"], rn["id"], "--status", "passed", "--junit", str(junit))
    assert code == 0, err
    shown = await buyer.json("job", "show", job["id"])
    [result] = shown["results"]
    code, out, _ = await buyer("job", "show", job["id"])
    assert code == 0 and result["id"] in out
    code, out, err = await buyer("job", "accept", job["id"], result["id"])
    assert code == 0, err
    assert (await ledger.balance(user_account(runner.name))).posted == 300  # reward, and the stake back
    closed = await buyer.json("job", "close", job["id"])
    assert closed["id"] == job["id"]
    code, out, _ = await runner("runner", "claim", rn["id"])
    assert code == 0 and out.strip() == "no job to claim"
    job2 = await buyer.json("job", "create", "Another", "--reward", "100", "--results-wanted", "1")
    code, _, err = await buyer("job", "reject", job2["id"], "rs_0000000000000000")
    assert code == 1 and "error: HTTP" in err
    assert (await ledger.reconcile()).ok


async def test_account_holder(people, ledger):
    holder = await people("holder", 50_000)
    assert (await holder.json("payout", "set", f"address:{ADDRESS}", "--minimum", "40000"))["minimum"] == 40_000
    code, out, err = await holder("withdraw", "30000", ADDRESS)
    assert code == 0 and "state: queued" in out, out + err
    assert (await ledger.balance(user_account(holder.name))).available == 20_000
    code, out, _ = await holder("account")
    assert code == 0 and f'payout: {{"mode":"address:{ADDRESS}","minimum":40000}}' in out and "queued" in out
    code, _, err = await holder("withdraw", "30000", ADDRESS)
    assert code == 1 and "insufficient_funds" in err
    code, _, err = await holder("deposit-address")  # this server has no PAYEE_XPUB
    assert code == 1 and "error: HTTP 404 deposits_disabled" in err
