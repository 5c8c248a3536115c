"""The Kubeflow pipeline (kfp v2) that chains the stages on a KubeRay cluster.

    python -m k8s.pipeline.pipeline                 # compile to k8s/pipeline/streamrec_pipeline.yaml
    python -m k8s.pipeline.pipeline --check         # exit 1 if the committed YAML is stale
    python -m k8s.pipeline.pipeline run-stage ingest --namespace streamrec-dev   # one stage, from a laptop
    python -m k8s.pipeline.pipeline run --host https://<kfp>/pipeline --namespace streamrec-dev
    python -m k8s.pipeline.pipeline schedule --host https://<kfp>/pipeline --cron "0 0 3 * * *"

ingest -> (new events?) -> features -> samples -> {train, train_retriever} -> update the RayService.

Each stage step copies the suspended RayJob template of its stage (k8s/base/rayjob-*.yaml, installed by
`kubectl apply -k k8s/overlays/<env>`) into an unsuspended RayJob of this run through the Kubernetes API,
then waits for it: KubeRay brings up a cluster, runs `python -m ray_jobs.<stage>`, and deletes the cluster.
A failed job fails its step, and Kubeflow runs nothing downstream of a failed step: in particular a
failed Great Expectations batch expectation (the ingest job exits 2) stops the pipeline before any
training. A batch with no new valid events stops it too (`dsl.If` on `ingested_events`): retraining and
redeploying on the same data would only burn a GPU and roll the models for nothing. After training, the
serving step points the Ranker and Retriever deployments of the RayService's serveConfigV2 at the new
artifacts; KubeRay applies that in place and Ray Serve reloads the models through `reconfigure`. RUNNING
does not prove the reload worked (a replica that cannot load an artifact keeps serving the old model), so
the step then polls the serving app's `/healthz` until it reports new model versions. When it names a
failed load of the new artifacts, or the new versions do not show in time, the step puts serveConfigV2 back
to what it was (so a replica started later loads the old artifacts, not the broken ones) and fails, saying
that the old model keeps serving.

Where things run (k8s/pipeline/README.md): the pipeline's pods run in the Kubeflow profile namespace
`streamrec-pipelines` (k8s/kubeflow/) as service account `streamrec-pipeline`; only the RayJob and
RayService pods run in the project namespace (Pod Security `restricted`). The steps only talk to the
Kubernetes API (and the serving step to the serve Service's `/healthz`, port 8000: the `serve-clients`
NetworkPolicy of k8s/base admits the profile namespace), so they run in CONTROL_IMAGE (k8s/pipeline/Dockerfile:
python + kfp + kubernetes), not in the multi-GB training image.
"""

# No `from __future__ import annotations`: kfp reads the component signatures as real types.
import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

HERE = Path(__file__).resolve().parent
COMPILED = HERE / "streamrec_pipeline.yaml"
# The image of every pipeline step, built from k8s/pipeline/Dockerfile (the kfp runtime, the kubernetes
# client and PyYAML from requirements.lock; ~150 MB instead of the training image's torch + Ray).
# Change it here, then recompile (`python -m k8s.pipeline.pipeline`).
CONTROL_IMAGE = "registry.example.com/streamrec-control:0.1.0"
# The numeric user of CONTROL_IMAGE (its Dockerfile's USER): the steps' securityContext names it.
CONTROL_UID = 65532
# The Kubeflow profile namespace the runs live in, and the service account they run as (k8s/kubeflow/).
PROFILE_NAMESPACE = "streamrec-pipelines"
SERVICE_ACCOUNT = "streamrec-pipeline"
EXPERIMENT = "streamrec"
# Every step only polls the API server (the serving step also /healthz, with urllib). The limit covers the
# python process (~85 MB RSS with kfp and the kubernetes client imported) plus KFP's launcher, which wraps
# the command in the same container.
STEP_RESOURCES = {"cpu_request": "100m", "cpu_limit": "500m", "memory_request": "256Mi", "memory_limit": "512Mi"}
# Serve deployments whose `user_config.artifact` the serving step updates (serving/config.yaml).
SERVE_ARTIFACTS = {"ranker": "Ranker", "retriever": "Retriever"}


# The component functions are shipped to the cluster as source: each imports what it needs itself, and
# cannot use this module's names (constants are repeated inside where needed). Each checks the parameters
# it uses against these forms first (a run's arguments are anyone's input): Kubernetes names are DNS labels,
# an artifact location is s3://<bucket>/<path> or a path of [A-Za-z0-9._/=-] not starting with '-' and
# without '..', so that no value can carry a shell word, an option, a query or a path outside what it names.
@dsl.component(base_image=CONTROL_IMAGE, install_kfp_package=False)
def artifact_paths(artifact_root: str, run_id: str) -> NamedTuple("Paths", ranker=str, retriever=str):
    """Where this run's training writes its model artifacts."""
    import re
    from collections import namedtuple

    location = re.compile(r"s3://[a-z0-9][a-z0-9.-]*(/[A-Za-z0-9._/=-]*)?|[A-Za-z0-9._/][A-Za-z0-9._/=-]*")
    if not location.fullmatch(artifact_root) or ".." in artifact_root:
        raise ValueError(f"artifact_root {artifact_root!r}: want s3://<bucket>/<path> or a path")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}", run_id):
        raise ValueError(f"run_id {run_id!r}: want letters, digits, '-' and '_' (a KFP run id)")
    root = artifact_root.rstrip("/")
    return namedtuple("Paths", ["ranker", "retriever"])(f"{root}/{run_id}/ranker", f"{root}/{run_id}/retriever")


@dsl.component(base_image=CONTROL_IMAGE, install_kfp_package=False)
def run_stage(stage: str, namespace: str, run_id: str, artifact_dir: str = "", timeout_s: int = 43200,
              poll_s: int = 15) -> str:
    """Run stage `stage` as a RayJob copied from its suspended template; return the RayJob's name."""
    import re
    import shlex
    import time

    from kubernetes import client, config

    stages = ("ingest", "features", "samples", "train", "train_retriever")
    if stage not in stages:
        raise ValueError(f"stage {stage!r}: not one of {', '.join(stages)}")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise ValueError(f"namespace {namespace!r}: not a Kubernetes namespace name")
    location = re.compile(r"s3://[a-z0-9][a-z0-9.-]*(/[A-Za-z0-9._/=-]*)?|[A-Za-z0-9._/][A-Za-z0-9._/=-]*")
    if artifact_dir and (not location.fullmatch(artifact_dir) or ".." in artifact_dir):
        raise ValueError(f"artifact_dir {artifact_dir!r}: want s3://<bucket>/<path> or a path")
    if timeout_s < 0 or poll_s < 0:
        raise ValueError(f"timeout_s {timeout_s} and poll_s {poll_s} must be >= 0")

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    group, version, plural = "ray.io", "v1", "rayjobs"
    template_name = "streamrec-" + stage.replace("_", "-")
    template = api.get_namespaced_custom_object(group, version, namespace, plural, template_name)
    suffix = "".join(ch for ch in run_id.lower() if ch.isalnum())[:8] or "manual"
    name = f"{template_name}-{suffix}"  # <= 47 characters, as KubeRay requires
    spec = dict(template["spec"], suspend=False)
    if artifact_dir:
        # The submitter runs the entrypoint through a shell: the value is one quoted word, whatever it holds.
        spec["entrypoint"] = f"{spec['entrypoint']} --artifact {shlex.quote(artifact_dir)}"
    labels = {k: v for k, v in (template["metadata"].get("labels") or {}).items() if k != "streamrec.io/template"}
    labels["streamrec.io/run"] = suffix
    body = {"apiVersion": f"{group}/{version}", "kind": "RayJob",
            "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, body)
    except client.ApiException as err:
        if err.status != 409:  # 409: a retried step finds the job it created before: wait for that one
            raise
    print(f"{stage}: RayJob {namespace}/{name} created")
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.get_namespaced_custom_object_status(group, version, namespace, plural, name).get("status") or {}
        deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
        if deployment == "Complete" and job == "SUCCEEDED":
            print(f"{stage}: succeeded")
            return name
        if deployment in ("Complete", "Failed") or job in ("FAILED", "STOPPED"):
            detail = f"jobStatus={job} deployment={deployment} reason={status.get('reason')} {status.get('message')}"
            if stage == "ingest":
                detail += (" (exit status 2 means a Great Expectations batch expectation failed and the batch was"
                           " quarantined: nothing downstream runs)")
            raise RuntimeError(f"stage {stage} failed: RayJob {namespace}/{name}: {detail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"stage {stage}: RayJob {namespace}/{name} not finished after {timeout_s}s")
        time.sleep(poll_s)


@dsl.component(base_image=CONTROL_IMAGE, install_kfp_package=False)
def ingested_events(namespace: str, rayjob: str, timeout_s: int = 300, poll_s: int = 5) -> int:
    """How many valid events the finished ingest RayJob `rayjob` committed, read from its own report.

    The contract with ray_jobs/ingest.py (print_report): the driver prints one line
    `ingest: N batches, F files, L lines -> V valid, Q quarantined`; V is returned. It reaches us through
    KubeRay's K8sJobMode: the submitter is a batch Job named after the RayJob whose container runs
    `ray job logs --follow`, so the driver's stdout is that pod's log (kuberay v1.7.0
    ray-operator/controllers/ray/common/job.go, rayjob_controller.go createNewK8sJob). The Job controller
    labels its pods `job-name=<job>`. The submitter Job lives as long as the RayJob (KubeRay deletes only
    the cluster after ttlSecondsAfterFinished), so the log is there when this step runs.
    """
    import re
    import time

    from kubernetes import client, config

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise ValueError(f"namespace {namespace!r}: not a Kubernetes namespace name")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", rayjob):  # it goes into a label selector
        raise ValueError(f"rayjob {rayjob!r}: not a RayJob name")
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    core = client.CoreV1Api()
    report = re.compile(r"^ingest: (\d+) batches, (\d+) files, (\d+) lines -> (\d+) valid, (\d+) quarantined",
                        re.MULTILINE)
    deadline = time.monotonic() + timeout_s
    while True:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={rayjob}").items
        # Newest first: a retried submitter pod replays the whole job log (`ray job logs` prints from the start).
        pods.sort(key=lambda p: str(p.metadata.creation_timestamp or ""), reverse=True)  # RFC 3339, one zone
        for pod in pods:
            log = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=pod.spec.containers[0].name)
            found = report.findall(log or "")
            if found:
                batches, files, lines, valid, quarantined = (int(x) for x in found[-1])
                print(f"ingest {namespace}/{rayjob}: {batches} batches, {files} files, {lines} lines -> "
                      f"{valid} valid, {quarantined} quarantined")
                if valid == 0:
                    print("no new valid events: nothing is trained or deployed in this run")
                return valid
        # The RayJob can be Complete a moment before the submitter has flushed the last lines: retry a while.
        if time.monotonic() > deadline:
            raise RuntimeError(f"no 'ingest: ... valid' report in the logs of the submitter pods of RayJob "
                               f"{namespace}/{rayjob} ({len(pods)} pods) after {timeout_s}s: cannot tell whether "
                               f"the batch had new events (see ray_jobs/ingest.py print_report)")
        time.sleep(poll_s)


@dsl.component(base_image=CONTROL_IMAGE, install_kfp_package=False)
def update_serving(namespace: str, rayservice: str, ranker_artifact: str, retriever_artifact: str,
                   healthz_url: str = "", timeout_s: int = 1800, poll_s: int = 10, confirm_reads: int = 3,
                   revert_timeout_s: int = 600) -> str:
    """Point the RayService's Ranker / Retriever at new artifacts; wait until /healthz says it serves them.

    The RayService's RUNNING is not enough: a replica whose `reconfigure` cannot load the new artifact keeps
    the model it has and only reports the error (serving/ranker.py, serving/retriever.py), so the service
    stays RUNNING with the old model. The serving app's `GET /healthz` reports the loaded
    `model_versions` and such errors in `problems` ("ranker: artifact failed to load (<error type>)",
    "retriever: artifact failed to load (...)"; serving/common.py LOAD_FAILED; no path: /healthz names no
    locations, the replica's log has the error). So: read the versions before
    the patch, patch, wait for the RayService as before, then poll /healthz until each model whose path
    changed serves a version other than the one before and no problem names a ranker/retriever artifact,
    `confirm_reads` times in a row (each /healthz asks one replica of each deployment: several reads sample
    several replicas). A failed load, once the RayService runs the patched config, is the new artifact's: it
    fails the step at once; so does the timeout
    (`timeout_s`, from the patch on, covers the RayService and the /healthz waits). The same check as
    serving/deploy.py wait_for_versions, which compares with the manifests' versions; this image (kfp,
    kubernetes, PyYAML) cannot read s3:// manifests, so the step compares with what was served before.
    HTTP with the standard library only.

    On either failure the step first rolls back, as ray_jobs/deploy.py does: left pointing at a broken
    artifact, serveConfigV2 would make every replica started later (autoscaling, a lost node, a NewCluster
    upgrade) fail to load it and serve nothing. So it patches serveConfigV2 back to the exact string it read
    before its own patch, but only while the object still holds what the step wrote (a compare-and-swap on
    metadata.resourceVersion: the API server refuses the patch with 409 if anything changed the object since
    the read; re-read and retried, since KubeRay's status writes change it too). If someone else changed
    serveConfigV2 meanwhile, their change stays and the message says so. Then it waits up to
    `revert_timeout_s` for the RayService to be Ready again and fails with the problem, what serves, and
    whether serveConfigV2 was restored.

    `healthz_url` defaults to the serve Service inside the cluster: KubeRay names it `<rayservice>-serve-svc`
    and gives it the head container's port named `serve`, 8000 here (kuberay v1.7.0 ray-operator/
    controllers/ray/utils/util.go GenerateServeServiceName, common/service.go BuildServeService; the
    RayService uses upgradeStrategy NewCluster, so the name does not depend on the cluster's).
    """
    import http.client
    import json
    import re
    import time
    import urllib.request

    import yaml
    from kubernetes import client, config

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise ValueError(f"namespace {namespace!r}: not a Kubernetes namespace name")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", rayservice):
        raise ValueError(f"rayservice {rayservice!r}: not a RayService name")
    location = re.compile(r"s3://[a-z0-9][a-z0-9.-]*(/[A-Za-z0-9._/=-]*)?|[A-Za-z0-9._/][A-Za-z0-9._/=-]*")
    for name, artifact in (("ranker_artifact", ranker_artifact), ("retriever_artifact", retriever_artifact)):
        if not location.fullmatch(artifact) or ".." in artifact:
            raise ValueError(f"{name} {artifact!r}: want s3://<bucket>/<path> or a path")
    if healthz_url and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?", healthz_url):
        raise ValueError(f"healthz_url {healthz_url!r}: want http(s)://<host>[:port]/<path>")
    if min(timeout_s, poll_s, revert_timeout_s) < 0 or confirm_reads < 1:
        raise ValueError("timeout_s, poll_s and revert_timeout_s must be >= 0, confirm_reads >= 1")

    url = healthz_url or f"http://{rayservice}-serve-svc.{namespace}.svc.cluster.local:8000/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a cluster Service: never via a proxy

    def health() -> dict:
        """/healthz's JSON; on any failure to get it, {"unreachable": why}."""
        try:
            with opener.open(url, timeout=10) as response:
                got = json.loads(response.read())
            return got if isinstance(got, dict) else {"unreachable": f"not a JSON object: {got!r:.200}"}
        except (OSError, http.client.HTTPException, ValueError) as err:  # HTTPError, URLError, timeouts are OSError
            return {"unreachable": f"{type(err).__name__}: {err}"}

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    group, version, plural = "ray.io", "v1", "rayservices"
    obj = api.get_namespaced_custom_object(group, version, namespace, plural, rayservice)
    serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
    models = {"Ranker": "ranker", "Retriever": "retriever"}  # deployment -> its key in /healthz
    new = {"ranker": ranker_artifact, "retriever": retriever_artifact}
    old_paths, found = {}, set()
    for app in serve["applications"]:
        for deployment in app.get("deployments") or []:
            model = models.get(deployment.get("name"))
            if model:
                # Only user_config changes: Serve calls each replica's reconfigure, no replica restarts.
                user_config = deployment.setdefault("user_config", {})
                old_paths[model] = user_config.get("artifact")
                user_config["artifact"] = new[model]
                found.add(deployment["name"])
    if found != set(models):
        raise RuntimeError(f"RayService {rayservice} has no deployments {sorted(set(models) - found)}")

    # What is served before the patch. Unreachable (no serving yet, or a broken one) leaves it unknown: any
    # loaded version then counts as new, which cannot tell an old model from a new one, hence the warning.
    before = {}
    for attempt in range(3):
        seen = health()
        if "unreachable" not in seen:
            before = {m: (seen.get("model_versions") or {}).get(m) for m in new}
            break
        if attempt < 2:
            time.sleep(poll_s)
    else:
        print(f"WARNING: /healthz at {url} unreachable before the patch ({seen['unreachable']}): the old model "
              f"versions are unknown, so any version /healthz reports with no artifact problem is accepted")
    print(f"before the patch: {namespace}/{rayservice} serves {before or 'unknown versions'} from {old_paths}")

    def ready(generation: int) -> tuple[bool, dict]:
        """Whether the RayService has applied `generation` and is Ready with every application RUNNING."""
        status = api.get_namespaced_custom_object_status(group, version, namespace, plural, rayservice).get(
            "status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).values()
        return (status.get("observedGeneration", 0) >= generation and conditions.get("Ready") == "True"
                and conditions.get("UpgradeInProgress") != "True"
                and all(a.get("status") == "RUNNING" for a in apps)), status

    original = obj["spec"]["serveConfigV2"]  # put back verbatim on failure
    written = yaml.safe_dump(serve, sort_keys=False)

    def revert() -> str:
        """Patch serveConfigV2 back to `original` if it still holds `written`, then wait (bounded) for Ready.
        Says what happened, for the failure message; never raises (the step fails with its own error)."""
        where = f"serveConfigV2 of {namespace}/{rayservice}"
        if written == original:
            return f"{where} is as it was before this step (its patch changed nothing)"
        try:
            for attempt in range(5):
                current = api.get_namespaced_custom_object(group, version, namespace, plural, rayservice)
                if current["spec"].get("serveConfigV2") != written:
                    return (f"{where} was NOT restored: someone else changed it after this step's patch, so it is "
                            f"left as they set it; check which artifacts it names (before this step: {old_paths})")
                # resourceVersion makes the patch conditional: 409 if the object changed since this read.
                body = {"metadata": {"resourceVersion": (current.get("metadata") or {}).get("resourceVersion")},
                        "spec": {"serveConfigV2": original}}
                try:
                    patched = api.patch_namespaced_custom_object(group, version, namespace, plural, rayservice, body)
                    break
                except client.ApiException as err:
                    if err.status != 409 or attempt == 4:
                        raise
                    print(f"rollback: {namespace}/{rayservice} changed since it was read (409 Conflict); reading again")
        except Exception as err:  # any failure here must not hide the step's own error
            return (f"{where} could NOT be restored ({type(err).__name__}: {str(err).strip()[:300]}): it still names "
                    f"the new artifacts, which a new replica would fail to load; patch the deployments back to "
                    f"{old_paths}")
        print(f"rollback: {where} restored to the artifacts served before this step: {old_paths}")
        generation = patched["metadata"].get("generation", 0)
        until, status = time.monotonic() + revert_timeout_s, {}
        try:
            while True:
                done, status = ready(generation)
                if done:
                    return (f"{where} was restored to the artifacts served before ({old_paths}) and the RayService "
                            f"is Ready again")
                if time.monotonic() > until:
                    break
                time.sleep(poll_s)
        except Exception as err:
            status = {"error": f"{type(err).__name__}: {err}"}
        return (f"{where} was restored to the artifacts served before ({old_paths}), but the RayService was not "
                f"seen Ready within {revert_timeout_s}s after that: {status}")

    deadline = time.monotonic() + timeout_s
    patched = api.patch_namespaced_custom_object(group, version, namespace, plural, rayservice,
                                                 {"spec": {"serveConfigV2": written}})
    generation = patched["metadata"].get("generation", 0)
    while True:
        done, status = ready(generation)
        if done:
            print(f"RayService {namespace}/{rayservice} is RUNNING; checking what {url} serves")
            break
        if time.monotonic() > deadline:
            reverted = revert()
            raise TimeoutError(f"RayService {namespace}/{rayservice} not ready after {timeout_s}s: {status}. The "
                               f"old model keeps serving (a replica keeps what it has until a new load succeeds). "
                               f"Rollback: {reverted}.")
        time.sleep(poll_s)

    # A model whose artifact path changed must serve a version other than the one before. One whose path did
    # not change (a re-run that deploys the very same artifacts: the patch changes nothing and no replica
    # reloads) keeps its version by design, so the version before is accepted for it, and only then: the
    # path is unchanged and /healthz names no artifact problem (a model that never loaded names one, or
    # reports no version). A new artifact holding the very model that serves (a copy under a new path) keeps
    # its version too and ends in the timeout: deploy it under its old path instead.
    changed = {m: new[m] != old_paths.get(m) for m in new}

    def failed_load(problem: str) -> bool:
        """The replicas' own words (serving.common.load_failed), after the model's name."""
        return any(problem.startswith(f"{m}: artifact failed to load") for m in new)
    good, last = 0, {}
    while True:
        last = health()
        versions = last.get("model_versions") or {}
        problems = [str(p) for p in last.get("problems") or []]
        failed = [p for p in problems if failed_load(p)]
        if failed:
            reverted = revert()
            raise RuntimeError(
                f"deploy failed: {'; '.join(failed)}. The old model is still serving: the replicas keep what they "
                f"had loaded, and /healthz at {url} reported model versions {versions} (before this step: "
                f"{before or 'unknown'}) although the RayService was RUNNING. Rollback: {reverted}. Fix the "
                f"artifact and re-run.")
        artifact_problems = [p for p in problems if any(f"{m} artifact" in p for m in new)]
        served = all(versions.get(m) and (not changed[m] or versions.get(m) != before.get(m)) for m in new)
        good = good + 1 if "unreachable" not in last and served and not artifact_problems else 0
        if good >= confirm_reads:
            print(f"RayService {namespace}/{rayservice} serves {versions} from {new} (before: {before})")
            return rayservice
        if time.monotonic() > deadline:
            reverted = revert()
            raise TimeoutError(
                f"/healthz at {url} did not report the new models within {timeout_s}s: wanted a version other "
                f"than {before} for each of {[m for m in new if changed[m]]} and no artifact problem; last "
                f"answer {last}. The old model keeps serving (replicas that had loaded a new one go back to the "
                f"old artifacts). Rollback: {reverted}.")
        # Confirming reads follow quickly; waiting for a change polls every poll_s.
        time.sleep(max(0.0, min(min(1.0, poll_s) if good else poll_s, deadline - time.monotonic())))


def _harden(task: dsl.PipelineTask, label: str) -> dsl.PipelineTask:
    """Name, size and lock down one step; the same for every step."""
    task.set_display_name(label)
    task.set_caching_options(False)  # every run reads new data: a cached step would skip real work
    task.set_cpu_request(STEP_RESOURCES["cpu_request"]).set_cpu_limit(STEP_RESOURCES["cpu_limit"])
    task.set_memory_request(STEP_RESOURCES["memory_request"]).set_memory_limit(STEP_RESOURCES["memory_limit"])
    # The step container's securityContext, through the Kubernetes platform spec that kfp-kubernetes'
    # set_security_context writes (kfp-kubernetes is not in requirements.lock, so the same field is set
    # here with the plain SDK's platform_config). KFP's driver (backend >= 2.16) applies it to the user
    # container and always drops all capabilities; its compiler already sets allowPrivilegeEscalation:
    # false and seccomp RuntimeDefault (kubeflow/pipelines 2.17.0: kubernetes_platform/proto/
    # kubernetes_executor_config.proto SecurityContext, backend/src/v2/driver/k8s.go,
    # backend/src/v2/compiler/argocompiler/security_context.go). runAsNonRoot is the one field it leaves
    # to us, and the one the restricted profile still needs.
    # int64 fields as strings: the proto3 JSON form kfp-kubernetes writes (json_format.MessageToDict).
    task.platform_config["kubernetes"] = {
        "securityContext": {"runAsUser": str(CONTROL_UID), "runAsGroup": str(CONTROL_UID), "runAsNonRoot": True}}
    return task


@dsl.pipeline(name="streamrec", description="ingest -> features -> samples -> train -> serve, on KubeRay")
def streamrec_pipeline(namespace: str = "streamrec", rayservice: str = "streamrec-serve",
                       artifact_root: str = "s3://streamrec-lake-prod/artifacts", stage_timeout_s: int = 43200,
                       serve_healthz_url: str = ""):
    # serve_healthz_url: empty = the RayService's serve Service in the cluster
    # (http://<rayservice>-serve-svc.<namespace>.svc.cluster.local:8000/healthz); set it to check elsewhere.
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    ingest = _harden(run_stage(stage="ingest", namespace=namespace, run_id=run_id, timeout_s=stage_timeout_s),
                     "ingest (Great Expectations gate)")
    new = _harden(ingested_events(namespace=namespace, rayjob=ingest.output), "new events?")
    # Everything after ingestion only when it committed new valid events. An empty batch (nothing landed,
    # or every line quarantined) would retrain on exactly the data of the last run and redeploy an
    # equivalent model: the run stops here and succeeds.
    with dsl.If(new.output > 0, name="new-events"):
        paths = _harden(artifact_paths(artifact_root=artifact_root, run_id=run_id), "artifact paths")
        features = _harden(run_stage(stage="features", namespace=namespace, run_id=run_id,
                                     timeout_s=stage_timeout_s), "features")
        samples = _harden(run_stage(stage="samples", namespace=namespace, run_id=run_id,
                                    timeout_s=stage_timeout_s).after(features), "samples")
        train = _harden(run_stage(stage="train", namespace=namespace, run_id=run_id,
                                  artifact_dir=paths.outputs["ranker"], timeout_s=stage_timeout_s).after(samples),
                        "train ranker")
        retriever = _harden(run_stage(stage="train_retriever", namespace=namespace, run_id=run_id,
                                      artifact_dir=paths.outputs["retriever"],
                                      timeout_s=stage_timeout_s).after(samples), "train retriever")
        _harden(update_serving(namespace=namespace, rayservice=rayservice, ranker_artifact=paths.outputs["ranker"],
                               retriever_artifact=paths.outputs["retriever"],
                               healthz_url=serve_healthz_url).after(train, retriever),
                "update RayService (checks /healthz)")


def compile_to(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(streamrec_pipeline, package_path=str(path))
    return path


def validate_cron(cron: str) -> str:
    """KFP's scheduler parses cron with robfig/cron v1 `cron.Parse` (backend/src/crd/controller/
    scheduledworkflow/util/cron_schedule.go): SIX fields, seconds first, or a descriptor such as
    `@daily` / `@every 6h`. A five-field crontab line is still accepted there but shifted by one field
    ("0 3 * * *" means minute 3 of every hour), so it is refused here."""
    fields = cron.split()
    if cron.strip().startswith("@") or len(fields) == 6:
        return " ".join(fields)
    raise ValueError(f"cron {cron!r}: KFP wants 6 fields, seconds first (e.g. '0 0 3 * * *' = daily 03:00:00 UTC)"
                     " or a descriptor like '@daily'")


def run_arguments(namespace: str, artifact_root: str | None = None, rayservice: str | None = None) -> dict:
    """Pipeline parameters of a run against project namespace `namespace` (defaults: the pipeline's)."""
    args = {"namespace": namespace}
    if artifact_root:
        args["artifact_root"] = artifact_root
    if rayservice:
        args["rayservice"] = rayservice
    return args


def recurring_run_args(experiment_id: str, cron: str, params: dict, *, job_name: str = "streamrec-scheduled",
                       package_path: Path = COMPILED, version_id: str | None = None) -> dict:
    """Keyword arguments for kfp.Client.create_recurring_run (kfp 2.17.0 client.py)."""
    source = {"version_id": version_id} if version_id else {"pipeline_package_path": str(package_path)}
    return dict(
        experiment_id=experiment_id,  # the experiment fixes the namespace: the profile's
        job_name=job_name,
        description="ingest -> features -> samples -> train -> serve (k8s/pipeline)",
        cron_expression=validate_cron(cron),
        # One run at a time: two overlapping runs would ingest the same landing files and race each other
        # on the RayService patch.
        max_concurrency=1,
        # After a pause, run once rather than once per missed slot: every run ingests all that is new.
        no_catchup=True,
        params=params,
        service_account=SERVICE_ACCOUNT,
        enable_caching=False,
        enabled=True,
        **source,
    )


def _client(host: str | None):
    """A kfp.Client for the KFP API: host from --host or KF_PIPELINES_ENDPOINT; a bearer token from
    KFP_TOKEN when set (multi-user KFP behind the Kubeflow gateway wants one), else kfp's own lookup
    (in a pod: the projected token at KF_PIPELINES_SA_TOKEN_PATH)."""
    import kfp

    return kfp.Client(host=host, namespace=PROFILE_NAMESPACE, existing_token=os.environ.get("KFP_TOKEN") or None)


def start_run(client, namespace: str, *, profile_namespace: str = PROFILE_NAMESPACE, **arguments):
    return client.create_run_from_pipeline_package(
        str(COMPILED), arguments=run_arguments(namespace, **arguments), experiment_name=EXPERIMENT,
        namespace=profile_namespace, service_account=SERVICE_ACCOUNT, enable_caching=False)


def schedule(client, namespace: str, cron: str, *, profile_namespace: str = PROFILE_NAMESPACE,
             job_name: str = "streamrec-scheduled", version_id: str | None = None, **arguments):
    experiment = client.create_experiment(EXPERIMENT, namespace=profile_namespace)  # returns it if it exists
    return client.create_recurring_run(**recurring_run_args(
        experiment.experiment_id, cron, run_arguments(namespace, **arguments), job_name=job_name,
        version_id=version_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--check", action="store_true", help="compare with the committed YAML, write nothing")
    one = sub.add_parser("run-stage", help="run one stage's RayJob now (kubeconfig credentials)")
    one.add_argument("stage")
    one.add_argument("--namespace", default="streamrec")
    one.add_argument("--run-id", default="manual")
    one.add_argument("--artifact-dir", default="")
    for name, text in [("run", "start one run in the profile namespace"),
                       ("schedule", "create a recurring run in the profile namespace")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--host", default=None, help="KFP API, e.g. https://<kubeflow>/pipeline")
        cmd.add_argument("--namespace", default="streamrec", help="the project namespace the stages run in")
        cmd.add_argument("--artifact-root", default=None)
        cmd.add_argument("--rayservice", default=None)
        if name == "schedule":
            cmd.add_argument("--cron", required=True, help="6 fields, seconds first: '0 0 3 * * *' = daily 03:00")
            cmd.add_argument("--job-name", default="streamrec-scheduled")
            cmd.add_argument("--version-id", default=None, help="an uploaded pipeline version instead of the YAML")
    args = parser.parse_args(argv)
    if args.command == "run-stage":
        print(run_stage.python_func(stage=args.stage, namespace=args.namespace, run_id=args.run_id,
                                    artifact_dir=args.artifact_dir))
        return 0
    if args.command in ("run", "schedule"):
        extra = {"artifact_root": args.artifact_root, "rayservice": args.rayservice}
        if args.command == "run":
            print(start_run(_client(args.host), args.namespace, **extra))
        else:
            print(schedule(_client(args.host), args.namespace, args.cron, job_name=args.job_name,
                           version_id=args.version_id, **extra))
        return 0
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            fresh = compile_to(Path(tmp) / "pipeline.yaml").read_text()
        if not COMPILED.exists() or COMPILED.read_text() != fresh:
            print(f"{COMPILED} is stale: run python -m k8s.pipeline.pipeline", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {compile_to()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
