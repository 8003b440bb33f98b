"""Manifest parsing and schema validation (service/qa/manifests.py)."""
from __future__ import annotations

import pytest

from service.errors import BadRequest
from service.qa.manifests import parse_manifests, resolve_version, supported_versions, validate_documents

DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "nginx:1.27"}]
"""
SERVICE = """apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""


def test_valid_bundle_passes():
    docs = parse_manifests(f"{DEPLOYMENT}---\n{SERVICE}".encode())
    results = validate_documents(docs, "1.30")
    assert [(r["kind"], r["name"], r["valid"], r["errors"]) for r in results] == [
        ("Deployment", "web", True, []), ("Service", "web", True, [])]
    assert results[0]["namespace"] == "shop"


def test_every_schema_error_is_reported_with_its_path():
    bad = DEPLOYMENT.replace("replicas: 2", 'replicas: "three"').replace("{name: web, image", "{image")
    [result] = validate_documents(parse_manifests(bad), "1.30")
    assert result["valid"] is False
    assert [(e["path"], "three" in e["message"] or "name" in e["message"]) for e in result["errors"]] == [
        ("spec.replicas", True), ("spec.template.spec.containers[0]", True)]


def test_strict_mode_flags_unknown_fields():
    extra = DEPLOYMENT.replace("{name: web, image", "{nmae: x, name: web, image")
    assert validate_documents(parse_manifests(extra), "1.30")[0]["valid"] is True
    strict = validate_documents(parse_manifests(extra), "1.30", strict=True)[0]
    assert strict["valid"] is False and "nmae" in strict["errors"][0]["message"]


def test_kind_without_schema_is_unchecked_with_a_warning():
    [result] = validate_documents(parse_manifests("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n"), "1.30")
    assert result["valid"] is None and "no schema for kind Widget" in result["warnings"][0]


@pytest.mark.parametrize("body,code,fragment", [
    (b"\xff\xfe", "invalid_encoding", "UTF-8"),
    (b"a: [1, 2\n", "invalid_yaml", "line"),
    (b"---\n---\n", "no_documents", "no YAML document"),
    (b"- 1\n- 2\n", "invalid_manifest", "document 0: must be a mapping"),
    (b"apiVersion: v1\nmetadata: {}\n", "invalid_manifest", "document 0: missing field 'kind'"),
    (b"kind: Pod\napiVersion: 1\n", "invalid_manifest", "document 0: field 'apiVersion'"),
    (("---\n".join(["apiVersion: v1\nkind: ConfigMap\n"] * 4)).encode(), "too_many_documents", "at most 3"),
])
def test_parse_errors(body, code, fragment):
    with pytest.raises(BadRequest) as exc:
        parse_manifests(body, max_documents=3)
    assert exc.value.code == code and fragment in exc.value.detail


def test_alias_bomb_is_refused_before_expansion():
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 12):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join(f"*{prev}" for _ in range(9)) + "]")
    with pytest.raises(BadRequest) as exc:
        parse_manifests("apiVersion: v1\nkind: ConfigMap\n" + "\n".join(lines))
    assert exc.value.code == "invalid_yaml" and "aliases" in exc.value.detail


def test_recursive_alias_is_refused():
    with pytest.raises(BadRequest) as exc:
        parse_manifests("apiVersion: v1\nkind: ConfigMap\ndata: &a [*a]\n")
    assert exc.value.code == "invalid_yaml"


def test_ordinary_anchors_are_fine():
    docs = parse_manifests("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, labels: &l {a: b}}\nextra: *l\n")
    assert docs[0]["extra"] == {"a": "b"}


@pytest.mark.parametrize("given,expected", [(None, None), ("1.30", "1.30"), ("v1.31.2", "1.31"), ("1.25", "1.25")])
def test_version_resolution(given, expected):
    assert resolve_version(given) == (expected or supported_versions()[-1])


@pytest.mark.parametrize("given", ["1.4", "1.24", "2.0", "latest", "1.30; rm -rf /", "99.99"])
def test_unsupported_versions_are_refused(given):
    with pytest.raises(BadRequest) as exc:
        resolve_version(given)
    assert exc.value.code == "unsupported_kubernetes_version" and "1.25" in exc.value.detail


def test_supported_versions_are_sorted_numerically():
    versions = supported_versions()
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
    assert "1.30" in versions and versions[0] == "1.25"
