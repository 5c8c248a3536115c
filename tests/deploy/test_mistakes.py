"""Injected mistakes are caught: each mutates a valid rendered object and expects a named problem."""

from __future__ import annotations

import pytest

from k8s import validate
from tests.deploy.conftest import find, rendered


def _job() -> dict:
    return find(rendered("k8s/overlays/prod"), "RayJob", "streamrec-train")[0]


def _head(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]


def _worker(doc: dict, i: int = 0) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][i]


def _set(doc, path, value):
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _problems(doc, crds) -> str:
    return "\n".join(validate.problems([doc], crds))


def test_the_unmodified_objects_are_valid(crds):
    assert _problems(_job(), crds) == ""


MISTAKES = {
    # typo'd fields (the API server's strict validation would reject them)
    "typo in RayJob spec": (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    "typo in a pod template": (lambda d: _head(d)["containers"][0].update(imagePullPolcy="Always"),
                               "imagePullPolcy"),
    "typo in a worker group": (lambda d: _worker(d).update(maxReplica=3), "maxReplica"),
    # wrong types
    "string for an integer": (lambda d: _worker(d).update(maxReplicas="16"), "'16' is not of type 'integer'"),
    "integer rayStartParams value": (lambda d: _worker(d)["rayStartParams"].update({"num-cpus": 8}),
                                     "8 is not of type 'string'"),
    "list for a map": (lambda d: _head(d).update(nodeSelector=["gpu"]), "is not of type 'object'"),
    # resources
    "missing memory limit": (lambda d: _head(d)["containers"][0]["resources"]["limits"].pop("memory"),
                             "resources.limits.memory: required"),
    "missing requests": (lambda d: _worker(d, 1)["template"]["spec"]["containers"][0]["resources"].pop("requests"),
                         "resources.requests.cpu: required"),
    # pod security (restricted)
    "root user": (lambda d: _head(d)["securityContext"].update(runAsUser=0), "runAsUser: 0"),
    "runAsNonRoot false": (lambda d: _worker(d)["template"]["spec"]["securityContext"].update(runAsNonRoot=False),
                           "runAsNonRoot must be true"),
    "privilege escalation": (lambda d: _head(d)["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True), "allowPrivilegeEscalation: must be false"),
    "capabilities kept": (lambda d: _head(d)["containers"][0]["securityContext"].pop("capabilities"),
                          "capabilities.drop: must include ALL"),
    "no seccomp profile": (lambda d: _head(d)["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "hostPath volume": (lambda d: _head(d)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                        "volume type ['hostPath'] not allowed"),
    "hostNetwork": (lambda d: _head(d).update(hostNetwork=True), "hostNetwork: must not be true"),
    "plaintext credential": (lambda d: _head(d)["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "must come from a Secret"),
    "autoscaler sidecar unrestricted": (lambda d: d["spec"]["rayClusterSpec"]["autoscalerOptions"].pop(
        "securityContext"), "autoscalerOptions.securityContext: required"),
    "default submitter pod": (lambda d: d["spec"].pop("submitterPodTemplate"), "KubeRay default"),
    # KubeRay's own rules
    "TTL without shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False, suspend=False),
                             "needs shutdownAfterJobFinishes: true"),
    "min above max": (lambda d: _worker(d).update(minReplicas=20), "minReplicas 20 > maxReplicas 16"),
    "replicas out of range": (lambda d: _worker(d).update(replicas=40), "replicas 40 outside"),
    "duplicate group": (lambda d: _worker(d, 1).update(groupName="cpu"), "groupName values must be unique"),
    "name too long": (lambda d: d["metadata"].update(name="streamrec-" + "x" * 40), "longer than 47"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="Stream_Rec"), "DNS-1035"),
    "no deadline": (lambda d: d["spec"].pop("activeDeadlineSeconds"), "must set a deadline"),
    "zero deadline": (lambda d: d["spec"].update(activeDeadlineSeconds=0), "must be > 0"),
    "broken runtime env": (lambda d: d["spec"].update(runtimeEnvYAML="a: [1"), "runtimeEnvYAML: not YAML"),
    "resources twice": (lambda d: _worker(d).update(resources={"CPU": "8"}) or
                        _worker(d)["rayStartParams"].update({"num-cpus": "8"}), "both rayStartParams and resources"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_injected_mistake_is_caught(name, crds):
    mutate, expected = MISTAKES[name]
    doc = _job()
    mutate(doc)
    found = _problems(doc, crds)
    assert expected in found, f"{name}: expected {expected!r} in:\n{found}"


def test_rayservice_mistakes(crds):
    svc = find(rendered("k8s/overlays/prod"), "RayService")[0]
    assert _problems(svc, crds) == ""
    broken = dict(svc, spec=dict(svc["spec"], serveConfigV2="applications: []"))
    assert "applications list" in _problems(broken, crds)
    broken = dict(svc, spec=dict(svc["spec"], upgradeStrategy={"type": "Rolling"}))
    assert "upgradeStrategy.type 'Rolling'" in _problems(broken, crds)


def test_core_kind_mistakes():
    docs = rendered("k8s/overlays/dev")
    role = find(docs, "Role")[0]
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    assert "verb" in _problems(role, None)
    policy = find(docs, "NetworkPolicy", "serve-clients")[0]
    policy["spec"]["ingress"][0]["ports"][0]["port"] = [8000]
    assert "ingress.0.ports.0.port" in _problems(policy, None)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    assert "must not be committed" in _problems(secret, None)
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {
        "selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}, "spec": {
            "containers": [{"name": "c", "image": "i"}]}}}}
    found = _problems(deployment, None)
    assert "runAsNonRoot must be true" in found and "resources.limits.cpu: required" in found
