"""Parse multi-document Kubernetes YAML and validate each document against the API schemas that
`kubernetes-validate` ships, one compiled validator per (version, kind, apiVersion, strict).

We read kubernetes-validate's schema files instead of calling `kubernetes_validate.validate()`
because that function re-reads and re-parses the schema and its multi-megabyte `_definitions.json`
on every call, and compares versions as strings ("1.4" > "1.37").
"""
from __future__ import annotations

import itertools
import json
import re
import threading
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from ..errors import BadRequest

__all__ = ["count_documents", "DOCUMENT_RULE", "parse_manifests", "supported_versions", "resolve_version", "validate_documents"]

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_EXPANDED_NODES = 1_000_000  # a 1 MiB manifest has far fewer; an alias bomb ("billion laughs") far more
# What Kubernetes accepts (a CRD's kind is a CamelCase identifier; apiVersion is [DNS subdomain "/"] DNS label);
# the schema file name is built from both, so anything else never reaches the filesystem.
_KIND = re.compile(r"[A-Za-z][A-Za-z0-9]{0,62}")
_API_VERSION = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


def _expanded_size(doc: Any) -> int:
    """Nodes of `doc` with every YAML alias expanded, computed in time linear in the loaded (shared)
    objects; a recursive alias counts as infinite."""
    memo: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in memo:
            return memo[key]
        if key in in_progress:
            return MAX_EXPANDED_NODES + 1
        in_progress.add(key)
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_EXPANDED_NODES:
                break
        in_progress.discard(key)
        memo[key] = total
        return total

    return size(doc)


DOCUMENT_RULE = ("documents = the non-empty parts of the body split at document markers: a line that is '---' "
                 "(alone or followed by a space) or '...'; a part is empty when it has only blank lines, "
                 "comments and directives ('%...')")
_MARKER = re.compile(r"\n(?:---|\.\.\.)(?=[ \t]|\r?\n|\r?\Z)")  # on "\n" + text: a literal prefix, fast to scan
_CONTENT = re.compile(r"^(?![ \t]*#)(?!%)[ \t]*\S", re.MULTILINE)
_BREAKS = re.compile("\r\n?|[\x85\u2028\u2029]")  # YAML's other line breaks: the parser splits on them too


def count_documents(text: str, *, stop_after: int | None = None) -> int:
    """The billed document count (DOCUMENT_RULE): a linear regex scan, no YAML parser, so a price can
    be quoted to an unpaid request for a few milliseconds of work; the paid request does the full parse.
    With `stop_after`, counting stops once past it (the caller refuses the body anyway), and a body with
    more than 2 × stop_after + 2 markers counts as past it, so the loop below runs a bounded number of times."""
    text = _BREAKS.sub("\n", text)  # one linear pass; CR, NEL, LS and PS end lines for the parser as "\n" does
    if stop_after is not None:
        bound = 2 * stop_after + 2
        if text.count("\n---") + text.count("\n...") + 1 > bound and \
                sum(1 for _ in itertools.islice(_MARKER.finditer("\n" + text), bound + 1)) > bound:
            return stop_after + 1
    count, start = 0, 0
    text = "\n" + text
    for marker in itertools.chain(_MARKER.finditer(text), (None,)):
        end = marker.start() if marker else len(text)
        part = text[start:end]
        if part and not part.isspace() and _CONTENT.search(part):
            count += 1
            if stop_after is not None and count > stop_after:
                break
        start = marker.end() if marker else end
    return count


def decode(body: bytes | str) -> str:
    """The body as text; BadRequest when it is not UTF-8."""
    try:
        return body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise BadRequest("invalid_encoding", "the manifests must be UTF-8 text") from None


def parse_manifests(body: bytes | str, *, max_documents: int = 500) -> list[dict[str, Any]]:
    """The non-empty YAML documents of `body`; BadRequest naming the document and field otherwise."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise BadRequest("invalid_encoding", "the manifests must be UTF-8 text") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadRequest("invalid_yaml", f"not valid YAML{where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise BadRequest("invalid_yaml", f"not valid YAML: {exc}") from None
    if not docs:
        raise BadRequest("no_documents", "the body holds no YAML document")
    if "*" in text and sum(_expanded_size(d) for d in docs) > MAX_EXPANDED_NODES:
        raise BadRequest("invalid_yaml", "YAML aliases expand to more than a million nodes (or recurse)")
    if len(docs) > max_documents:
        raise BadRequest("too_many_documents", f"{len(docs)} documents; at most {max_documents} per request")
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise BadRequest("invalid_manifest", f"document {i}: must be a mapping, not {type(doc).__name__}")
        for key in ("apiVersion", "kind"):
            if key not in doc:
                raise BadRequest("invalid_manifest", f"document {i}: missing field '{key}'")
            if not isinstance(doc[key], str) or not doc[key]:
                raise BadRequest("invalid_manifest", f"document {i}: field '{key}' must be a non-empty string")
    return docs


@lru_cache(maxsize=1)
def _schema_root() -> Any:
    return resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")


def _version_key(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@lru_cache(maxsize=1)
def _versions() -> tuple[str, ...]:
    found = set()
    for entry in _schema_root().iterdir():
        m = re.match(r"^v(\d+)\.(\d+)\.\d+-local$", entry.name)
        if m:
            found.add(f"{m.group(1)}.{m.group(2)}")
    return tuple(sorted(found, key=_version_key))


def supported_versions() -> list[str]:
    return list(_versions())


def resolve_version(requested: str | None) -> str:
    """'1.30', 'v1.30' or '1.30.2' → '1.30'; None → the newest supported version."""
    versions = _versions()
    if requested is None or requested == "":
        return versions[-1]
    m = re.fullmatch(r"v?(\d{1,3})\.(\d{1,3})(?:\.\d{1,4})?", requested.strip())
    version = f"{int(m.group(1))}.{int(m.group(2))}" if m else None
    if version not in versions:
        raise BadRequest("unsupported_kubernetes_version",
                         f"kubernetes_version {requested!r} is not supported; use {versions[0]} to {versions[-1]}")
    return version


def _schema_dir(version: str, strict: bool) -> str:
    return f"v{version}.0-local" + ("-strict" if strict else "")


@lru_cache(maxsize=64)
def _registry(version: str, strict: bool) -> Registry:
    """The shared `_definitions.json` of one schema set, parsed once."""
    path = _schema_root().joinpath(_schema_dir(version, strict), "_definitions.json")
    return Resource.from_contents(json.loads(path.read_text())) @ Registry()


_compile_lock = threading.Lock()


@lru_cache(maxsize=2048)
def _validator(version: str, kind: str, api_version: str, strict: bool) -> jsonschema.Validator | None:
    """Compiled validator for one kind, or None when kubernetes-validate has no schema for it (a CRD)."""
    if _identity_errors(kind, api_version):  # a file name is built from them: well-formed ones only
        return None
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # apps/v1 → apps-v1
    name = f"{kind.lower()}-{group_version}.json"
    if "/" in name or name.startswith("."):
        return None
    path = _schema_root().joinpath(_schema_dir(version, strict), name)
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    with _compile_lock:
        registry = _registry(version, strict)
    return jsonschema.Draft202012Validator(schema, registry=registry)  # refs resolve by the schemas' $id


def _identity_errors(kind: Any, api_version: Any) -> list[dict[str, str]]:
    """A document's kind and apiVersion that Kubernetes would refuse, as that document's validation errors."""
    errors = []
    if not isinstance(api_version, str) or not _API_VERSION.fullmatch(api_version):
        errors.append({"path": "apiVersion", "message": "apiVersion must be [group/]version: lower-case letters, "
                                                        "digits, '-' and '.', a group of at most 253 characters "
                                                        "and a version of at most 63"})
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        errors.append({"path": "kind", "message": "kind must be a letter followed by letters and digits, "
                                                  "at most 63 characters"})
    return errors


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validate_documents(docs: list[dict[str, Any]], version: str, *, strict: bool = False) -> list[dict[str, Any]]:
    """One result per document: valid True/False, or None with a warning when no schema exists."""
    results = []
    for i, doc in enumerate(docs):
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        result: dict[str, Any] = {
            "index": i, "apiVersion": doc["apiVersion"], "kind": doc["kind"],
            "name": meta.get("name"), "namespace": meta.get("namespace"),
            "valid": None, "errors": [], "warnings": [],
        }
        identity = _identity_errors(doc["kind"], doc["apiVersion"])
        validator = None if identity else _validator(version, doc["kind"], doc["apiVersion"], strict)
        if identity:
            result["errors"], result["valid"] = identity, False
        elif validator is None:
            result["warnings"].append(
                f"no schema for kind {doc['kind']} apiVersion {doc['apiVersion']} in Kubernetes {version}; not checked")
        else:
            errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
            result["errors"] = [{"path": _path(e.absolute_path), "message": e.message} for e in errors]
            result["valid"] = not errors
        results.append(result)
    return results
