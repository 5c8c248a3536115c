"""The manifests against what KubeRay v1.7.0 and Ray 2.60 do. Each test names the behaviour it encodes and
the source it was read in (kuberay: github.com/ray-project/kuberay at v1.7.0; ray: the installed ray 2.60
package). None of this can run here (no API server): the tests check the rendered objects instead."""

from __future__ import annotations

import copy
import datetime as dt
import sys
import types

import pytest
import yaml

import config
from k8s import validate
from tests.deploy.conftest import OVERLAYS, ROOT, find, rendered

NAMESPACE = {"dev": "streamrec-dev", "prod": "streamrec"}
RAY_KINDS = ("RayJob", "RayService", "RayCluster")


def _ray_docs(docs):
    return [d for kind in RAY_KINDS for d in find(docs, kind)]


def _ray_containers(doc):
    for where, pod in validate.pod_specs(doc):
        if "submitter" not in where:
            yield where, pod, pod["containers"][0]


def _env(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


# --- identities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_gets_a_token_and_the_autoscaler_role_workers_none(overlay):
    """kuberay common/pod.go (DefaultHeadPodTemplate): with enableInTreeAutoscaling the autoscaler is a
    sidecar of the head pod under the head's service account; ray autoscaler/_private/kuberay/node_provider.py
    (load_k8s_secrets) reads /var/run/secrets/kubernetes.io/serviceaccount/token, so the head needs a token.
    kuberay common/rbac.go (BuildRole): the autoscaler's rules are pods get/list/watch/patch, pods/resize
    patch, rayclusters get/patch; ours are exactly those. kuberay raycluster_controller.go
    (reconcileAutoscalerServiceAccount): a service account named in the head template must exist."""
    docs = rendered(f"k8s/overlays/{overlay}")
    accounts = {d["metadata"]["name"]: d for d in find(docs, "ServiceAccount")}
    assert accounts["streamrec-ray-head"]["automountServiceAccountToken"] is True
    assert accounts["streamrec-ray"]["automountServiceAccountToken"] is False
    role = find(docs, "Role", "streamrec-ray-autoscaler")[0]
    assert validate._grants(role) == validate.AUTOSCALER_RULES
    binding = find(docs, "RoleBinding", "streamrec-ray-autoscaler")[0]
    assert binding["roleRef"]["name"] == "streamrec-ray-autoscaler"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "streamrec-ray-head",
                                    "namespace": NAMESPACE[overlay]}]
    autoscaled = 0
    for doc in _ray_docs(docs):
        autoscaled += bool(validate._cluster_of(doc).get("enableInTreeAutoscaling"))
        for where, pod in validate.pod_specs(doc):
            mounted = validate._token_mounted(pod, accounts)
            assert mounted == ("headGroupSpec" in where), f"{doc['metadata']['name']} {where}"
    assert autoscaled >= (7 if overlay == "prod" else 1)  # prod: every stage, serving, the cluster
    assert validate.identity_problems(docs) == []


def test_identity_mistakes_are_caught():
    """The failure of issue 15: the autoscaler's head without a token never becomes Ready."""
    docs = rendered("k8s/overlays/prod")
    job = find(docs, "RayJob", "streamrec-train")[0]
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] = False
    assert "needs the head's token" in "\n".join(validate.identity_problems(docs))
    docs = rendered("k8s/overlays/prod")
    role = find(docs, "Role", "streamrec-ray-autoscaler")[0]
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["rayclusters"]]
    assert "lacks the autoscaler's rules" in "\n".join(validate.identity_problems(docs))
    docs = [d for d in rendered("k8s/overlays/dev") if d["metadata"]["name"] != "streamrec-ray-head"]
    assert "service account streamrec-ray-head does not exist" in "\n".join(validate.problems(docs, None))
    docs = rendered("k8s/overlays/dev")
    worker = find(docs, "RayCluster")[0]["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["automountServiceAccountToken"] = True
    assert "does not need" in "\n".join(validate.identity_problems(docs))


# --- serving -------------------------------------------------------------------------------------


def _serve(overlay):
    svc = find(rendered(f"k8s/overlays/{overlay}"), "RayService")[0]
    return svc, yaml.safe_load(svc["spec"]["serveConfigV2"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_proxies_on_every_node_and_workers_probe_port_8000(overlay):
    """ray serve/config.py (ProxyLocation): EveryNode runs a proxy on every node holding a replica. kuberay
    common/pod.go (initLivenessAndReadinessProbe): a RayService worker is Ready only while `wget` reaches the
    proxy's /-/healthz on its `serve` port (default 8000), and rayservice_controller.go
    (updateHeadPodServeLabel): with excludeHeadPodFromServeSvc the head never joins the serve Service; so
    HeadOnly leaves workers NotReady and, in prod, the Service without endpoints."""
    svc, v2 = _serve(overlay)
    assert v2["proxy_location"] == "EveryNode" and v2["http_options"]["port"] == 8000
    assert svc["spec"].get("excludeHeadPodFromServeSvc", False) is (overlay == "prod")
    for group in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        ports = group["template"]["spec"]["containers"][0]["ports"]
        assert {"containerPort": 8000, "name": "serve"} in ports
    assert "wget" in (ROOT / "Dockerfile").read_text()  # the probe's command
    broken = copy.deepcopy(svc)
    broken["spec"]["serveConfigV2"] = svc["spec"]["serveConfigV2"].replace("EveryNode", "HeadOnly")
    found = "\n".join(validate.operator_problems(broken))
    assert "never become Ready" in found
    assert ("no endpoints" in found) is (overlay == "prod")


def test_local_demo_serve_config_unchanged_where_it_must_be():
    """serving/config.yaml stays a one-node config: loopback host, fixed replicas (no autoscaling there)."""
    local = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1" and local["proxy_location"] == "EveryNode"
    assert all("autoscaling_config" not in d for d in local["applications"][0]["deployments"])


def test_prod_serve_autoscaling():
    """ray serve/schema.py (DeploymentSchema.validate_num_replicas_and_autoscaling_config): an int
    num_replicas next to autoscaling_config is rejected, so autoscaled deployments carry none. The config
    passes Ray's own ServeDeploySchema. EventIntake stays one replica: the single writer of its features."""
    _, v2 = _serve("prod")
    deployments = {d["name"]: d for d in v2["applications"][0]["deployments"]}
    for name in ("Ingress", "FeatureLookup", "Retriever", "Ranker"):
        d = deployments[name]
        scaling = d["autoscaling_config"]
        assert "num_replicas" not in d
        assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
        assert 0 < scaling["target_ongoing_requests"] < d["max_ongoing_requests"]
    assert deployments["EventIntake"]["num_replicas"] == 1 and "autoscaling_config" not in deployments["EventIntake"]
    assert validate.serve_config_problems(yaml.safe_dump(v2)) == []
    deployments["Ranker"]["num_replicas"] = 3
    assert "rejected by Ray Serve" in "\n".join(validate.serve_config_problems(yaml.safe_dump(v2)))


def test_prod_gcs_fault_tolerance_in_external_redis():
    """kuberay apis/ray/v1/raycluster_types.go (GcsFaultToleranceOptions) and common/pod.go: KubeRay
    points the GCS at redisAddress and passes redisPassword as REDIS_PASSWORD; utils/validation.go
    rejects a redis-password rayStartParam or REDIS_PASSWORD / RAY_REDIS_ADDRESS env on the head then."""
    svc, _ = _serve("prod")
    cluster = svc["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].endswith(":6379")
    assert ft["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "streamrec-redis",
                                                                  "key": "REDIS_PASSWORD"}}}
    assert validate.operator_problems(svc) == []
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"].append({"name": "REDIS_PASSWORD", "value": "x"})
    assert "no REDIS_PASSWORD env" in "\n".join(validate.operator_problems(svc))
    assert "gcsFaultToleranceOptions" not in _serve("dev")[0]["spec"]["rayClusterConfig"]


# --- configuration -------------------------------------------------------------------------------


def _profile(overlay, tmp_path, monkeypatch):
    cm = find(rendered(f"k8s/overlays/{overlay}"), "ConfigMap", "streamrec-profile")[0]
    path = tmp_path / "profile.yaml"
    path.write_text(cm["data"]["profile.yaml"])
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379,password=p")
    return config.load(path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_profiles_keep_everything_on_s3(overlay, tmp_path, monkeypatch):
    """ray train: with workers on other nodes (the head has num-cpus 0) Ray Train refuses a storage_path
    local to the head (STACK.md, "Learned while building"); artifacts are read by the RayService's nodes.
    delta-rs 1.x commits with S3 conditional put (object_store's default; the DynamoDB locking provider was
    removed in 1.0): stated explicitly, never the unsafe rename."""
    cfg = _profile(overlay, tmp_path, monkeypatch)
    for location in (cfg.training.storage_path, cfg.training.artifact_dir, cfg.features.registry,
                     cfg.lake.root, cfg.ingest.landing_dir):
        assert location.startswith("s3://"), location
    options = cfg.lake.storage_options
    assert options["aws_conditional_put"] == "etag"
    assert not {k.upper() for k in options} & {"AWS_S3_ALLOW_UNSAFE_RENAME", "AWS_S3_LOCKING_PROVIDER"}
    # use_gpu exactly where a GPU worker group exists.
    jobs = find(rendered(f"k8s/overlays/{overlay}"), "RayJob")
    gpu_groups = {j["metadata"]["labels"]["streamrec.io/stage"] for j in jobs
                  for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"}
    assert cfg.training.use_gpu is bool(gpu_groups)
    if cfg.training.use_gpu:
        assert gpu_groups == {"train", "train_retriever"}


def test_dev_endpoint_in_every_ray_container():
    """pyarrow's S3 filesystem and boto3 read AWS_ENDPOINT_URL only from the environment, Feast's S3
    registry FEAST_S3_ENDPOINT_URL (feast infra/registry/s3.py); the profile's storage_options reach only
    delta-rs. So every Ray container in dev (MinIO) carries them; prod (AWS S3) carries none."""
    endpoint = "http://minio.streamrec-infra.svc.cluster.local:9000"
    for overlay in OVERLAYS:
        for doc in _ray_docs(rendered(f"k8s/overlays/{overlay}")):
            for where, _, container in _ray_containers(doc):
                env = _env(container)
                if overlay == "dev":
                    assert env["AWS_ENDPOINT_URL"] == env["FEAST_S3_ENDPOINT_URL"] == endpoint, where
                    assert env["AWS_ALLOW_HTTP"] == "true"
                else:
                    assert not {"AWS_ENDPOINT_URL", "FEAST_S3_ENDPOINT_URL", "AWS_ALLOW_HTTP"} & set(env), where
                assert env["AWS_REGION"] and "secretKeyRef" in env["AWS_ACCESS_KEY_ID"]


@pytest.mark.timeout(120)
def test_delta_commits_on_s3_are_put_if_absent(tmp_path):
    """deltalake 1.6.6 against a real S3 API (moto's server): a writer holding a stale snapshot does not
    overwrite the other's commit; with `aws_conditional_put: etag` (our setting) and without it (the
    default), both appends survive. (Tried here; without conditional put the second commit would replace
    _delta_log/...01.json and lose the first append.)"""
    pytest.importorskip("moto")
    import socket
    import subprocess
    import time

    import boto3
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="k",
                     aws_secret_access_key="s").create_bucket(Bucket="lake")
        options = {**keys, "AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true", "aws_conditional_put": "etag"}
        uri = "s3://lake/events"
        write_deltalake(uri, pa.table({"x": [0]}), storage_options=options)
        first, stale = DeltaTable(uri, storage_options=options), DeltaTable(uri, storage_options=options)
        write_deltalake(first, pa.table({"x": [1]}), mode="append")
        write_deltalake(stale, pa.table({"x": [2]}), mode="append")
        table = DeltaTable(uri, storage_options=options)
        assert table.version() == 2
        assert sorted(table.to_pyarrow_table()["x"].to_pylist()) == [0, 1, 2]
    finally:
        server.terminate()
        server.wait(timeout=30)


# --- the long-lived cluster ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_long_lived_cluster_for_ray_job_submit(overlay):
    """kuberay utils/validation.go: authOptions.mode token needs rayVersion >= 2.52.0; raycluster_controller.go
    (reconcileAuthSecret) then creates Secret <cluster> (key auth_token) and common/pod.go
    (SetContainerTokenAuthEnvVars) sets RAY_AUTH_MODE / RAY_AUTH_TOKEN on the Ray containers and the
    autoscaler. Workers scale from zero (idle cost: the head), the head takes no tasks."""
    docs = rendered(f"k8s/overlays/{overlay}")
    cluster = find(docs, "RayCluster", "streamrec-cluster")[0]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["cpu"]["minReplicas"] == 0 < groups["cpu"]["maxReplicas"]
    assert ("gpu" in groups) is (overlay == "prod")
    broken = copy.deepcopy(find(docs, "RayCluster")[0])
    broken["spec"]["rayVersion"] = "2.50.0"
    assert "token mode needs rayVersion" in "\n".join(validate.operator_problems(broken))
    runbook = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("port-forward svc/streamrec-cluster-head-svc 8265:8265", "RAY_AUTH_MODE=token",
                   "RAY_AUTH_TOKEN=", "ray job submit --address http://localhost:8265 --working-dir ."):
        assert needle in runbook, needle


# --- finished runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_ttl_in_minutes(overlay):
    """kuberay rayjob_controller.go: with shutdownAfterJobFinishes the cluster is deleted
    ttlSecondsAfterFinished after the job ends; until then its pods hold their nodes."""
    for job in find(rendered(f"k8s/overlays/{overlay}"), "RayJob"):
        assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= validate.MAX_TTL_S
    job = find(rendered("k8s/overlays/prod"), "RayJob")[0]
    job["spec"]["ttlSecondsAfterFinished"] = 3600
    assert "at most 900s" in "\n".join(validate.operator_problems(job))


def _cleanup_script(docs) -> str:
    cron = find(docs, "CronJob", "streamrec-rayjob-cleanup")[0]
    return cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_finished_rayjobs_are_deleted_by_the_cleanup_cronjob(monkeypatch):
    """KubeRay deletes a finished job's cluster, never the RayJob (rayjob_controller.go); it sets
    status.endTime when jobDeploymentStatus becomes terminal, Complete or Failed (updateRayJobStatus,
    apis/ray/v1/rayjob_types.go IsJobDeploymentTerminal). The CronJob deletes run copies (label
    streamrec.io/run) that ended more than KEEP_HOURS ago, and may only list and delete RayJobs."""
    docs = rendered("k8s/overlays/prod")
    role = find(docs, "Role", "streamrec-rayjob-cleanup")[0]
    assert validate._grants(role) == {("ray.io", "rayjobs"): {"list", "delete"}}
    now = dt.datetime.now(dt.UTC)

    def job(name, status, hours_ago):
        end = (now - dt.timedelta(hours=hours_ago)).isoformat().replace("+00:00", "Z")
        return {"metadata": {"name": name}, "status": {"jobDeploymentStatus": status, "endTime": end}}

    items = [job("old-ok", "Complete", 30), job("old-failed", "Failed", 25), job("recent", "Complete", 2),
             job("running", "Running", 40), {"metadata": {"name": "new"}, "status": {}}]
    calls = {"deleted": [], "selector": None}

    class Api:
        def list_namespaced_custom_object(self, group, version, ns, plural, label_selector):
            calls["selector"] = (group, version, ns, plural, label_selector)
            return {"items": items}

        def delete_namespaced_custom_object(self, group, version, ns, plural, name):
            calls["deleted"].append(name)

    kube = types.ModuleType("kubernetes")
    kube.client = types.SimpleNamespace(CustomObjectsApi=Api)
    kube.config = types.SimpleNamespace(load_incluster_config=lambda: None)
    monkeypatch.setitem(sys.modules, "kubernetes", kube)
    monkeypatch.setenv("KEEP_HOURS", "24")
    monkeypatch.setenv("NAMESPACE", "streamrec")
    exec(compile(_cleanup_script(docs), "cleanup", "exec"), {})
    assert calls["selector"] == ("ray.io", "v1", "streamrec", "rayjobs", "streamrec.io/run")
    assert calls["deleted"] == ["old-ok", "old-failed"]


# --- network -------------------------------------------------------------------------------------


def _egress(docs, name):
    return find(docs, "NetworkPolicy", name)[0]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_policy(overlay):
    """Egress is denied but for DNS, S3 (443; MinIO 9000), Redis (6379), Ray's own traffic between the
    project's pods, and the API server for the pods that call it: the autoscaler in each head (ray
    autoscaler/_private/kuberay/node_provider.py calls https://kubernetes.default:443; policies see the
    endpoint's address and port, 443 or 6443) and the cleanup job; those are the pods with a token."""
    docs = rendered(f"k8s/overlays/{overlay}")
    assert _egress(docs, "default-deny-egress") == {"podSelector": {}, "policyTypes": ["Egress"]}
    dns = _egress(docs, "egress-dns")["egress"][0]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    store = _egress(docs, "egress-object-store")["egress"]
    assert {p["port"] for rule in store for p in rule["ports"]} == {443, 9000}
    redis = _egress(docs, "egress-redis")["egress"]
    assert {p["port"] for rule in redis for p in rule["ports"]} == {6379}
    assert any("ipBlock" in to for rule in redis for to in rule["to"]) is (overlay == "prod")
    internal = _egress(docs, "egress-ray-internal")
    assert internal["egress"][0]["to"][0]["podSelector"] == internal["podSelector"]
    api = _egress(docs, "egress-kube-apiserver")
    assert {p["port"] for p in api["egress"][0]["ports"]} == {443, 6443}
    selector = api["podSelector"]["matchExpressions"][0]
    accounts = {d["metadata"]["name"]: d for d in find(docs, "ServiceAccount")}
    for doc in _ray_docs(docs) + find(docs, "CronJob"):
        templates = [(where, pod) for where, pod in validate.pod_specs(doc)]
        for where, pod in templates:
            if doc["kind"] == "CronJob":
                labels = doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            elif "submitter" in where:
                labels = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
            else:
                group = where.split(".")[-3]  # headGroupSpec or workerGroupSpecs[i]
                cluster = validate._cluster_of(doc)
                spec = cluster["headGroupSpec"] if group == "headGroupSpec" else \
                    cluster["workerGroupSpecs"][int(group.split("[")[1].rstrip("]"))]
                labels = spec["template"]["metadata"]["labels"]
            reaches_api = labels.get(selector["key"]) in selector["values"]
            assert reaches_api == validate._token_mounted(pod, accounts), f"{doc['metadata']['name']} {where}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_writable_home_and_tmp_for_uid_1000(overlay):
    """Ray writes its session files under /tmp/ray and its auth token under ~/.ray (ray
    _private/authentication/authentication_token_setup.py), torch and Feast caches under HOME: every Ray
    container gets emptyDirs at /tmp and /data (HOME), so a read-only root filesystem is possible."""
    for doc in _ray_docs(rendered(f"k8s/overlays/{overlay}")):
        for where, pod, container in _ray_containers(doc):
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for path in ("/tmp", "/data"):
                assert "emptyDir" in volumes[mounts[path]], (where, path)
            assert _env(container)["HOME"] == "/data"


# --- access to the clusters (issue 20) ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_cluster_requires_the_token(overlay):
    """kuberay common/pod.go binds the dashboard (Jobs API) to 0.0.0.0 unless rayStartParams say otherwise, and
    ours say so too: the operator, the submitter and the other nodes connect to it. So every cluster runs with
    Ray token authentication (authOptions mode token: KubeRay makes Secret <cluster> and sets RAY_AUTH_MODE /
    RAY_AUTH_TOKEN on the Ray containers, the autoscaler and, for a RayJob, the submitter, rayjob_controller.go);
    k8s/validate.py refuses a cluster without it."""
    docs = _ray_docs(rendered(f"k8s/overlays/{overlay}"))
    assert {d["kind"] for d in docs} == set(RAY_KINDS)
    for doc in docs:
        cluster = validate._cluster_of(doc)
        assert cluster["authOptions"] == {"mode": "token"}, doc["metadata"]["name"]
        assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        broken = copy.deepcopy(doc)
        validate._cluster_of(broken).pop("authOptions")
        assert "authOptions: mode token required" in "\n".join(validate.operator_problems(broken))


def _pods(docs) -> list[tuple[str, dict]]:
    """(stage, pod labels) of every Ray pod and RayJob submitter the manifests make."""
    out = []
    for doc in _ray_docs(docs):
        cluster = validate._cluster_of(doc)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            labels = group["template"]["metadata"]["labels"]
            out.append((labels["streamrec.io/stage"], labels))
        if doc["kind"] == "RayJob":
            labels = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
            out.append((labels["streamrec.io/stage"], labels))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_ports_reachable_only_within_one_cluster(overlay):
    """The review's finding: `ray-internal` let any pod of the project reach any port of any Ray pod (another
    stage's GCS, the serving cluster's dashboard). Now, by NetworkPolicy semantics (the evaluator of
    test_kubeflow.py): a Ray pod admits on any port the pods of its own stage (one cluster at a time) and its
    submitter; from elsewhere in the namespace nothing; from outside the KubeRay operator on the dashboard,
    agent and serve ports, Prometheus on metrics, and on 8000 of the serve pods only the namespaces labelled
    streamrec.io/serve-client=true and the pipeline's profile namespace."""
    from tests.deploy.test_kubeflow import _allowed

    docs = rendered(f"k8s/overlays/{overlay}")
    ns = NAMESPACE[overlay]
    policies = find(docs, "NetworkPolicy")
    pods = _pods(docs)
    assert {stage for stage, _ in pods} == {"ingest", "features", "samples", "train", "train_retriever", "serve",
                                            "adhoc"}
    cleanup = find(docs, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]

    def reaches(target, source, port, source_ns=ns, ns_labels=None):
        return _allowed(policies, "Ingress", ns, target, source_ns,
                        ns_labels or {"kubernetes.io/metadata.name": source_ns}, source, port)

    for stage, target in pods:
        if target.get("streamrec.io/role") != "ray":
            continue
        for other_stage, source in pods:
            for port in (6379, 8265, 10001, 12345):
                assert reaches(target, source, port) is (other_stage == stage), (stage, other_stage, port)
        assert not any(reaches(target, cleanup, port) for port in (6379, 8265, 8000))
        operator = {"kubernetes.io/metadata.name": "kuberay-system"}
        assert reaches(target, {}, 8265, "kuberay-system", operator) and not reaches(target, {}, 6379,
                                                                                    "kuberay-system", operator)
        served = stage == "serve"
        assert reaches(target, {}, 8000, "ingress-nginx", {"streamrec.io/serve-client": "true"}) is served
        assert not reaches(target, {}, 8265, "ingress-nginx", {"streamrec.io/serve-client": "true"})
        assert not reaches(target, {}, 8000, "someone-else")
        assert reaches(target, {}, 8080, "monitoring")
    runbook = (ROOT / "docs" / "deploy.md").read_text()
    assert "streamrec.io/serve-client=true" in runbook
