"""The Kubeflow side (k8s/kubeflow): a profile namespace of the pipeline's own, the RBAC its pods need
there, the binding into the project namespaces; the control image; the recurring run. No API server
here: each rule is checked against the manifests, and its docstring says which Kubeflow / KFP / Argo
code it comes from."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import yaml

from k8s import kustomize, validate
from k8s.pipeline import pipeline
from tests.deploy.conftest import OVERLAYS, ROOT, find, rendered

KUBEFLOW = "k8s/kubeflow"


def _kubeflow() -> list[dict]:
    return rendered(KUBEFLOW)


def test_profile_owns_a_namespace_that_keeps_our_labels():
    """The Kubeflow profile controller adopts an existing namespace only when its `owner` annotation
    equals the Profile's spec.owner.name, and adds its default labels without overwriting ours
    (kubeflow/dashboard components/profile-controller/controllers/profile_controller.go Reconcile,
    setNamespaceLabels). KFP's profile controller provisions only namespaces labelled
    pipelines.kubeflow.org/enabled=true (kubeflow/pipelines manifests/.../pipelines-profile-controller/
    sync.py). The Profile is cluster-scoped and names the namespace (api/v1/profile_types.go)."""
    docs = _kubeflow()
    (profile,), (namespace,) = find(docs, "Profile"), find(docs, "Namespace")
    assert profile["apiVersion"] == "kubeflow.org/v1" and "namespace" not in profile["metadata"]
    assert profile["metadata"]["name"] == namespace["metadata"]["name"] == pipeline.PROFILE_NAMESPACE
    assert profile["spec"]["owner"]["kind"] == "User"
    assert namespace["metadata"]["annotations"]["owner"] == profile["spec"]["owner"]["name"]
    labels = namespace["metadata"]["labels"]
    assert labels["pipelines.kubeflow.org/enabled"] == "true"
    # Not the kubeflow-profile marker's key: the controller would never set its own value then.
    assert "app.kubernetes.io/part-of" not in labels
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] not in ("Namespace", "Profile")} == {
        pipeline.PROFILE_NAMESPACE}


def test_pipeline_pods_live_in_a_baseline_namespace_and_ray_pods_in_a_restricted_one():
    """Pod Security admission enforces the namespace's `pod-security.kubernetes.io/enforce` level on
    every pod. The project namespaces keep `restricted` and get no pipeline pod (no pipeline service
    account there); the profile namespace runs KFP's and Argo's pods at `baseline` (Kubeflow's own PSS
    setting for profiles, kubeflow/manifests applications/profiles/pss/namespace-labels.yaml) and warns
    and audits at `restricted`."""
    (namespace,) = find(_kubeflow(), "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    for overlay in OVERLAYS:
        docs = rendered(f"k8s/overlays/{overlay}")
        (project,) = find(docs, "Namespace")
        assert project["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert find(docs, "ServiceAccount", pipeline.SERVICE_ACCOUNT) == []


def _rules(docs: list[dict], role: str) -> set[tuple]:
    (doc,) = find(docs, "Role", role)
    return {(g, r, v, tuple(rule.get("resourceNames", ()))) for rule in doc["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def test_runner_role_is_what_argo_and_kfp_need_in_the_profile_namespace():
    """Argo's executor reports outputs as WorkflowTaskResults: create + patch is the documented minimum
    for Argo >= 3.4 (argo-workflows v4.0.5 docs/workflow-rbac.md; KFP 2.17.0 ships Argo v4.0.5,
    kubeflow/pipelines third_party/argo/VERSION). The v4.0.5 executor makes no pod API call (its
    AddAnnotation has no caller; artifact secrets are read from mounted volumes, workflow/executor/
    executor.go GetSecret), so the pre-3.4 pods get/watch/patch are not granted. KFP 2.17's launcher
    gets its own pod (launcher_v2.go retryIndexFromPodAnnotation), the `kfp-launcher` ConfigMap (a
    Forbidden fails the step, config/env.go FromConfigMap) and the object-store Secret it opens the
    bucket with on every step (env.go minioArtifactSecretName). Nothing else, and secrets by name."""
    docs = _kubeflow()
    assert _rules(docs, "streamrec-pipeline-runner") == {
        ("argoproj.io", "workflowtaskresults", "create", ()), ("argoproj.io", "workflowtaskresults", "patch", ()),
        ("", "pods", "get", ()), ("", "configmaps", "get", ("kfp-launcher",)),
        ("", "secrets", "get", ("mlpipeline-minio-artifact",))}
    (binding,) = find(docs, "RoleBinding", "streamrec-pipeline-runner")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "streamrec-pipeline-runner"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pipeline.SERVICE_ACCOUNT,
                                    "namespace": pipeline.PROFILE_NAMESPACE}]
    assert find(docs, "ServiceAccount", pipeline.SERVICE_ACCOUNT)[0]["metadata"]["namespace"] == \
        pipeline.PROFILE_NAMESPACE


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_project_namespace_binds_the_profile_service_account(overlay):
    """A RoleBinding grants its Role, in its own namespace, to subjects of any namespace: the project
    namespace's `streamrec-pipeline` Role goes to the profile's service account, which the runs use
    (`service_account=` of create_run / create_recurring_run). The Role's exact rules are checked by
    running the pipeline against them (test_kubeflow_pipeline.py)."""
    docs = rendered(f"k8s/overlays/{overlay}")
    (binding,) = find(docs, "RoleBinding", "streamrec-pipeline")
    assert binding["roleRef"]["name"] == "streamrec-pipeline" and find(docs, "Role", "streamrec-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pipeline.SERVICE_ACCOUNT,
                                    "namespace": pipeline.PROFILE_NAMESPACE}], (
        "the overlays must not patch this binding's subject to the project namespace (see k8s/pipeline/README.md)")


def test_kubeflow_objects_validate_and_render_like_kustomize():
    """The core objects against the Kubernetes schemas (kubernetes-validate, strict); the Profile has no
    schema there, so its fields are the v1 ProfileSpec's (owner rbacv1.Subject, plugins,
    resourceQuotaSpec). Where kubectl exists, k8s.kustomize renders the folder as kustomize does."""
    docs = _kubeflow()
    problems = [p for d in docs if d["kind"] != "Profile" for p in validate.schema_problems(d, None)]
    assert problems == []
    (profile,) = find(docs, "Profile")
    assert set(profile["spec"]) <= {"owner", "plugins", "resourceQuotaSpec"}
    assert set(profile["spec"]["owner"]) <= {"kind", "name", "apiGroup", "namespace"}
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", str(ROOT / KUBEFLOW)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert kustomize.dump([d for d in yaml.safe_load_all(out.stdout) if d]) == kustomize.dump(docs)


def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "k8s/pipeline/Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_control_image_is_small_pinned_and_runs_as_the_steps_uid():
    """The steps' securityContext says runAsNonRoot with CONTROL_UID; the kubelet refuses a non-numeric
    USER under runAsNonRoot, so the image's USER is that number. It installs only what the components
    import (the kfp runtime that `kfp.dsl.executor_main` needs since they compile with
    install_kfp_package=False, kubernetes, PyYAML), at the lock's versions, so the runtime matches the
    compiling SDK (sdkVersion)."""
    steps = _dockerfile()
    (base,) = [arg for op, arg in steps if op == "FROM"]
    assert re.search(r":[\w.-]+", base) and "latest" not in base
    assert [arg for op, arg in steps if op == "USER"][-1] == f"{pipeline.CONTROL_UID}:{pipeline.CONTROL_UID}"
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    installs = [args.split() for args in re.findall(r"pip install (.*?)(?:&&|$)", runs)]
    assert installs == [["-c", "/tmp/requirements.lock", "kfp", "kubernetes", "PyYAML"]]  # constraints, not -r
    lock = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert {"kfp", "kubernetes", "PyYAML"} <= set(lock)
    assert yaml.safe_load_all(pipeline.COMPILED.read_text()).__next__()["sdkVersion"] == f"kfp-{lock['kfp']}"
    assert ("COPY", "requirements.lock /tmp/requirements.lock") in steps


class FakeClient:
    """kfp.Client's calls that `run` and `schedule` make."""

    def __init__(self):
        self.calls = []

    def create_experiment(self, name, description=None, namespace=None):
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return SimpleNamespace(experiment_id="exp-1")

    def create_recurring_run(self, **kwargs):
        self.calls.append(("create_recurring_run", kwargs))
        return "recurring"

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        self.calls.append(("create_run_from_pipeline_package", dict(kwargs, pipeline_file=pipeline_file)))
        return "run"


def test_recurring_run_is_one_at_a_time_in_the_profile_namespace():
    """kfp 2.17.0 Client.create_recurring_run: the experiment decides the namespace (created in the
    profile's), `service_account` the pods' identity, `max_concurrency=1` keeps two runs from ingesting
    the same files at once, `no_catchup=True` runs once after a pause instead of backfilling every missed
    slot. The arguments bind to the real method's signature."""
    import kfp

    client = FakeClient()
    pipeline.schedule(client, "streamrec-dev", "0 0 3 * * *", artifact_root="s3://lake/artifacts")
    (_, experiment), (_, kwargs) = client.calls
    assert experiment == {"name": pipeline.EXPERIMENT, "namespace": pipeline.PROFILE_NAMESPACE}
    assert kwargs["experiment_id"] == "exp-1" and kwargs["cron_expression"] == "0 0 3 * * *"
    assert kwargs["max_concurrency"] == 1 and kwargs["no_catchup"] is True and kwargs["enabled"] is True
    assert kwargs["service_account"] == pipeline.SERVICE_ACCOUNT and kwargs["enable_caching"] is False
    assert kwargs["params"] == {"namespace": "streamrec-dev", "artifact_root": "s3://lake/artifacts"}
    assert kwargs["pipeline_package_path"] == str(pipeline.COMPILED)
    inspect.signature(kfp.Client.create_recurring_run).bind(None, **kwargs)
    by_version = pipeline.recurring_run_args("e", "@daily", {}, version_id="v-7")
    assert by_version["version_id"] == "v-7" and "pipeline_package_path" not in by_version


def test_one_run_starts_in_the_profile_namespace_as_the_pipeline_account():
    import kfp

    client = FakeClient()
    pipeline.start_run(client, "streamrec")
    ((_, kwargs),) = client.calls
    assert kwargs["namespace"] == pipeline.PROFILE_NAMESPACE and kwargs["service_account"] == pipeline.SERVICE_ACCOUNT
    assert kwargs["arguments"] == {"namespace": "streamrec"}
    inspect.signature(kfp.Client.create_run_from_pipeline_package).bind(None, **kwargs)


@pytest.mark.parametrize("cron,ok", [("0 0 3 * * *", True), ("0 */30 * * * *", True), ("@daily", True),
                                     ("@every 6h", True), ("0 3 * * *", False), ("3 * * *", False)])
def test_cron_has_six_fields_seconds_first(cron, ok):
    """KFP's scheduled-workflow controller parses with robfig/cron v1.2.0 `cron.Parse` (kubeflow/pipelines
    backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go), whose default parser is
    Second|Minute|Hour|Dom|Month|DowOptional|Descriptor (robfig/cron v1.2.0 parser.go): a five-field
    crontab line parses too, shifted by a field ("0 3 * * *" = minute 3 of every hour), so it is refused."""
    if ok:
        assert pipeline.validate_cron(cron) == cron
    else:
        with pytest.raises(ValueError, match="6 fields"):
            pipeline.validate_cron(cron)


# --- the serving step's /healthz check: network --------------------------------------------------------


def _selects(selector: dict | None, labels: dict) -> bool:
    """metav1.LabelSelector: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist); {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": has and value in e.get("values", []), "NotIn": not has or value not in e.get("values", []),
              "Exists": has, "DoesNotExist": not has}[e["operator"]]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict, policy_ns: str, ns: str, ns_labels: dict, pod_labels: dict) -> bool:
    """A NetworkPolicyPeer: podSelector alone means the policy's own namespace; namespaceSelector alone any
    pod of the matching namespaces; both, the matching pods there. ipBlock never names a pod here."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_ns = _selects(peer["namespaceSelector"], ns_labels)
    else:
        in_ns = ns == policy_ns
    return in_ns and _selects(peer.get("podSelector"), pod_labels)


def _port_matches(ports: list[dict] | None, port: int) -> bool:
    return not ports or any(p.get("port") in (None, port) and p.get("protocol", "TCP") == "TCP" for p in ports)


def _allowed(policies: list[dict], direction: str, policy_ns: str, pod_labels: dict, peer_ns: str,
             peer_ns_labels: dict, peer_labels: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy semantics for one direction of one pod: with no policy of that type selecting
    it, all traffic; else the union of the selecting policies' rules (networking.k8s.io/v1)."""
    mine = [p for p in policies if p["metadata"].get("namespace", policy_ns) == policy_ns
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and _selects(p["spec"]["podSelector"], pod_labels)]
    if not mine:
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(_port_matches(rule.get("ports"), port) and (
        not rule.get(peers) or any(_peer_matches(peer, policy_ns, peer_ns, peer_ns_labels, peer_labels)
                                   for peer in rule[peers]))
        for p in mine for rule in p["spec"].get(key) or [])


def _ns_labels(namespace: dict) -> dict:
    """A namespace's labels, with the one the API server sets on every namespace (Kubernetes >= 1.22)."""
    return {**(namespace["metadata"].get("labels") or {}), "kubernetes.io/metadata.name": namespace["metadata"]["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pipeline_namespace_reaches_the_serve_pods_on_8000(overlay):
    """The serving step of the pipeline (k8s/pipeline/pipeline.py update_serving) checks the model
    versions on http://<rayservice>-serve-svc.<ns>.svc.cluster.local:8000/healthz from a pod of the
    profile namespace. A Service's traffic reaches the pods behind it, so the project's ingress
    policies must admit that namespace on 8000 to every serve pod of the RayService (`serve-clients`),
    whatever labels KFP puts on its pods; and the profile namespace (k8s/kubeflow) must let it out to
    them and to DNS (it defines no NetworkPolicy now: no policy, no restriction). Evaluated with
    NetworkPolicy's own semantics, so narrowing `serve-clients` keeps this namespace or fails here."""
    docs, kubeflow = rendered(f"k8s/overlays/{overlay}"), _kubeflow()
    (project,), (profile_ns,) = find(docs, "Namespace"), find(kubeflow, "Namespace")
    project_ns = project["metadata"]["name"]
    step_labels = {"pipelines.kubeflow.org/v2_component": "true"}  # any: the policy must not depend on them
    (rayservice,) = find(docs, "RayService", "streamrec-serve")
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    serve_pods = [g["template"]["metadata"]["labels"] for g in groups]
    policies = find(docs, "NetworkPolicy")
    for labels in serve_pods:
        assert _allowed(policies, "Ingress", project_ns, labels, pipeline.PROFILE_NAMESPACE, _ns_labels(profile_ns),
                        step_labels, 8000), labels
        # and only the serve port is opened to it, not Ray's internals (GCS 6379, dashboard 8265)
        for port in (6379, 8265):
            assert not _allowed(policies, "Ingress", project_ns, labels, pipeline.PROFILE_NAMESPACE,
                                _ns_labels(profile_ns), step_labels, port), (labels, port)
    profile_policies = find(kubeflow, "NetworkPolicy")
    for labels in serve_pods:
        assert _allowed(profile_policies, "Egress", pipeline.PROFILE_NAMESPACE, step_labels, project_ns,
                        _ns_labels(project), labels, 8000)
    assert _allowed(profile_policies, "Egress", pipeline.PROFILE_NAMESPACE, step_labels, "kube-system",
                    {"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"}, 53)
