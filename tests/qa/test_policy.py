"""Every best-practice and cross-document rule, each with a failing and a passing fixture."""
from __future__ import annotations

import copy
import re

import pytest
from hypothesis import given, settings, strategies as st

from service.qa.policy import RULES, check_bundle, rule_ids
from service.qa.suites import get

COMPLIANT = [
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
              "template": {"metadata": {"labels": {"app": "web"}},
                           "spec": {"securityContext": {"runAsNonRoot": True},
                                    "volumes": [{"name": "cfg", "configMap": {"name": "web-config"}}],
                                    "containers": [{
                                        "name": "web", "image": "nginx:1.27",
                                        "envFrom": [{"secretRef": {"name": "web-secret"}}],
                                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                                      "limits": {"cpu": "500m", "memory": "128Mi"}},
                                        "livenessProbe": {"httpGet": {"path": "/", "port": 80}},
                                        "readinessProbe": {"httpGet": {"path": "/", "port": 80}},
                                        "securityContext": {"allowPrivilegeEscalation": False,
                                                            "readOnlyRootFilesystem": True}}]}}}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
    {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web", "namespace": "shop"},
     "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}},
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web-config", "namespace": "shop"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web-secret", "namespace": "shop"}},
]
C = "spec.template.spec.containers[0]"


def container(docs):
    return docs[0]["spec"]["template"]["spec"]["containers"][0]


def pod(docs):
    return docs[0]["spec"]["template"]["spec"]


def set_in(path):
    def spoil(docs):
        obj, *keys = path
        target = {"c": container, "p": pod, "d": lambda d: d[0]}[obj](docs)
        for k in keys[:-2]:
            target = target.setdefault(k, {})
        target[keys[-2]] = keys[-1]
    return spoil


SPOILERS = {
    "K8S001": (set_in(("c", "image", "nginx")), f"{C}.image"),
    "K8S002": (lambda d: container(d)["resources"].pop("requests"), f"{C}.resources.requests"),
    "K8S003": (lambda d: container(d)["resources"]["limits"].pop("cpu"), f"{C}.resources.limits.cpu"),
    "K8S004": (lambda d: container(d)["resources"]["limits"].pop("memory"), f"{C}.resources.limits.memory"),
    "K8S005": (lambda d: container(d).pop("livenessProbe"), f"{C}.livenessProbe"),
    "K8S006": (lambda d: container(d).pop("readinessProbe"), f"{C}.readinessProbe"),
    "K8S007": (lambda d: pod(d).pop("securityContext"), f"{C}.securityContext.runAsNonRoot"),
    "K8S008": (set_in(("c", "securityContext", "privileged", True)), f"{C}.securityContext.privileged"),
    "K8S009": (lambda d: container(d)["securityContext"].pop("allowPrivilegeEscalation"),
               f"{C}.securityContext.allowPrivilegeEscalation"),
    "K8S010": (set_in(("p", "hostNetwork", True)), "spec.template.spec.hostNetwork"),
    "K8S011": (lambda d: container(d)["securityContext"].pop("readOnlyRootFilesystem"),
               f"{C}.securityContext.readOnlyRootFilesystem"),
    "K8S012": (lambda d: pod(d)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
               "spec.template.spec.volumes[1].hostPath"),
    "K8S013": (set_in(("c", "securityContext", "capabilities", {"add": ["SYS_ADMIN"]})),
               f"{C}.securityContext.capabilities.add"),
    "K8S014": (lambda d: d[1]["spec"].update(selector={"app": "api"}), "spec.selector"),
    "K8S015": (lambda d: d.pop(2), "spec.replicas"),
    "K8X001": (lambda d: d.append(copy.deepcopy(d[4])), "metadata.name"),
    "K8X002": (lambda d: d.pop(3), "metadata.namespace"),
    "K8X003": (lambda d: d.pop(5), f"{C}.envFrom[0].secretRef"),
}


def test_the_compliant_bundle_has_no_findings():
    assert check_bundle(copy.deepcopy(COMPLIANT), cross=True) == []


def test_every_rule_has_a_fixture_and_ids_are_stable():
    assert set(SPOILERS) == set(RULES) and len([r for r in RULES if r.startswith("K8S")]) >= 12
    assert all(re.fullmatch(r"K8[SX]\d{3}", rid) for rid in rule_ids())
    assert len({r.name for r in RULES.values()}) == len(RULES)
    assert all(r.severity in ("error", "warning", "info") and r.fix for r in RULES.values())


@pytest.mark.parametrize("rule_id", sorted(SPOILERS))
def test_rule_fails_on_its_fixture_and_passes_without(rule_id):
    spoil, path = SPOILERS[rule_id]
    docs = copy.deepcopy(COMPLIANT)
    spoil(docs)
    findings = check_bundle(docs, cross=True)
    hits = [f for f in findings if f.rule == rule_id]
    assert hits and hits[0].path == path, findings
    assert hits[0].fix == RULES[rule_id].fix and hits[0].message
    assert not [f for f in check_bundle(copy.deepcopy(COMPLIANT), cross=True) if f.rule == rule_id]


def test_digest_and_registry_port_are_pinned_images():
    for image in ("registry:5000/app:1.2", "nginx@sha256:" + "a" * 64):
        docs = copy.deepcopy(COMPLIANT)
        container(docs)["image"] = image
        assert not [f for f in check_bundle(docs) if f.rule == "K8S001"]
    docs = copy.deepcopy(COMPLIANT)
    container(docs)["image"] = "registry:5000/app"
    assert [f.rule for f in check_bundle(docs)] == ["K8S001"]


def test_init_containers_and_cronjobs_are_checked():
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {
                "initContainers": [{"name": "i", "image": "busybox:latest"}], "containers": []}}}}}}
    paths = {f.path for f in check_bundle([cron]) if f.rule == "K8S001"}
    assert paths == {"spec.jobTemplate.spec.template.spec.initContainers[0].image"}


def test_policy_suite_gives_one_case_per_document_and_rule():
    outcome = get("policy").run(copy.deepcopy(COMPLIANT), "1.30", False)
    deployment_cases = {c.rule for c in outcome.cases if c.document == 0}
    assert deployment_cases == {r for r in RULES if r.startswith("K8S") and r != "K8S014"}
    assert not outcome.failed
    cross = {c.rule for c in get("conformance").run(copy.deepcopy(COMPLIANT), "1.30", False).cases}
    assert {"schema", "K8X001", "K8X002", "K8X003"} <= cross


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["kind", "spec", "template", "containers", "metadata", "labels", "selector", "image",
                         "securityContext", "volumes", "replicas", "name", "namespace", "envFrom", "jobTemplate"]),
        children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(json_like.map(lambda d: d if isinstance(d, dict) else {"x": d})
                     .map(lambda d: {**d, "kind": d.get("kind") if isinstance(d.get("kind"), str) else "Deployment"}),
                     max_size=4))
def test_odd_documents_never_crash_the_rules(docs):
    check_bundle(docs, cross=True)
