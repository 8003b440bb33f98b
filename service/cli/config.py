"""Where a command finds its server, key and token: flags, then env (MICROTASKS_SERVER, MICROTASKS_TOKEN,
MICROTASKS_WALLET), then the config file; and the sessions that sign or pay with them."""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import PaidSession, Wallet
from .output import UsageError

__all__ = ["Config", "config_dir", "save_config", "parse_duration", "load_document"]


def config_dir() -> Path:
    if os.environ.get("MICROTASKS_CONFIG_DIR"):
        return Path(os.environ["MICROTASKS_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "microtasks"


@dataclass
class Config:
    server: str | None
    token: str | None
    wallet_path: Path

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> "Config":
        """Flags win over env, env over the config file."""
        path = config_dir() / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        server = getattr(args, "server", None) or os.environ.get("MICROTASKS_SERVER") or stored.get("server")
        token = getattr(args, "token", None) or os.environ.get("MICROTASKS_TOKEN") or stored.get("token")
        wallet = getattr(args, "wallet", None) or os.environ.get("MICROTASKS_WALLET") or stored.get("wallet")
        return cls(server.rstrip("/") if server else None, token, Path(wallet) if wallet else config_dir() / "wallet.json")

    def need_server(self) -> str:
        if not self.server:
            raise UsageError("no server: pass --server URL, set MICROTASKS_SERVER, or run `microtasks register --server URL`")
        return self.server

    def wallet(self) -> Wallet:
        if not self.wallet_path.exists():
            raise UsageError(f"no wallet at {self.wallet_path}: run `microtasks wallet init USERNAME`")
        return Wallet.load(self.wallet_path)

    def signer(self) -> PaidSession:
        """Signs account requests with the wallet's key (pays nothing)."""
        return PaidSession(self.wallet())

    def payer(self, max_price: int, budget: int | None = None) -> PaidSession:
        """Pays with the token when one is configured (CI), else with the wallet's key."""
        if self.token:
            return PaidSession(max_price=max_price, budget=budget, token=self.token)
        return PaidSession(self.wallet(), max_price=max_price, budget=budget)


def save_config(**values: Any) -> None:
    path = config_dir() / "config.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored.update({k: v for k, v in values.items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2))


def parse_duration(text: str) -> int:
    """'90', '45m', '12h', '30d' → seconds."""
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not m:
        raise UsageError(f"not a duration: {text!r} (use e.g. 3600, 45m, 12h, 30d)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def load_document(path: str) -> Any:
    """A YAML or JSON file (JSON is YAML): forms, answers."""
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML or JSON: {exc}") from None
