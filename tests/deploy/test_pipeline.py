"""The Kubeflow pipeline: the committed YAML is what compiling gives, the DAG gates training on
ingestion, and the components drive RayJobs / the RayService correctly (against a fake API)."""

from __future__ import annotations

import pytest
import yaml

from k8s.pipeline import pipeline

pytestmark = pytest.mark.timeout(300)


def test_compiled_yaml_is_up_to_date(tmp_path):
    fresh = pipeline.compile_to(tmp_path / "p.yaml").read_text()
    assert pipeline.COMPILED.read_text() == fresh, "stale: run python -m k8s.pipeline.pipeline"


def _dag() -> dict[str, dict]:
    spec = yaml.safe_load(pipeline.COMPILED.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    out = {}
    for name, task in tasks.items():
        params = task.get("inputs", {}).get("parameters", {})
        stage = params.get("stage", {}).get("runtimeValue", {}).get("constant")
        out[stage or task["componentRef"]["name"]] = {"name": name, "deps": set(task.get("dependentTasks", []))}
    return out


def test_training_waits_for_the_gate_and_serving_for_training():
    dag = _dag()
    by_name = {v["name"]: k for k, v in dag.items()}

    def upstream(key):
        seen, todo = set(), list(dag[key]["deps"])
        while todo:
            step = by_name[todo.pop()]
            if step not in seen:
                seen.add(step)
                todo += dag[step]["deps"]
        return seen

    assert {"ingest", "features", "samples"} <= upstream("train") & upstream("train_retriever")
    assert {"train", "train_retriever", "ingest"} <= upstream("comp-update-serving")
    assert upstream("ingest") == set()


class FakeApi:
    """CustomObjectsApi's calls the components make, over a dict of objects."""

    def __init__(self, objects: dict, statuses: list[dict] | None = None):
        self.objects, self.statuses, self.created, self.patches = objects, list(statuses or []), [], []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return self.objects[(plural, name)]

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.patches.append(body)
        return {"metadata": {"generation": 7}}


@pytest.fixture()
def fake(monkeypatch):
    from kubernetes import client, config

    holder = {}
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", lambda: holder["api"])
    return holder


TEMPLATE = {"metadata": {"name": "streamrec-train", "labels": {"streamrec.io/template": "true", "a": "b"}},
            "spec": {"suspend": True, "entrypoint": "python -m ray_jobs.train --config /p.yaml", "x": 1}}


def test_run_stage_copies_the_template_and_waits(fake):
    fake["api"] = api = FakeApi({("rayjobs", "streamrec-train"): TEMPLATE},
                                [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                                 {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    name = pipeline.run_stage.python_func(stage="train", namespace="ns", run_id="0F3A-99c1-ffff", poll_s=0,
                                          artifact_dir="s3://b/a/run/ranker")
    assert name == "streamrec-train-0f3a99c1"
    body = api.created[0]
    assert body["spec"]["suspend"] is False and body["spec"]["x"] == 1
    assert body["spec"]["entrypoint"] == "python -m ray_jobs.train --config /p.yaml --artifact s3://b/a/run/ranker"
    assert body["metadata"]["labels"] == {"a": "b", "streamrec.io/run": "0f3a99c1"}
    assert TEMPLATE["spec"]["suspend"] is True  # the template itself is untouched


def test_failed_expectation_stops_the_pipeline(fake):
    ingest = {"metadata": {"name": "streamrec-ingest"}, "spec": {"suspend": True, "entrypoint": "python -m x"}}
    fake["api"] = FakeApi({("rayjobs", "streamrec-ingest"): ingest},
                          [{"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "exit 2"}])
    with pytest.raises(RuntimeError, match="Great Expectations"):
        pipeline.run_stage.python_func(stage="ingest", namespace="ns", run_id="r1", poll_s=0)
    fake["api"] = FakeApi({("rayjobs", "streamrec-ingest"): ingest}, [{"jobDeploymentStatus": "Running"}])
    with pytest.raises(TimeoutError):
        pipeline.run_stage.python_func(stage="ingest", namespace="ns", run_id="r1", poll_s=0, timeout_s=0)


def test_update_serving_points_deployments_at_new_artifacts(fake):
    serve = {"applications": [{"name": "streamrec", "deployments": [
        {"name": "Ranker", "user_config": {"artifact": "old", "micro_batch": 256}}, {"name": "Retriever"},
        {"name": "Ingress"}]}]}
    svc = {"metadata": {"name": "streamrec-serve"}, "spec": {"serveConfigV2": yaml.safe_dump(serve)}}
    ready = {"observedGeneration": 7, "conditions": [{"type": "Ready", "status": "True"}],
             "activeServiceStatus": {"applicationStatuses": {"streamrec": {"status": "RUNNING"}}}}
    fake["api"] = api = FakeApi({("rayservices", "streamrec-serve"): svc},
                                [{"observedGeneration": 6}, ready])
    pipeline.update_serving.python_func(namespace="ns", rayservice="streamrec-serve", ranker_artifact="s3://r",
                                        retriever_artifact="s3://q", poll_s=0)
    deployments = yaml.safe_load(api.patches[0]["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert deployments[0]["user_config"] == {"artifact": "s3://r", "micro_batch": 256}
    assert deployments[1]["user_config"] == {"artifact": "s3://q"}
    assert "user_config" not in deployments[2]
