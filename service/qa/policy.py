"""Kubernetes best-practice rules over a bundle of parsed documents: each rule has a stable id, a
severity and a fix hint; bundle rules (Service selectors, PodDisruptionBudgets) see every document."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

__all__ = ["Rule", "Finding", "RULES", "check_bundle", "rule_ids", "pod_specs", "applies"]


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    severity: str      # error | warning | info
    description: str
    fix: str
    kinds: tuple[str, ...]   # the kinds it checks: one test case per document of these kinds
    cross: bool = False      # a cross-document consistency rule (the conformance suite adds these)


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str
    document: int
    kind: str
    name: str | None
    path: str
    message: str
    fix: str


RULES: dict[str, Rule] = {}
_DOC_RULES: list[tuple[Rule, Callable]] = []
_BUNDLE_RULES: list[tuple[Rule, Callable]] = []

# kind → path (within the document) of its pod spec
_POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
_SERVING = ("Deployment", "StatefulSet")


def rule(rule_id: str, name: str, severity: str, description: str, *, fix: str, bundle: bool = False,
         kinds: tuple[str, ...] | None = None, cross: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        r = Rule(rule_id, name, severity, description, fix, kinds or tuple(_POD_SPEC_PATHS), cross)
        assert rule_id not in RULES, rule_id
        RULES[rule_id] = r
        (_BUNDLE_RULES if bundle else _DOC_RULES).append((r, fn))
        return fn
    return register


def rule_ids() -> list[str]:
    return sorted(RULES)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _meta(doc: dict) -> tuple[str | None, str]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else None
    ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else "default"
    return name, ns


def pod_specs(doc: dict) -> tuple[dict, str] | None:
    """(pod spec, its dotted path) of a workload document, or None."""
    path = _POD_SPEC_PATHS.get(doc.get("kind"))  # type: ignore[arg-type]
    if not path:
        return None
    spec = _get(doc, *path)
    return (spec, ".".join(path)) if isinstance(spec, dict) else None


def _containers(doc: dict) -> Iterator[tuple[dict, str, dict]]:
    """(container, its path, pod spec) for every container and initContainer."""
    found = pod_specs(doc)
    if not found:
        return
    spec, base = found
    for field in ("initContainers", "containers"):
        items = spec.get(field)
        if isinstance(items, list):
            for i, c in enumerate(items):
                if isinstance(c, dict):
                    yield c, f"{base}.{field}[{i}]", spec


def _pod_labels(doc: dict) -> dict | None:
    if doc.get("kind") == "Pod":
        labels = _get(doc, "metadata", "labels")
    elif doc.get("kind") == "CronJob":
        labels = _get(doc, "spec", "jobTemplate", "spec", "template", "metadata", "labels")
    else:
        labels = _get(doc, "spec", "template", "metadata", "labels")
    return labels if isinstance(labels, dict) else None


# --- per-document rules: fn(doc) yields (path, message) ---------------------------------------------
@rule("K8S001", "image-tag-latest", "error", "Container image uses the 'latest' tag or no tag",
      fix="pin the image to a version tag or a digest (image@sha256:...)")
def _image_tag(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        image = c.get("image")
        if not isinstance(image, str) or "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last else None
        if tag in (None, "latest"):
            yield f"{path}.image", f"image {image!r} is {'untagged' if tag is None else 'tagged latest'}"


@rule("K8S002", "resource-requests", "error", "Container has no CPU or memory request",
      fix="set resources.requests.cpu and resources.requests.memory")
def _requests(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        req = _get(c, "resources", "requests") or {}
        missing = [k for k in ("cpu", "memory") if not isinstance(req, dict) or k not in req]
        if missing:
            yield f"{path}.resources.requests", f"no {' and '.join(missing)} request"


@rule("K8S003", "cpu-limit", "warning", "Container has no CPU limit",
      fix="set resources.limits.cpu (or document why the workload may burst unbounded)")
def _cpu_limit(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        limits = _get(c, "resources", "limits")
        if not isinstance(limits, dict) or "cpu" not in limits:
            yield f"{path}.resources.limits.cpu", "no CPU limit"


@rule("K8S004", "memory-limit", "error", "Container has no memory limit",
      fix="set resources.limits.memory so that one container cannot exhaust the node")
def _memory_limit(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        limits = _get(c, "resources", "limits")
        if not isinstance(limits, dict) or "memory" not in limits:
            yield f"{path}.resources.limits.memory", "no memory limit"


def _serving_containers(doc: dict) -> Iterator[tuple[dict, str]]:
    if doc.get("kind") in _SERVING:
        for c, path, _ in _containers(doc):
            if ".initContainers[" not in path:
                yield c, path


@rule("K8S005", "liveness-probe", "warning", "Deployment/StatefulSet container without a livenessProbe",
      fix="add a livenessProbe so that a hung container is restarted", kinds=_SERVING)
def _liveness(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path in _serving_containers(doc):
        if "livenessProbe" not in c:
            yield f"{path}.livenessProbe", "no livenessProbe"


@rule("K8S006", "readiness-probe", "warning", "Deployment/StatefulSet container without a readinessProbe",
      fix="add a readinessProbe so that traffic only reaches ready pods", kinds=_SERVING)
def _readiness(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path in _serving_containers(doc):
        if "readinessProbe" not in c:
            yield f"{path}.readinessProbe", "no readinessProbe"


@rule("K8S007", "run-as-non-root", "error", "runAsNonRoot is not set to true",
      fix="set securityContext.runAsNonRoot: true on the pod or on every container")
def _non_root(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, spec in _containers(doc):
        pod = _get(spec, "securityContext", "runAsNonRoot")
        own = _get(c, "securityContext", "runAsNonRoot")
        if own is False or (own is None and pod is not True):
            yield f"{path}.securityContext.runAsNonRoot", "the container may run as root"


@rule("K8S008", "privileged", "error", "Container runs privileged",
      fix="remove securityContext.privileged; grant only the capabilities it needs")
def _privileged(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        if _get(c, "securityContext", "privileged") is True:
            yield f"{path}.securityContext.privileged", "privileged: true"


@rule("K8S009", "privilege-escalation", "warning", "allowPrivilegeEscalation is not set to false",
      fix="set securityContext.allowPrivilegeEscalation: false")
def _escalation(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        if _get(c, "securityContext", "allowPrivilegeEscalation") is not False:
            yield f"{path}.securityContext.allowPrivilegeEscalation", "privilege escalation is allowed"


@rule("K8S010", "host-namespaces", "error", "Pod shares the host's network, PID or IPC namespace",
      fix="remove hostNetwork / hostPID / hostIPC")
def _host_namespaces(doc: dict) -> Iterator[tuple[str, str]]:
    found = pod_specs(doc)
    if found:
        spec, base = found
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key) is True:
                yield f"{base}.{key}", f"{key}: true"


@rule("K8S011", "read-only-root-filesystem", "info", "readOnlyRootFilesystem is not true",
      fix="set securityContext.readOnlyRootFilesystem: true and mount writable volumes where needed")
def _read_only_root(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        if _get(c, "securityContext", "readOnlyRootFilesystem") is not True:
            yield f"{path}.securityContext.readOnlyRootFilesystem", "the root filesystem is writable"


@rule("K8S012", "host-path", "warning", "Pod mounts a hostPath volume",
      fix="use a PersistentVolumeClaim, emptyDir or a CSI volume instead of hostPath")
def _host_path(doc: dict) -> Iterator[tuple[str, str]]:
    found = pod_specs(doc)
    if found:
        spec, base = found
        volumes = spec.get("volumes")
        for i, v in enumerate(volumes if isinstance(volumes, list) else []):
            if isinstance(v, dict) and "hostPath" in v:
                yield f"{base}.volumes[{i}].hostPath", f"hostPath volume {v.get('name')!r}"


@rule("K8S013", "dangerous-capabilities", "error", "Container adds SYS_ADMIN, NET_ADMIN or ALL capabilities",
      fix="drop ALL capabilities and add back only what the process needs")
def _capabilities(doc: dict) -> Iterator[tuple[str, str]]:
    for c, path, _ in _containers(doc):
        added = _get(c, "securityContext", "capabilities", "add")
        for cap in added if isinstance(added, list) else []:
            if isinstance(cap, str) and cap.upper().removeprefix("CAP_") in ("SYS_ADMIN", "NET_ADMIN", "ALL"):
                yield f"{path}.securityContext.capabilities.add", f"adds {cap}"


# --- bundle rules: fn(docs) yields (document index, path, message) ----------------------------------
def _workloads(docs: list[dict]) -> Iterator[tuple[int, dict, str, dict]]:
    for i, d in enumerate(docs):
        labels = _pod_labels(d) if isinstance(d, dict) else None
        if labels is not None:
            yield i, d, _meta(d)[1], labels


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@rule("K8S014", "service-selector-matches-nothing", "error",
      "Service selector matches no workload's pod labels in the bundle (same namespace)",
      fix="make spec.selector equal the pod template labels of the workload it fronts", bundle=True,
      kinds=("Service",))
def _service_selector(docs: list[dict]) -> Iterator[tuple[int, str, str]]:
    workloads = list(_workloads(docs))
    for i, d in enumerate(docs):
        if not isinstance(d, dict) or d.get("kind") != "Service":
            continue
        selector = _get(d, "spec", "selector")
        if not isinstance(selector, dict) or not selector:
            continue
        ns = _meta(d)[1]
        if not any(w_ns == ns and _matches(selector, labels) for _, _, w_ns, labels in workloads):
            yield i, "spec.selector", f"selector {selector} matches no pod template in namespace {ns!r}"


@rule("K8S015", "pod-disruption-budget", "warning",
      "Deployment/StatefulSet with replicas > 1 has no PodDisruptionBudget in the bundle",
      fix="add a PodDisruptionBudget whose selector matches the pod labels", bundle=True, kinds=_SERVING)
def _pdb(docs: list[dict]) -> Iterator[tuple[int, str, str]]:
    budgets = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "PodDisruptionBudget":
            sel = _get(d, "spec", "selector", "matchLabels")
            if isinstance(sel, dict):
                budgets.append((_meta(d)[1], sel))
    for i, d, ns, labels in _workloads(docs):
        replicas = _get(d, "spec", "replicas")
        if d.get("kind") in _SERVING and isinstance(replicas, int) and replicas > 1:
            if not any(b_ns == ns and sel and _matches(sel, labels) for b_ns, sel in budgets):
                yield i, "spec.replicas", f"{replicas} replicas and no PodDisruptionBudget covers them"


# --- cross-document consistency (conformance suite) -------------------------------------------------
_BUILTIN_NAMESPACES = {"default", "kube-system", "kube-public", "kube-node-lease"}
_ALL_KINDS = ("*",)


@rule("K8X001", "duplicate-name", "error", "Two documents define the same kind, namespace and name",
      fix="rename or remove one of them; the second apply would overwrite the first", bundle=True,
      kinds=_ALL_KINDS, cross=True)
def _duplicates(docs: list[dict]) -> Iterator[tuple[int, str, str]]:
    seen: dict[tuple, int] = {}
    for i, d in enumerate(docs):
        name, ns = _meta(d) if isinstance(d, dict) else (None, "")
        if name is None:
            continue
        key = (d.get("apiVersion"), d.get("kind"), ns, name)
        if key in seen:
            yield i, "metadata.name", f"{d.get('kind')} {ns}/{name} is also defined by document {seen[key]}"
        else:
            seen[key] = i


@rule("K8X002", "namespace-defined", "error", "A document's namespace is not defined in the bundle",
      fix="add the Namespace document, or create it before applying the bundle", bundle=True,
      kinds=_ALL_KINDS, cross=True)
def _namespaces(docs: list[dict]) -> Iterator[tuple[int, str, str]]:
    defined = {_meta(d)[0] for d in docs if isinstance(d, dict) and d.get("kind") == "Namespace"}
    for i, d in enumerate(docs):
        ns = _get(d, "metadata", "namespace")
        if isinstance(ns, str) and ns not in _BUILTIN_NAMESPACES and ns not in defined:
            yield i, "metadata.namespace", f"namespace {ns!r} is used but not defined in the bundle"


def _references(spec: dict, base: str) -> Iterator[tuple[str, str, str]]:
    """(kind, name, path) of every non-optional ConfigMap/Secret a pod spec needs."""
    for field in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(field) if isinstance(spec.get(field), list) else []):
            if not isinstance(c, dict):
                continue
            for j, src in enumerate(c.get("envFrom") if isinstance(c.get("envFrom"), list) else []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    ref = _get(src, key)
                    if isinstance(ref, dict) and ref.get("name") and not ref.get("optional"):
                        yield kind, ref["name"], f"{base}.{field}[{i}].envFrom[{j}].{key}"
            for j, env in enumerate(c.get("env") if isinstance(c.get("env"), list) else []):
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    ref = _get(env, "valueFrom", key)
                    if isinstance(ref, dict) and ref.get("name") and not ref.get("optional"):
                        yield kind, ref["name"], f"{base}.{field}[{i}].env[{j}].valueFrom.{key}"
    for i, v in enumerate(spec.get("volumes") if isinstance(spec.get("volumes"), list) else []):
        for key, kind, name_key in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName")):
            ref = _get(v, key)
            if isinstance(ref, dict) and ref.get(name_key) and not ref.get("optional"):
                yield kind, ref[name_key], f"{base}.volumes[{i}].{key}"


@rule("K8X003", "references-resolve", "error", "A ConfigMap or Secret the pods need is not in the bundle",
      fix="add the ConfigMap/Secret to the bundle, or mark the reference optional", bundle=True, cross=True)
def _refs(docs: list[dict]) -> Iterator[tuple[int, str, str]]:
    present = {(d.get("kind"), _meta(d)[1], _meta(d)[0]) for d in docs if isinstance(d, dict)}
    for i, d in enumerate(docs):
        found = pod_specs(d) if isinstance(d, dict) else None
        if not found:
            continue
        ns = _meta(d)[1]
        for kind, name, path in _references(*found):
            if (kind, ns, name) not in present:
                yield i, path, f"{kind} {ns}/{name} is referenced but not defined in the bundle"


def applies(r: Rule, doc: dict) -> bool:
    return r.kinds == _ALL_KINDS or doc.get("kind") in r.kinds


def check_bundle(docs: list[dict], *, cross: bool = False) -> list[Finding]:
    """Every finding of every best-practice rule (and the cross-document ones with `cross`); never
    raises on odd-but-parsed documents."""
    findings: list[Finding] = []

    def add(r: Rule, i: int, path: str, message: str) -> None:
        doc = docs[i] if isinstance(docs[i], dict) else {}
        findings.append(Finding(r.id, r.severity, i, str(doc.get("kind")), _meta(doc)[0], path, message, r.fix))

    for i, doc in enumerate(docs):
        if isinstance(doc, dict):
            for r, fn in _DOC_RULES:
                for path, message in fn(doc):
                    add(r, i, path, message)
    for r, fn in _BUNDLE_RULES:
        if cross or not r.cross:
            for i, path, message in fn(docs):
                add(r, i, path, message)
    return sorted(findings, key=lambda f: (f.document, f.rule, f.path))
