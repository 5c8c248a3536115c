"""The Kubeflow pipeline (kfp v2) that chains the stages on a KubeRay cluster.

    python -m k8s.pipeline.pipeline                 # compile to k8s/pipeline/streamrec_pipeline.yaml
    python -m k8s.pipeline.pipeline --check         # exit 1 if the committed YAML is stale
    python -m k8s.pipeline.pipeline run-stage ingest --namespace streamrec-dev   # one stage, from a laptop

ingest -> features -> samples -> {train, train_retriever} -> update the RayService.

Each stage step copies the suspended RayJob template of its stage (k8s/base/rayjob-*.yaml, installed by
`kubectl apply -k k8s/overlays/<env>`) into an unsuspended RayJob of this run through the Kubernetes API,
then waits for it: KubeRay brings up a cluster, runs `python -m ray_jobs.<stage>`, and deletes the cluster.
A failed job fails its step, and Kubeflow runs nothing downstream of a failed step: in particular a
failed Great Expectations batch expectation (the ingest job exits 2) stops the pipeline before any
training. After training, the serving step points the Ranker and Retriever deployments of the
RayService's serveConfigV2 at the new artifacts; KubeRay applies that in place and Ray Serve reloads
the models through `reconfigure` while serving. The steps run as service account `streamrec-pipeline`
(k8s/base/rbac.yaml); components run in the project image, which holds the `kubernetes` client.
"""

# No `from __future__ import annotations`: kfp reads the component signatures as real types.
import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl

HERE = Path(__file__).resolve().parent
COMPILED = HERE / "streamrec_pipeline.yaml"
IMAGE = "registry.example.com/streamrec:0.1.0"
# Serve deployments whose `user_config.artifact` the serving step updates (serving/config.yaml).
SERVE_ARTIFACTS = {"ranker": "Ranker", "retriever": "Retriever"}


# The component functions are shipped to the cluster as source: each imports what it needs itself.
@dsl.component(base_image=IMAGE, install_kfp_package=False)
def artifact_paths(artifact_root: str, run_id: str) -> NamedTuple("Paths", ranker=str, retriever=str):
    """Where this run's training writes its model artifacts."""
    from collections import namedtuple

    root = artifact_root.rstrip("/")
    return namedtuple("Paths", ["ranker", "retriever"])(f"{root}/{run_id}/ranker", f"{root}/{run_id}/retriever")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def run_stage(stage: str, namespace: str, run_id: str, artifact_dir: str = "", timeout_s: int = 43200,
              poll_s: int = 15) -> str:
    """Run stage `stage` as a RayJob copied from its suspended template; return the RayJob's name."""
    import time

    from kubernetes import client, config

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
        spec["entrypoint"] = f"{spec['entrypoint']} --artifact {artifact_dir}"
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


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def update_serving(namespace: str, rayservice: str, ranker_artifact: str, retriever_artifact: str,
                   timeout_s: int = 1800, poll_s: int = 10) -> str:
    """Point the RayService's Ranker / Retriever at new artifacts; wait until it serves them."""
    import time

    import yaml
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    group, version, plural = "ray.io", "v1", "rayservices"
    obj = api.get_namespaced_custom_object(group, version, namespace, plural, rayservice)
    serve = yaml.safe_load(obj["spec"]["serveConfigV2"])
    wanted, found = {"Ranker": ranker_artifact, "Retriever": retriever_artifact}, set()
    for app in serve["applications"]:
        for deployment in app.get("deployments") or []:
            if deployment.get("name") in wanted:
                # Only user_config changes: Serve calls each replica's reconfigure, no replica restarts.
                deployment.setdefault("user_config", {})["artifact"] = wanted[deployment["name"]]
                found.add(deployment["name"])
    if found != set(wanted):
        raise RuntimeError(f"RayService {rayservice} has no deployments {sorted(set(wanted) - found)}")
    patched = api.patch_namespaced_custom_object(group, version, namespace, plural, rayservice,
                                                 {"spec": {"serveConfigV2": yaml.safe_dump(serve, sort_keys=False)}})
    generation = patched["metadata"].get("generation", 0)
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.get_namespaced_custom_object_status(group, version, namespace, plural, rayservice).get(
            "status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        apps = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).values()
        if status.get("observedGeneration", 0) >= generation and conditions.get("Ready") == "True" \
                and conditions.get("UpgradeInProgress") != "True" and all(a.get("status") == "RUNNING" for a in apps):
            print(f"RayService {namespace}/{rayservice} serves {wanted}")
            return rayservice
        if time.monotonic() > deadline:
            raise TimeoutError(f"RayService {namespace}/{rayservice} not ready after {timeout_s}s: {status}")
        time.sleep(poll_s)


@dsl.pipeline(name="streamrec", description="ingest -> features -> samples -> train -> serve, on KubeRay")
def streamrec_pipeline(namespace: str = "streamrec", rayservice: str = "streamrec-serve",
                       artifact_root: str = "s3://streamrec-lake-prod/artifacts", stage_timeout_s: int = 43200):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    paths = artifact_paths(artifact_root=artifact_root, run_id=run_id)
    ingest = run_stage(stage="ingest", namespace=namespace, run_id=run_id, timeout_s=stage_timeout_s)
    features = run_stage(stage="features", namespace=namespace, run_id=run_id,
                         timeout_s=stage_timeout_s).after(ingest)
    samples = run_stage(stage="samples", namespace=namespace, run_id=run_id,
                        timeout_s=stage_timeout_s).after(features)
    train = run_stage(stage="train", namespace=namespace, run_id=run_id, artifact_dir=paths.outputs["ranker"],
                      timeout_s=stage_timeout_s).after(samples)
    retriever = run_stage(stage="train_retriever", namespace=namespace, run_id=run_id,
                          artifact_dir=paths.outputs["retriever"], timeout_s=stage_timeout_s).after(samples)
    serve = update_serving(namespace=namespace, rayservice=rayservice, ranker_artifact=paths.outputs["ranker"],
                           retriever_artifact=paths.outputs["retriever"]).after(train, retriever)
    for task, label in [(paths, "artifact paths"), (ingest, "ingest (Great Expectations gate)"),
                        (features, "features"), (samples, "samples"), (train, "train ranker"),
                        (retriever, "train retriever"), (serve, "update RayService")]:
        task.set_display_name(label)
        task.set_caching_options(False)  # every run reads new data: a cached step would skip real work


def compile_to(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(streamrec_pipeline, package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--check", action="store_true", help="compare with the committed YAML, write nothing")
    one = sub.add_parser("run-stage", help="run one stage's RayJob now (kubeconfig credentials)")
    one.add_argument("stage")
    one.add_argument("--namespace", default="streamrec")
    one.add_argument("--run-id", default="manual")
    one.add_argument("--artifact-dir", default="")
    args = parser.parse_args(argv)
    if args.command == "run-stage":
        print(run_stage.python_func(stage=args.stage, namespace=args.namespace, run_id=args.run_id,
                                    artifact_dir=args.artifact_dir))
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
