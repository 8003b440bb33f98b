"""Surveyor: ask a list with a form (a YAML/JSON file of fields), then download the answers as CSV or JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .asker import paid_post, show_question
from .config import Config, load_document
from .output import EXIT_OK, Out, UsageError, command, reply

__all__ = ["add_commands"]


def _form(path: str) -> list[dict[str, Any]]:
    """A list of fields, or {fields: [...]}: each {id, type: choice|number|text, label, options}."""
    doc = load_document(path)
    fields = doc.get("fields") if isinstance(doc, dict) else doc
    if not isinstance(fields, list) or not fields:
        raise UsageError(f"{path}: a form is a list of fields (or {{fields: [...]}}), each with id, type, label")
    return fields


async def cmd_survey_ask(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    body = {"text": args.question, "max_responses": args.max_responses, "hours": args.hours, "form": _form(args.form)}
    status, q = await paid_post(cfg, args, out, f"/v1/lists/{args.list}/questions", body)
    return reply(out, status, q, lambda: show_question(out, q))


async def cmd_survey_responses(args: argparse.Namespace, cfg: Config, out: Out) -> int:
    fmt = "json" if out.json_mode else args.format
    url = f"{cfg.need_server()}/v1/questions/{args.id}/responses?format={fmt}"
    async with cfg.signer() as s:
        status, body = await s.signed_get(url)
    if status >= 300 or not args.out:
        return reply(out, status, body, lambda: out.line(str(body).rstrip("\n")))
    Path(args.out).write_text(body if isinstance(body, str) else json.dumps(body, indent=2))
    out.line(f"responses written to {args.out}")
    return EXIT_OK


def add_commands(sub: Any) -> None:
    p = command(sub, "survey", None, "ask a list with a form; download the responses")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = command(ssub, "ask", cmd_survey_ask, "ask LIST with a form: price x --max-responses held in escrow")
    a.add_argument("list")
    a.add_argument("question")
    a.add_argument("--form", required=True, help="YAML/JSON file: fields, each {id, type: choice|number|text, "
                                                  "label, options}")
    a.add_argument("--max-responses", type=int, required=True)
    a.add_argument("--hours", type=int, default=72, help="deadline: unpaid shares are refunded after it")
    a.add_argument("--max-price", type=int, required=True, help="refuse to pay more than this in total")
    r = command(ssub, "responses", cmd_survey_responses, "the answers so far, as CSV (default) or JSON")
    r.add_argument("id")
    r.add_argument("--format", choices=("csv", "json"), default="csv")
    r.add_argument("--out", help="write to this file instead of stdout")
