"""Crowd QA. Runner: register a runner, claim a job (staking its stake), submit the result. Buyer: post a job
(its rewards held in escrow), accept or reject each result, close the job (the rest comes back)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import Config
from .output import Out, UsageError, command, reply

__all__ = ["add_commands"]


def _labels(items: list[str] | None) -> dict[str, str]:
    labels = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--label wants KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def _read(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


async def cmd_runner(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        if args.action == "register":
            status, body = await s.signed("POST", f"{server}/v1/qa/runners", {"labels": _labels(args.label)})
            return reply(out, status, body, lambda: out.line(f"runner {body['id']} registered"))
        if args.action == "claim":
            status, body = await s.signed("POST", f"{server}/v1/qa/jobs/claim", {"runner": args.runner, "wait": args.wait})
            if status == 204:
                out.data(None, lambda: out.line("no job to claim"))
                return 0
            if status == 200 and args.manifests and body.get("manifests"):
                Path(args.manifests).write_text(body["manifests"])
            return reply(out, status, body, lambda: out.fields(body, [
                "job", "title", "reward", "stake", "lease_expires_at", "instructions"]))
        status, body = await s.signed("POST", f"{server}/v1/qa/jobs/{args.job}/result", {
            "runner": args.runner, "status": args.status, "junit": _read(args.junit), "log": _read(args.log)})
    return reply(out, status, body)


async def cmd_job(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    server = cfg.need_server()
    async with cfg.signer() as s:
        if args.action == "create":
            status, body = await s.signed("POST", f"{server}/v1/qa/jobs", {
                "title": args.title, "instructions": args.instructions, "manifests": _read(args.manifests) or None,
                "labels": _labels(args.label), "reward": args.reward, "results_wanted": args.results_wanted,
                "expires_in": args.expires_in, "auto_accept": args.auto_accept})
        elif args.action == "show":
            status, body = await s.signed_get(f"{server}/v1/qa/jobs/{args.id}")
        elif args.action == "close":
            status, body = await s.signed("POST", f"{server}/v1/qa/jobs/{args.id}/close")
        else:
            status, body = await s.signed("POST", f"{server}/v1/qa/jobs/{args.id}/results/{args.result}/{args.action}")
            return reply(out, status, body)
    return reply(out, status, body, lambda: _show_job(out, body))


def _show_job(out: Out, job: dict[str, Any]) -> None:
    """A job's fields, then its results as a table."""
    out.fields(job, [k for k in job if k != "results"])
    if job.get("results"):
        out.table(job["results"], [("RESULT", "id"), ("RUNNER", "runner"), ("STATUS", "status"), ("STATE", "state")])


def add_commands(sub: Any) -> None:
    r = command(sub, "runner", None, "crowd runner: register, claim jobs, submit results")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    reg = command(rsub, "register", cmd_runner, "register a runner on your account")
    reg.add_argument("--label", action="append", help="KEY=VALUE the jobs you can run (e.g. arch=amd64; repeatable)")
    c = command(rsub, "claim", cmd_runner, "claim a job under a lease (stakes the job's stake from your balance)")
    c.add_argument("runner", help="runner id (rn_...)")
    c.add_argument("--wait", type=float, default=0, help="seconds to wait for a job (up to 30)")
    c.add_argument("--manifests", help="write the job's manifests to this file")
    sm = command(rsub, "submit", cmd_runner, "submit the result of a claimed job")
    sm.add_argument("job")
    sm.add_argument("runner")
    sm.add_argument("--status", choices=("passed", "failed"), required=True)
    sm.add_argument("--junit", help="JUnit XML file")
    sm.add_argument("--log", help="log file")
    j = command(sub, "job", None, "crowd job buyer: create, show, accept or reject results, close")
    jsub = j.add_subparsers(dest="action", required=True, metavar="ACTION")
    jc = command(jsub, "create", cmd_job, "post a job: reward x results wanted is held from your balance")
    jc.add_argument("title")
    jc.add_argument("--reward", type=int, required=True, help="sat paid per accepted result")
    jc.add_argument("--results-wanted", type=int, required=True)
    jc.add_argument("--instructions", default="")
    jc.add_argument("--manifests", help="YAML file the runners get")
    jc.add_argument("--label", action="append", help="KEY=VALUE a runner must have (repeatable)")
    jc.add_argument("--expires-in", type=int, default=86_400, help="seconds")
    jc.add_argument("--auto-accept", action="store_true", help="pay passing results without review")
    for name, text in (("show", "the job, its results and escrow"), ("close", "close the job: unearned escrow comes back")):
        command(jsub, name, cmd_job, text).add_argument("id")
    for name, text in (("accept", "accept a result: its runner is paid"), ("reject", "reject a result: its stake is forfeited")):
        d = command(jsub, name, cmd_job, text)
        d.add_argument("id")
        d.add_argument("result")
