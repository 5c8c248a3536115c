"""The Python kustomize renderer: its features one by one, and the same output as `kubectl kustomize`."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from k8s import kustomize
from tests.deploy.conftest import OVERLAYS, ROOT, find, rendered

STAGES = {"ingest", "features", "samples", "train", "train_retriever"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_stage_and_the_service(overlay):
    docs = rendered(f"k8s/overlays/{overlay}")
    namespace = {"dev": "streamrec-dev", "prod": "streamrec"}[overlay]
    jobs = find(docs, "RayJob")
    assert {j["metadata"]["labels"]["streamrec.io/stage"] for j in jobs} == STAGES
    assert len(find(docs, "RayService")) == 1
    assert [n["metadata"]["name"] for n in find(docs, "Namespace")] == [namespace]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
    for name in ("streamrec-ray-autoscaler", "streamrec-rayjob-cleanup"):
        assert find(docs, "RoleBinding", name)[0]["subjects"][0]["namespace"] == namespace
    images = {c["image"] for j in jobs for c in
              j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/streamrec:0.1.0"}


@pytest.mark.parametrize("folder", [f"k8s/overlays/{o}" for o in OVERLAYS] + ["infra/k8s"])
def test_same_output_as_kubectl_kustomize(folder):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the renderer is checked against kustomize only where it exists")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert kustomize.dump(rendered(folder)) == kustomize.dump(theirs)


def test_strategic_merge_core_lists_by_key_custom_lists_replaced():
    pod = {"containers": [{"name": "a", "image": "x", "env": [{"name": "A", "value": "1"}]}, {"name": "b"}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "B", "value": "2"}]}, {"name": "c"}]}
    merged = kustomize.strategic_merge(pod, patch, core=True)
    assert [c["name"] for c in merged["containers"]] == ["a", "b", "c"]
    assert merged["containers"][0]["image"] == "x"
    assert [e["name"] for e in merged["containers"][0]["env"]] == ["A", "B"]
    assert kustomize.strategic_merge(pod, patch, core=False)["containers"] == patch["containers"]
    assert kustomize.strategic_merge({"a": 1, "b": 2}, {"a": None}, core=True) == {"b": 2}


def test_json6902_operations():
    doc = {"spec": {"groups": [{"n": 1}], "x": 1}}
    out = kustomize.json6902(doc, [
        {"op": "add", "path": "/spec/groups/-", "value": {"n": 2}},
        {"op": "replace", "path": "/spec/x", "value": 5},
        {"op": "copy", "from": "/spec/x", "path": "/spec/y"},
        {"op": "remove", "path": "/spec/groups/0"},
        {"op": "test", "path": "/spec/y", "value": 5},
    ])
    assert out == {"spec": {"groups": [{"n": 2}], "x": 5, "y": 5}}
    assert doc == {"spec": {"groups": [{"n": 1}], "x": 1}}
    with pytest.raises(kustomize.KustomizeError, match="no key"):
        kustomize.json6902(doc, [{"op": "replace", "path": "/spec/missing/a", "value": 1}])


def test_generator_images_prefix_and_unsupported_keys(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: '1'}\n---\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n"
        "      containers: [{name: web, image: 'app:1'}]\n")
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [cm.yaml]\n")
    (tmp_path / "p.txt").write_text("hello")
    (tmp_path / "kustomization.yaml").write_text(
        "namespace: ns\nnamePrefix: x-\nresources: [base]\nimages: [{name: app, newName: reg/app, newTag: '2'}]\n"
        "configMapGenerator:\n- {name: settings, behavior: merge, files: [p.txt], literals: [b=2],"
        " options: {disableNameSuffixHash: true}}\n")
    docs = {d["kind"]: d for d in kustomize.render(tmp_path)}
    assert docs["ConfigMap"]["data"] == {"a": "1", "p.txt": "hello", "b": "2"}
    assert docs["ConfigMap"]["metadata"] == {"name": "x-settings", "namespace": "ns"}
    assert docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/app:2"
    (tmp_path / "kustomization.yaml").write_text("resources: [base]\nreplicas: [{name: web, count: 2}]\n")
    with pytest.raises(kustomize.KustomizeError, match="replicas"):
        kustomize.render(tmp_path)
