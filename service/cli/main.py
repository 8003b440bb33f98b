"""`microtasks`: the client command line, one module per role. Config: flags, then env (MICROTASKS_SERVER,
MICROTASKS_TOKEN, MICROTASKS_WALLET), then the config file. Output: lines and tables; --json for scripts.
Exit codes: 0 done, 1 findings or an HTTP error, 2 usage, configuration or payment error."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

import aiohttp

from ..client import PaymentError
from . import account, asker, crowd, developer, expert, lists, surveyor
from .config import Config
from .output import EXIT_OK, EXIT_USAGE, Out, UsageError

__all__ = ["main", "build_parser"]

ROLES = (("account holder", account), ("developer and CI", developer), ("asker", asker), ("expert and member", expert),
         ("list owner and member", lists), ("surveyor", surveyor), ("crowd runner and buyer", crowd))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="microtasks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands by role:\n" + "\n".join(f"  {role}: {', '.join(_names(module))}" for role, module in ROLES)
        + "\n  operator: python -m service --help (serve, reconcile, credit, ...)")
    p.add_argument("--server", help="service URL (env MICROTASKS_SERVER)")
    p.add_argument("--token", help="spending token id.secret (env MICROTASKS_TOKEN)")
    p.add_argument("--wallet", help="wallet file (default: config dir/wallet.json)")
    p.add_argument("--json", action="store_true", default=False, help="print results as JSON (every command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _, module in ROLES:
        module.add_commands(sub)
    return p


def _names(module: object) -> list[str]:
    scratch = argparse.ArgumentParser(add_help=False).add_subparsers()
    module.add_commands(scratch)  # type: ignore[attr-defined]
    return list(scratch.choices)


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Runs one command; `stdout`/`stderr` default to the process's (tests pass their own)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    out = Out(json_mode=args.json, stream=stdout, errors=stderr)
    try:
        result = args.func(args, Config.resolve(args), out)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result
    except UsageError as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE
    except PaymentError as exc:
        out.error(f"payment error: {exc}")
        return EXIT_USAGE
    except (OSError, aiohttp.ClientError) as exc:
        out.error(f"error: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
