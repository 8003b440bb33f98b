"""SECURITY.md names, for every attack class, the test that proves it: each named test must exist, so a
renamed or deleted test cannot leave a claim without its proof."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def test_every_test_named_in_security_md_exists():
    text = (ROOT / "SECURITY.md").read_text()
    missing, named = [], 0
    for line in text.splitlines():
        if "→" not in line:
            continue
        current = None
        for path, name in REF.findall(line):
            current = path or current
            assert current, f"a test name without its file: {line[:80]}"
            source = (ROOT / current).read_text()
            named += 1
            if not re.search(rf"^(async )?def {name}\(", source, re.MULTILINE):
                missing.append(f"{current}::{name}")
    assert named > 50
    assert not missing, missing
