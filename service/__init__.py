"""K8s Community Microtasks: a pay-per-call (HTTP 402) API on a Redis ledger."""
import os
from pathlib import Path

# bitcoinlib writes ~/.bitcoinlib on first import; keep its files inside the project instead.
os.environ.setdefault("BCL_DATA_DIR", str(Path(os.environ.get("MICROTASKS_VAR", "var")).absolute() / "bitcoinlib"))

__all__: list[str] = []
