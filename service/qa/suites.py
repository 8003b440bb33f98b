"""QA suites are plug-ins behind one small interface, registered by name; an operator adds one with
`register(MySuite())`. A suite turns a bundle of parsed documents into test cases (document × rule)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from . import manifests, policy

__all__ = ["Case", "Outcome", "Suite", "SUITES", "register", "get", "SchemaSuite", "PolicySuite", "ConformanceSuite"]


@dataclass(frozen=True)
class Case:
    """One test case: a rule applied to one document (or to the bundle, document = -1)."""

    document: int
    kind: str
    name: str | None
    rule: str
    status: str                 # passed | failed | skipped
    severity: str = "error"
    path: str = ""
    message: str = ""
    fix: str = ""


@dataclass
class Outcome:
    cases: list[Case] = field(default_factory=list)

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if c.status == "failed"]

    def summary(self, documents: int) -> dict[str, int]:
        return {"documents": documents, "testcases": len(self.cases), "failures": len(self.failed),
                "skipped": sum(1 for c in self.cases if c.status == "skipped")}


@runtime_checkable
class Suite(Protocol):
    id: str
    description: str
    version: str
    base_price: int
    per_document: int

    def run(self, docs: list[dict[str, Any]], k8s_version: str, strict: bool) -> Outcome:
        """Check the bundle; raise only for infrastructure failures (the payer is then refunded)."""


def _label(doc: dict[str, Any]) -> tuple[str, str | None]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return str(doc.get("kind")), meta.get("name")


class SchemaSuite:
    id = "schema"
    description = "Every document validated against the Kubernetes API schemas of the chosen version"
    version = "1"
    base_price, per_document = 100, 20

    def run(self, docs: list[dict[str, Any]], k8s_version: str, strict: bool) -> Outcome:
        out = Outcome()
        for result in manifests.validate_documents(docs, k8s_version, strict=strict):
            kind, name, i = result["kind"], result["name"], result["index"]
            if result["valid"] is None:
                out.cases.append(Case(i, kind, name, "schema", "skipped", "info", "", "; ".join(result["warnings"])))
            elif not result["errors"]:
                out.cases.append(Case(i, kind, name, "schema", "passed"))
            for err in result["errors"]:
                out.cases.append(Case(i, kind, name, "schema", "failed", "error", err["path"], err["message"],
                                      "fix the field so that it matches the Kubernetes API schema"))
        return out


class PolicySuite:
    id = "policy"
    description = ("Best-practice checks with a rule id, severity and fix hint each: image tags, requests and "
                   "limits, probes, runAsNonRoot, privilege, host namespaces, Service selectors, PodDisruptionBudgets")
    version = "1"
    base_price, per_document = 200, 30
    cross = False

    def run(self, docs: list[dict[str, Any]], k8s_version: str, strict: bool) -> Outcome:
        findings = policy.check_bundle(docs, cross=self.cross)
        failed: dict[tuple[int, str], list[policy.Finding]] = {}
        for f in findings:
            failed.setdefault((f.document, f.rule), []).append(f)
        out = Outcome()
        for i, doc in enumerate(docs):
            kind, name = _label(doc)
            for r in policy.RULES.values():
                if (r.cross and not self.cross) or not policy.applies(r, doc):
                    continue
                hits = failed.get((i, r.id), [])
                if not hits:
                    out.cases.append(Case(i, kind, name, r.id, "passed", r.severity))
                for f in hits:
                    out.cases.append(Case(i, kind, name, r.id, "failed", r.severity, f.path, f.message, r.fix))
        return out


class ConformanceSuite(PolicySuite):
    id = "conformance"
    description = ("The schema and policy suites together, plus cross-document checks: duplicate names, "
                   "namespaces used but not defined, ConfigMap/Secret references that resolve to nothing")
    base_price, per_document = 300, 40
    cross = True

    def run(self, docs: list[dict[str, Any]], k8s_version: str, strict: bool) -> Outcome:
        out = SchemaSuite().run(docs, k8s_version, strict)
        out.cases += super().run(docs, k8s_version, strict).cases
        return out


SUITES: dict[str, Suite] = {}


def register(suite: Suite) -> Suite:
    SUITES[suite.id] = suite
    return suite


def get(suite_id: str) -> Suite | None:
    return SUITES.get(suite_id)


register(SchemaSuite())
register(PolicySuite())
register(ConformanceSuite())
