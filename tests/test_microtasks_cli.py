"""The `microtasks` CLI as a CI job runs it: real server over HTTP, plain output, exit codes, JUnit."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from service.ledger import user_account

GOOD = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1.27"}]
"""
BAD = GOOD.replace("replicas: 1", 'replicas: "many"').replace("name: web}", "name: bad}")


@pytest.fixture
def cli(tmp_path, base_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROTASKS_")}
    env.update(MICROTASKS_CONFIG_DIR=str(tmp_path / "config"), MICROTASKS_SERVER=base_url)

    async def run(*args: str, extra_env: dict[str, str] | None = None) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", *args, env={**env, **(extra_env or {})},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    return run


@pytest.fixture
def manifests(tmp_path) -> Path:
    d = tmp_path / "k8s"
    d.mkdir()
    (d / "web.yaml").write_text(GOOD)
    (d / "notes.txt").write_text("not a manifest")
    return d


async def registered(cli, admin_post, username: str, amount: int) -> None:
    code, out, err = await cli("wallet", "init", username)
    assert code == 0, err
    code, out, err = await cli("register")
    assert code == 0, out + err
    status, _ = await admin_post("/v1/admin/credits", {"username": username, "amount": amount, "reason": "t"})
    assert status == 201


async def test_wallet_is_private_and_register_and_balance_work(cli, admin_post, tmp_path):
    await registered(cli, admin_post, "cli-alice", 700)
    wallet = tmp_path / "config" / "wallet.json"
    assert stat.S_IMODE(wallet.stat().st_mode) == 0o600
    code, out, _ = await cli("balance", "--json")
    assert code == 0 and json.loads(out)["balance"] == 700
    code, _, err = await cli("wallet", "init", "cli-alice")
    assert code == 2 and "exists" in err


async def test_qa_run_pays_passes_and_writes_junit(cli, admin_post, manifests, tmp_path, ledger):
    await registered(cli, admin_post, "cli-bob", 1000)
    report = tmp_path / "report.xml"
    code, out, err = await cli("qa", "run", "--suite", "schema", "--k8s", "1.31", str(manifests),
                               "--max-price", "500", "--junit", str(report))
    assert code == 0, out + err
    assert "paid 120 sat" in out
    assert not any(c in out for c in ("\x1b", "\r")), "non-TTY output must be plain lines"
    suite = ET.parse(report).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "0")
    assert (await ledger.balance(user_account("cli-bob"))).posted == 1000 - 120


async def test_qa_run_with_findings_exits_1_and_reports_them(cli, admin_post, manifests, tmp_path):
    await registered(cli, admin_post, "cli-carol", 1000)
    (manifests / "bad.yaml").write_text(BAD)
    report = tmp_path / "report.xml"
    code, out, _ = await cli("qa", "run", str(manifests), "--max-price", "500", "--junit", str(report))
    assert code == 1
    assert "FAIL" in out and "spec.replicas" in out
    suite = ET.parse(report).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failure = suite.find("testcase/failure")
    assert "spec.replicas" in failure.get("message")


async def test_price_above_cap_exits_2_and_pays_nothing(cli, admin_post, manifests, ledger):
    await registered(cli, admin_post, "cli-dave", 1000)
    code, _, err = await cli("qa", "run", str(manifests), "--max-price", "50")
    assert code == 2 and "exceeds max_price" in err
    assert (await ledger.balance(user_account("cli-dave"))).posted == 1000


async def test_usage_errors_exit_2(cli, tmp_path):
    code, _, err = await cli("qa", "run", str(tmp_path / "missing"), "--max-price", "5")
    assert code == 2 and "no such file" in err
    code, _, _ = await cli("qa", "run")
    assert code == 2


async def test_ci_job_pays_with_a_token_without_the_wallet(cli, admin_post, manifests, tmp_path, ledger):
    await registered(cli, admin_post, "cli-erin", 1000)
    code, out, err = await cli("--json", "token", "create", "--max-total", "300", "--route", "/v1/qa/", "--expires-in", "1d",
                               "--label", "github-actions")
    assert code == 0, err
    token = json.loads(out)["token"]
    (tmp_path / "config" / "wallet.json").unlink()  # a CI runner has only the token
    code, out, err = await cli("qa", "run", str(manifests), "--max-price", "500", extra_env={"MICROTASKS_TOKEN": token})
    assert code == 0, out + err
    code, out, err = await cli("qa", "run", str(manifests), "--max-price", "500", "--budget", "100",
                               extra_env={"MICROTASKS_TOKEN": token})
    assert code == 2 and "budget" in err
    assert (await ledger.balance(user_account("cli-erin"))).posted == 1000 - 120


async def test_catalog_prints_priced_endpoints(cli):
    code, out, _ = await cli("catalog")
    assert code == 0 and "/v1/qa/validate" in out and "100 + 20 * documents" in out


async def test_ask_an_expert_pays_into_escrow_and_shows_the_reply(cli, admin_post, funded, http, base_url, ledger):
    expert = await funded(0)
    from service.client import PaidSession

    async with PaidSession(expert, session=http) as s:
        status, _ = await s.signed("PUT", f"{base_url}/v1/experts/me", {"display_name": "E", "price": 300})
    assert status == 200
    await registered(cli, admin_post, "cli-asker", 1000)
    code, out, err = await cli("ask", expert.username, "Which CNI?", "--max-price", "200")
    assert code == 2 and "exceeds max_price" in err
    code, out, err = await cli("ask", expert.username, "Which CNI?", "--max-price", "500")
    assert code == 0, out + err
    qid = out.split("question ")[1].split(",")[0]
    assert (await ledger.balance(user_account("cli-asker"))).posted == 700
    async with PaidSession(expert, session=http) as s:
        await s.signed("POST", f"{base_url}/v1/questions/{qid}/reply", {"text": "Cilium"})
    code, out, _ = await cli("question", "show", qid, "--json")
    assert code == 0 and json.loads(out)["replies"][0]["text"] == "Cilium"


async def test_one_output_contract_lines_by_default_json_with_the_flag(cli, admin_post):
    """Finding 4: wallet, register, balance and token printed indented JSON whatever the README said."""
    code, out, _ = await cli("wallet", "init", "cli-gina")
    assert code == 0 and out.startswith("username: cli-gina\n") and not out.lstrip().startswith("{")
    code, out, _ = await cli("register")
    assert code == 0 and out.startswith("registered cli-gina at http")
    await admin_post("/v1/admin/credits", {"username": "cli-gina", "amount": 500, "reason": "t"})
    code, out, _ = await cli("balance")
    assert code == 0 and out.startswith("cli-gina: balance 500 sat, available 500, pending 0\n")
    assert out.splitlines()[1].split()[:3] == ["WHEN", "(UTC)", "AMOUNT"]
    code, out, _ = await cli("token", "create", "--max-total", "100", "--label", "ci")
    assert code == 0 and "token: " in out and not out.startswith("{")
    code, out, _ = await cli("token", "list")
    assert code == 0 and out.startswith("ID") and "ci" in out
    for args in (("--json", "wallet", "show"), ("wallet", "show", "--json"), ("balance", "--json"),
                 ("token", "list", "--json"), ("catalog", "--json")):
        code, out, err = await cli(*args)
        assert code == 0 and json.loads(out), (args, out, err)


async def test_catalog_shows_who_sets_a_price_and_keeps_its_columns(cli):
    """Finding 5: expert-priced routes showed price 0; long rows pushed the description out of line."""
    code, out, _ = await cli("catalog")
    lines = out.splitlines()
    start = lines[0].index("DESCRIPTION")
    ask = next(line for line in lines if "/v1/experts/{username}/questions" in line)
    assert "set by the expert" in ask and " 0 " not in ask
    for line in lines[1:]:
        assert line[start - 2:start] == "  " and line[start] != " ", line
    code, out, _ = await cli("catalog", "--json")
    rule = next(op for op in json.loads(out) if op["path"] == "/v1/experts/{username}/questions")["price"]
    assert rule["formula"].startswith("set by the expert's profile price")


async def test_an_unsupported_kubernetes_version_is_an_http_error_exit_1(cli, admin_post, manifests):
    await registered(cli, admin_post, "cli-hal", 1000)
    code, out, err = await cli("qa", "run", str(manifests), "--k8s", "9.99", "--max-price", "500")
    assert code == 1 and "unsupported_kubernetes_version" in err, out + err


async def test_the_quick_buy_command_of_the_served_spec_works(cli, admin_post, base_url, http, tmp_path):
    """openapi.yaml's x-21-quick-buy, as served (this deployment's URL), pays and prints the result and receipt."""
    import shlex

    import yaml

    await registered(cli, admin_post, "quickbuyer", 1000)
    async with http.get(f"{base_url}/openapi.yaml") as r:
        command = shlex.split(yaml.safe_load(await r.text())["info"]["x-21-quick-buy"])
    (tmp_path / "deployment.yaml").write_text(GOOD)
    assert command[0] == "microtasks" and "@deployment.yaml" in command
    args = [f"@{tmp_path / 'deployment.yaml'}" if a == "@deployment.yaml" else a for a in command[1:]]
    code, out, err = await cli(*args)
    assert code == 0, out + err
    assert '"valid": true' in out and "paid 120 sat" in out + err
