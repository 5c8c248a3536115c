"""Every rendered overlay passes the schemas, KubeRay's rules and the restricted pod profile; plus what
the deployment promises: GPUs for training in prod, secrets by reference, profiles the config accepts."""

from __future__ import annotations

import re

import pytest
import yaml

import config
from ingestion.staging import parse_on
from k8s import validate
from tests.deploy.conftest import OVERLAYS, ROOT, find, rendered


@pytest.mark.parametrize("folder", [f"k8s/overlays/{o}" for o in OVERLAYS])
def test_overlay_is_valid(folder, crds):
    assert validate.problems(rendered(folder), crds) == []


def _groups(job: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def test_prod_gpu_group_only_for_training_and_autoscaled():
    docs = rendered("k8s/overlays/prod")
    for job in find(docs, "RayJob"):
        stage = job["metadata"]["labels"]["streamrec.io/stage"]
        groups = _groups(job)
        assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
        assert groups["cpu"]["maxReplicas"] > groups["cpu"]["minReplicas"]
        if stage in ("train", "train_retriever"):
            gpu = groups["gpu"]
            pod = gpu["template"]["spec"]
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
        else:
            assert "gpu" not in groups
    dev = rendered("k8s/overlays/dev")
    assert all(set(_groups(j)) == {"cpu"} for j in find(dev, "RayJob"))
    assert all(not j["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling") for j in find(dev, "RayJob"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_jobs_run_the_stage_entrypoints(overlay):
    for job in find(rendered(f"k8s/overlays/{overlay}"), "RayJob"):
        spec, stage = job["spec"], job["metadata"]["labels"]["streamrec.io/stage"]
        assert spec["entrypoint"].startswith(f"python -m ray_jobs.{stage} --config /etc/streamrec/profile.yaml")
        assert spec["suspend"] is True and spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        assert job["metadata"]["name"] == "streamrec-" + stage.replace("_", "-")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_profile_configmap_loads_as_cluster_config(overlay, tmp_path, monkeypatch):
    cm = find(rendered(f"k8s/overlays/{overlay}"), "ConfigMap", "streamrec-profile")[0]
    path = tmp_path / "profile.yaml"
    path.write_text(cm["data"]["profile.yaml"])
    monkeypatch.delenv("REDIS_CONNECTION_STRING", raising=False)
    with pytest.raises(config.ConfigError, match="REDIS_CONNECTION_STRING is not set"):
        config.load(path)  # the Secret's value must arrive; a literal "${...}" never reaches Redis
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379,password=from-the-secret")
    cfg = config.load(path)
    assert cfg.profile == "cluster" and cfg.ray.address == "auto"
    assert parse_on(cfg) == "ray"  # a cluster's ingestion spreads its parse tasks over the nodes
    assert cfg.lake.root.startswith("s3://") and cfg.ingest.landing_dir.startswith("s3://")
    assert cfg.features.online_store.type == "redis"
    assert cfg.features.online_store.connection_string == "redis:6379,password=from-the-secret"
    assert not {k for k in cfg.lake.storage_options if re.search("SECRET|ACCESS_KEY|TOKEN", k)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_by_reference_only(overlay):
    docs = rendered(f"k8s/overlays/{overlay}")
    assert not find(docs, "Secret")
    text = yaml.safe_dump_all(docs)
    assert not re.search(r"password=|AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]", text, re.I)
    refs = set(re.findall(r"secretKeyRef:\s*\n\s*key: (\w+)\s*\n\s*name: ([\w-]+)", text))
    expected = {("AWS_ACCESS_KEY_ID", "streamrec-s3"), ("AWS_SECRET_ACCESS_KEY", "streamrec-s3"),
                ("REDIS_CONNECTION_STRING", "streamrec-redis"), ("STREAMREC_API_KEY", "streamrec-api")}
    if overlay == "prod":  # GCS fault tolerance's Redis password (gcsFaultToleranceOptions.redisPassword)
        expected.add(("REDIS_PASSWORD", "streamrec-redis"))
    assert refs == expected
    # Each Secret the manifests read is created by a documented command.
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    for secret in ("streamrec-s3", "streamrec-redis", "streamrec-api"):
        assert f"create secret generic {secret}" in deploy_doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_and_scraping(overlay):
    docs = rendered(f"k8s/overlays/{overlay}")
    deny = find(docs, "NetworkPolicy", "default-deny-ingress")[0]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    # Heads run as the account with a token (the autoscaler's), every other Ray pod as the one without.
    for doc in find(docs, "RayJob") + find(docs, "RayService") + find(docs, "RayCluster"):
        for where, pod in validate.pod_specs(doc):
            head = "headGroupSpec" in where
            assert pod["serviceAccountName"] == ("streamrec-ray-head" if head else "streamrec-ray"), where
    for doc in find(docs, "RayJob"):
        cluster = doc["spec"]["rayClusterSpec"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            meta = group["template"]["metadata"]
            assert meta["annotations"]["prometheus.io/scrape"] == "true"
            assert meta["annotations"]["prometheus.io/port"] == "8080"
            assert meta["labels"]["app.kubernetes.io/part-of"] == "streamrec"  # what the NetworkPolicies select
    namespace = find(docs, "Namespace")[0]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_crd_schemas_cover_the_ray_kinds(crds):
    kinds = {kind for _, kind in validate.crd_validators(crds)}
    assert {"RayCluster", "RayJob", "RayService"} <= kinds
