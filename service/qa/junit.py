"""JUnit XML from suite cases: one <testcase> per document × rule, as CI systems render it."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Iterable

__all__ = ["to_junit"]


def to_junit(suite: str, cases: Iterable[dict[str, Any]], *, run_id: str = "", seconds: float = 0.0) -> str:
    cases = list(cases)
    root = ET.Element("testsuites", name="microtasks")
    ts = ET.SubElement(root, "testsuite", name=f"microtasks.{suite}", tests=str(len(cases)),
                       failures=str(sum(c["status"] == "failed" for c in cases)),
                       skipped=str(sum(c["status"] == "skipped" for c in cases)), errors="0",
                       time=f"{seconds:.3f}", id=run_id)
    for c in cases:
        where = f"document {c['document']}" if c["document"] >= 0 else "bundle"
        tc = ET.SubElement(ts, "testcase", classname=f"{where}.{c['kind']}/{c['name'] or '-'}",
                           name=f"{c['rule']}" + (f" {c['path']}" if c.get("path") else ""), time="0")
        if c["status"] == "failed":
            msg = f"{c['path'] + ': ' if c.get('path') else ''}{c['message']}"
            failure = ET.SubElement(tc, "failure", message=msg[:500], type=c.get("severity", "error"))
            failure.text = msg + (f"\nfix: {c['fix']}" if c.get("fix") else "")
        elif c["status"] == "skipped":
            ET.SubElement(tc, "skipped", message=c.get("message", "")[:500])
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
