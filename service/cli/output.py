"""One output and exit-code contract for every `microtasks` command: tables and plain lines for people
(terminal or not), `--json` for machines (the server's JSON, one document); exit 0 done, 1 the server said
no (HTTP error) or findings, 2 usage, configuration or payment error."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable, Sequence

__all__ = ["EXIT_OK", "EXIT_FINDINGS", "EXIT_USAGE", "UsageError", "Out", "safe", "command", "reply"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
_CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but newline, and DEL
WIDEST = 40  # a column's cap: longer cells are cut with "…" so the next column stays in line


class UsageError(Exception):
    """Bad flags, missing files or config: exit 2 with the message."""


def safe(text: object) -> str:
    """What the server sent (replies, names, errors) may carry terminal escapes (ESC[2K, OSC 52 clipboard
    writes, ESC[8m hidden text): every line printed loses its control characters, terminal or not."""
    return _CONTROLS.sub("", str(text))


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else safe(value).replace("\n", " ")


class Out:
    """Where a command prints: `json` mode writes the data as JSON; otherwise lines and tables."""

    def __init__(self, json_mode: bool = False, stream: Any = None, errors: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.errors = errors or sys.stderr
        self.tty = self.stream.isatty()
        self.json_mode = json_mode

    def line(self, text: str) -> None:
        """A line for people; JSON mode prints only the data, so a pipe into `jq` stays valid."""
        if not self.json_mode:
            print(safe(text), file=self.stream, flush=True)

    def error(self, text: str) -> None:
        """What went wrong, on stderr in both modes."""
        print(safe(text), file=self.errors, flush=True)

    def data(self, obj: Any, human: Callable[[], None] | None = None) -> None:
        """The result: as JSON with --json, else as `human` prints it (key: value lines by default)."""
        if self.json_mode:
            print(safe(json.dumps(obj, indent=2)), file=self.stream, flush=True)
        elif human is not None:
            human()
        elif isinstance(obj, dict):
            self.fields(obj)
        else:
            self.line(_cell(obj))

    def fields(self, obj: dict[str, Any], keys: Sequence[str] | None = None) -> None:
        for key in keys or list(obj):
            if key in obj:
                self.line(f"{key}: {_cell(obj[key])}")

    def table(self, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
        """Columns (HEADER, key) sized to their content, capped at WIDEST but the last one."""
        cells = [[_cell(row.get(key)) for _, key in columns] for row in rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (h, _) in enumerate(columns)]
        widths = [min(w, WIDEST) for w in widths[:-1]] + widths[-1:]

        def fmt(values: list[str]) -> str:
            cut = [v if len(v) <= w or i == len(values) - 1 else v[:w - 1] + "…"
                   for i, (v, w) in enumerate(zip(values, widths))]
            return "  ".join(v.ljust(w) for v, w in zip(cut[:-1], widths[:-1])) + ("  " if len(cut) > 1 else "") + cut[-1]

        self.line(fmt([h for h, _ in columns]).rstrip())
        for r in cells:
            self.line(fmt(r).rstrip())


def reply(out: Out, status: int, body: Any, human: Callable[[], None] | None = None, ok: int = 300) -> int:
    """The one way a command ends on a server answer: the data (exit 0), or the error (exit 1)."""
    if status < ok:
        out.data(body, human)
        return EXIT_OK
    if out.json_mode:
        out.data(body)
    code = body.get("error") if isinstance(body, dict) else ""
    detail = _cell(body.get("detail")) if isinstance(body, dict) else body
    out.error(f"error: HTTP {status} {code}: {detail}")
    return EXIT_FINDINGS


_JSON = argparse.ArgumentParser(add_help=False)
_JSON.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="print the result as JSON (for scripts) instead of lines and tables")


def command(sub: Any, name: str, func: Callable[..., Any] | None, help_text: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand with --help and --json; `func(args, cfg, out)` runs it (None: it has subcommands)."""
    parser = sub.add_parser(name, help=help_text, description=help_text, parents=[_JSON], **kw)
    if func is not None:
        parser.set_defaults(func=func)
    return parser
