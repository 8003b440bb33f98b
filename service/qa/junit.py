"""JUnit XML from suite cases (one <testcase> per document × rule, as CI systems render it), and the
check of JUnit a crowd runner sends as evidence."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Iterable

from ..errors import Unprocessable

__all__ = ["to_junit", "check_evidence"]

# Characters XML 1.0 cannot hold (NUL, most C0 controls, lone surrogates): ElementTree would write them as is.
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _x(text: str) -> str:
    """Text a document supplied (kind, name, a message quoting it), made writable in XML: the report stays
    parseable whatever the manifest held."""
    return _NOT_XML.sub("\ufffd", text)


def to_junit(suite: str, cases: Iterable[dict[str, Any]], *, run_id: str = "", seconds: float = 0.0) -> str:
    cases = list(cases)
    root = ET.Element("testsuites", name="microtasks")
    ts = ET.SubElement(root, "testsuite", name=f"microtasks.{suite}", tests=str(len(cases)),
                       failures=str(sum(c["status"] == "failed" for c in cases)),
                       skipped=str(sum(c["status"] == "skipped" for c in cases)), errors="0",
                       time=f"{seconds:.3f}", id=run_id)
    for c in cases:
        where = f"document {c['document']}" if c["document"] >= 0 else "bundle"
        tc = ET.SubElement(ts, "testcase", classname=_x(f"{where}.{c['kind']}/{c['name'] or '-'}"),
                           name=_x(f"{c['rule']}" + (f" {c['path']}" if c.get("path") else "")), time="0")
        if c["status"] == "failed":
            msg = _x(f"{c['path'] + ': ' if c.get('path') else ''}{c['message']}")
            failure = ET.SubElement(tc, "failure", message=msg[:500], type=c.get("severity", "error"))
            failure.text = msg + _x(f"\nfix: {c['fix']}" if c.get("fix") else "")
        elif c["status"] == "skipped":
            ET.SubElement(tc, "skipped", message=_x(c.get("message", "")[:500]))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


MAX_EVIDENCE = 1024 * 1024
_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def check_evidence(xml: str, *, status: str, names: list[str]) -> int:
    """Check a crowd result's JUnit before it is stored: it parses (bounded size; no DTD, so no entity
    expansion nor external entities, as defusedxml's forbid_dtd), holds test cases, names each of the
    job's manifests (`Kind/name` in a testcase's classname or name), and agrees with `status` (failures
    iff failed). Returns the number of test cases; Unprocessable("invalid_evidence") otherwise."""
    raw = xml.encode("utf-8", errors="surrogatepass")
    if not raw.strip():
        raise Unprocessable("invalid_evidence", "a result needs its JUnit XML as evidence")
    if len(raw) > MAX_EVIDENCE:
        raise Unprocessable("invalid_evidence", f"the JUnit XML exceeds {MAX_EVIDENCE} bytes")
    if _DTD.search(raw):
        raise Unprocessable("invalid_evidence", "the JUnit XML may not carry a DTD or entities")
    try:
        root = ET.fromstring(raw)
    except (ET.ParseError, ValueError):
        raise Unprocessable("invalid_evidence", "the JUnit XML does not parse") from None
    cases = list(root.iter("testcase"))
    if not cases:
        raise Unprocessable("invalid_evidence", "the JUnit XML holds no <testcase>")
    labels = [f"{c.get('classname', '')} {c.get('name', '')}" for c in cases]
    missing = [n for n in names if not any(n in label for label in labels)]
    if missing:
        raise Unprocessable("invalid_evidence", f"no test case names {', '.join(missing[:5])}"
                                                f"{' …' if len(missing) > 5 else ''} (the job's manifests)")
    failed = any(c.find("failure") is not None or c.find("error") is not None for c in cases)
    if failed != (status == "failed"):
        raise Unprocessable("invalid_evidence", f"the status is {status!r} but the JUnit XML has "
                                                f"{'failures' if failed else 'no failure'}")
    return len(cases)
