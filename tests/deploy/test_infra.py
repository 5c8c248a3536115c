"""infra/: the in-cluster services pass the same checks as the project; versions are pinned; no
credential is written anywhere; Prometheus keeps what the pods annotate."""

from __future__ import annotations

import re

import yaml

from infra import image_digests
from k8s import validate
from tests.deploy.conftest import ROOT, find, rendered

INFRA = ROOT / "infra"


def test_infra_manifests_are_valid():
    docs = rendered("infra/k8s")
    assert validate.problems(docs, None) == []
    assert {d["metadata"]["name"] for d in find(docs, "StatefulSet")} == {"redis", "minio"}


def test_kuberay_operator_pinned_to_the_crd_release(crds):
    script = (INFRA / "install.sh").read_text()
    version = re.search(r"^KUBERAY_VERSION=(\d+\.\d+\.\d+)$", script, re.M).group(1)
    assert "--server-side" in script and "--skip-crds" in script and '--version "${KUBERAY_VERSION}"' in script
    values = yaml.safe_load((INFRA / "kuberay" / "values.yaml").read_text())
    assert values["image"]["tag"] == f"v{version}"
    assert values["securityContext"]["runAsNonRoot"] is True
    assert values["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The CRD schemas the tests use are from the same KubeRay release the operator runs.
    assert f"v{version}" in (crds.parent / "README.md").read_text()


def test_images_pinned_and_no_credentials_in_files():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    images = [s["image"] for s in compose["services"].values()]
    images += [c["image"] for d in rendered("infra/k8s") for _, pod in validate.pod_specs(d)
               for c in pod["containers"]]
    for image in images:
        assert ":" in image and not image.endswith(":latest"), image
    for name in ("compose.yaml", "k8s/redis.yaml", "k8s/minio.yaml", "kuberay/values.yaml"):
        text = "\n".join(line for line in (INFRA / name).read_text().splitlines() if not line.lstrip().startswith("#"))
        for match in re.finditer(r"(PASSWORD|password|SECRET)\w*[\"']?\s*[:=]\s*(\S+)", text):
            value = match.group(2)
            assert value.startswith(("${", "\"$", "$", "{", "?")) or "secretKeyRef" in value, (name, match.group(0))
    for service in ("redis", "minio"):
        assert all(p.startswith("127.0.0.1:") for p in compose["services"][service]["ports"])


def test_prometheus_scrapes_annotated_ray_pods():
    config = yaml.safe_load((INFRA / "prometheus" / "scrape-config.yaml").read_text())
    ray = next(job for job in config["scrape_configs"] if job["job_name"] == "streamrec-ray")
    assert set(ray["kubernetes_sd_configs"][0]["namespaces"]["names"]) == {"streamrec", "streamrec-dev"}
    keep = ray["relabel_configs"][0]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    assert keep["action"] == "keep"
    address = next(r for r in ray["relabel_configs"] if r.get("target_label") == "__address__")
    assert re.sub(address["regex"] + "$", address["replacement"].replace("$", "\\"), "10.0.0.7:6379;8080") \
        == "10.0.0.7:8080"


def test_redis_is_patched_and_every_image_is_pinned_by_digest(monkeypatch, capsys):
    """Redis 7.4.6 fixed the Lua use-after-free (CVE-2025-49844); 7.4.2 ran in compose and in-cluster. Every
    third-party reference carries a digest; `python infra/image_digests.py` reports and fails on one without."""
    refs = image_digests.references()
    redis = [ref for _, ref in refs if ref.startswith("redis:")]
    assert len(redis) == 2  # compose and infra/k8s
    for ref in redis:
        version = re.match(r"redis:(\d+)\.(\d+)\.(\d+)-alpine@", ref)
        assert version and tuple(map(int, version.groups())) >= (7, 4, 6), ref
    assert len(refs) >= 8 and image_digests.unpinned() == [] and image_digests.main() == 0

    pinned = ("Dockerfile", "python:3.11.14-slim-bookworm@sha256:" + "0123456789abcdef" * 4)
    monkeypatch.setattr(image_digests, "references", lambda: [pinned, ("x", "minio:RELEASE.1")])
    assert image_digests.unpinned() == [("x", "minio:RELEASE.1")]
    assert image_digests.main() == 1 and "minio:RELEASE.1: no digest" in capsys.readouterr().out
