"""service.metrics is a leaf: importing it loads nothing else of the app, so no module that counts
something (experts, crowd, runs, reorgs) can close an import cycle through it (metrics -> state -> ...)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metrics_imports_nothing_of_the_app() -> None:
    code = "import service.metrics, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('service', 'endpoints')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['service', 'service.metrics']"
