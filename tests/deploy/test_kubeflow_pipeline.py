"""The whole compiled pipeline, run by kfp.local (SubprocessRunner: each step in its own python process,
the way KFP's launcher runs it) against a fake Kubernetes API server on 127.0.0.1 that serves the real
rendered templates and enforces the project namespace's Role `streamrec-pipeline` the way RBAC does.

What stands in for a cluster: KubeRay (each created RayJob finishes at once), the API server's optimistic
concurrency (metadata.resourceVersion: a patch naming another version gets 409), the submitter pod of the
ingest RayJob (its log carries ray_jobs.ingest's report line), the RayService's status, and the serving
app's `GET /healthz` (FakeServe, on another loopback port: the step's `healthz_url` points at it instead
of the serve Service). What is real: the pipeline's DAG and `dsl.If`, the components' code, the kubernetes
client's and urllib's HTTP calls, the rendered RayJob templates and RayService, and the Role."""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from k8s.pipeline import pipeline
from tests.deploy.conftest import find, rendered

pytestmark = [pytest.mark.timeout(600),
              # kfp.local notes that resources / the image do not apply to a local subprocess: known.
              pytest.mark.filterwarnings("ignore::UserWarning:kfp.local", "ignore::RuntimeWarning:kfp.local")]
NAMESPACE = "streamrec-dev"


def allowed(rules: list[dict], group: str, resource: str, verb: str, name: str = "") -> bool:
    """Kubernetes RBAC's PolicyRule match (rbac.authorization.k8s.io/v1): the API group, the resource
    (`pods/log` for a subresource), the verb, and resourceNames when set (they never match a request
    without a name: list, create)."""
    for rule in rules:
        if not ({group, "*"} & set(rule.get("apiGroups", [])) and {resource, "*"} & set(rule.get("resources", []))
                and {verb, "*"} & set(rule.get("verbs", []))):
            continue
        if not rule.get("resourceNames") or (name and name in rule["resourceNames"]):
            return True
    return False


def health(ranker: str | None, retriever: str | None, *problems: str) -> dict:
    """A /healthz answer as serving/app.py builds it (Health: status, model_versions, problems)."""
    return {"status": "degraded" if problems else "ok", "model_versions": {"ranker": ranker, "retriever": retriever},
            "problems": list(problems)}


class FakeServe(ThreadingHTTPServer):
    """The serving app's `GET /healthz` on a free loopback port; `answer(n)` gives the n-th reply (from 0).
    `reads` keeps every reply sent; `patched_at` (set by the test) tells reads before / after the patch."""

    daemon_threads = True

    def __init__(self, answer):
        super().__init__(("127.0.0.1", 0), ServeHandler)
        self.answer, self.reads = answer, []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/healthz"

    def start(self) -> FakeServe:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class ServeHandler(BaseHTTPRequestHandler):
    server: FakeServe

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/healthz":
            self.send_error(404)
            return
        body = self.server.answer(len(self.server.reads))
        self.server.reads.append(body)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeKube(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, docs: list[dict], valid_events: int):
        super().__init__(("127.0.0.1", 0), Handler)
        self.rules = find(docs, "Role", "streamrec-pipeline")[0]["rules"]
        self.objects = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("RayJob", "RayService")}
        for obj in self.objects.values():
            obj["metadata"]["resourceVersion"] = "1"
        # serveConfigV2 as rendered, before any patch: what a rollback must put back, byte for byte.
        self.original = {name: obj["spec"]["serveConfigV2"] for (kind, name), obj in self.objects.items()
                         if kind == "RayService"}
        self.valid_events = valid_events
        self.calls, self.denied, self.created, self.patches = [], [], [], []
        self.serve: FakeServe | None = None  # the serving app, when the test starts one
        self.reads_before_patch: int | None = None

    def edit(self, name: str, spec: dict) -> None:
        """Change the RayService's spec as an accepted write does: a new generation and resourceVersion."""
        meta = self.objects[("RayService", name)]["metadata"]
        self.objects[("RayService", name)]["spec"].update(spec)
        meta["generation"] = meta.get("generation", 1) + 1
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    def served_after_patch(self) -> list[dict]:
        """/healthz replies sent after the step's (first) patch."""
        return self.serve.reads[self.reads_before_patch:] if self.patches else []

    def new_artifacts(self) -> dict[str, str]:
        """The Ranker / Retriever artifacts the step's patch (the first) set, by /healthz's model names."""
        serve = yaml.safe_load(self.patches[0]["spec"]["serveConfigV2"])
        return {d["name"].lower(): d["user_config"]["artifact"] for app in serve["applications"]
                for d in app.get("deployments", []) if d["name"] in ("Ranker", "Retriever")}


class Handler(BaseHTTPRequestHandler):
    server: FakeKube

    def log_message(self, *args):  # keep pytest's output for the pipeline's own logs
        pass

    def _send(self, code: int, body, content_type: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str):
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        # /apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>[/<sub>]] or /api/v1/namespaces/<ns>/...
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        namespace, plural, name, sub = rest[1], rest[2], (rest[3:4] or [""])[0], (rest[4:5] or [""])[0]
        verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch"}[method]
        resource = f"{plural}/{sub}" if sub else plural
        self.server.calls.append((group, resource, verb))
        if namespace != NAMESPACE or not allowed(self.server.rules, group, resource, verb, name):
            self.server.denied.append((group, resource, verb, name))
            return self._send(403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                                    "message": f"{resource} {verb} forbidden"})
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        return self._serve(plural, name, sub, verb, query, body)

    def _serve(self, plural, name, sub, verb, query, body):
        kube = self.server
        kind = {"rayjobs": "RayJob", "rayservices": "RayService"}.get(plural)
        if plural == "rayjobs" and verb == "create":
            kube.created.append(body)
            kube.objects[("RayJob", body["metadata"]["name"])] = body
            return self._send(201, body)
        if kind and verb == "get":
            obj = kube.objects.get((kind, name))
            if obj is None:
                return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            if sub == "status":  # KubeRay, done: every job succeeds, the service serves what it was given
                status = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"} if kind == "RayJob" else {
                    "observedGeneration": obj["metadata"].get("generation", 1),
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "activeServiceStatus": {"applicationStatuses": {"streamrec": {"status": "RUNNING"}}}}
                return self._send(200, dict(obj, status=status))
            return self._send(200, obj)
        if kind == "RayService" and verb == "patch":  # a JSON merge patch of spec
            obj = kube.objects[(kind, name)]
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:  # a precondition that fails
                return self._send(409, {"kind": "Status", "status": "Failure", "reason": "Conflict", "code": 409,
                                        "message": "the object has been modified"})
            kube.patches.append(body)
            if kube.reads_before_patch is None:
                kube.reads_before_patch = len(kube.serve.reads) if kube.serve else None
            kube.edit(name, body["spec"])
            return self._send(200, obj)
        if plural == "pods" and verb == "list":  # the Job controller's label on the submitter Job's pods
            job = query["labelSelector"].removeprefix("job-name=")
            return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                {"metadata": {"name": f"{job}-x7k2p", "namespace": NAMESPACE, "labels": {"job-name": job},
                              "creationTimestamp": "2026-01-01T00:00:00Z"},
                 "spec": {"containers": [{"name": "ray-job-submitter", "image": "streamrec"}]},
                 "status": {"phase": "Succeeded"}}] if ("RayJob", job) in kube.objects else []})
        if plural == "pods" and sub == "log":
            valid = kube.valid_events
            return self._send(200, f"Tailing logs until the job exits\ningest: {1 if valid else 0} batches, "
                                   f"{1 if valid else 0} files, {valid} lines -> {valid} valid, 0 quarantined\n",
                              "text/plain")
        return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        self._route("POST")

    def do_PATCH(self):
        self._route("PATCH")


OLD = {"ranker": "ranker-20260101T000000Z-0a0a0a0a", "retriever": "hstu-20260101T000000Z-0b0b0b0b"}


def rolls_forward(kube: FakeKube, stale: int = 0):
    """/healthz of a serving app that loads what it is given: the old versions until the patch, then (after
    `stale` more reads, replicas still reconfiguring) a version named after each new artifact."""
    def answer(n: int) -> dict:
        after = n - kube.reads_before_patch if kube.patches else -1
        if after < 0 or after < stale:
            return health(OLD["ranker"], OLD["retriever"])
        run = {model: path.rsplit("/", 2)[-2] for model, path in kube.new_artifacts().items()}
        return health(f"v-{run['ranker']}-ranker", f"v-{run['retriever']}-retriever")
    return answer


@pytest.fixture()
def cluster(monkeypatch, tmp_path):
    """start(valid_events, answer=rolls_forward) -> the fake API server, with a FakeServe (answer(kube))
    as `.serve`; KUBECONFIG points at the API server and kfp.local is initialised, so the test runs the
    pipeline or a single component next."""
    from kfp import local

    servers = []

    def start(valid_events: int = 42, answer=rolls_forward) -> FakeKube:
        server = FakeKube(rendered(f"k8s/overlays/{NAMESPACE.removeprefix('streamrec-')}"), valid_events)
        server.serve = FakeServe(answer(server)).start()
        servers.extend([server, server.serve])
        threading.Thread(target=server.serve_forever, daemon=True).start()
        config = tmp_path / f"kubeconfig-{len(servers)}"
        config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "pipeline", "user": {"token": "test"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "pipeline"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(config))  # the step processes inherit it
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # so load_incluster_config gives up
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   raise_on_error=True)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def kube(cluster):
    """Run the whole pipeline against the fakes for `valid_events`; the serving app rolls forward."""
    def run(valid_events: int) -> FakeKube:
        server = cluster(valid_events)
        pipeline.streamrec_pipeline(namespace=NAMESPACE, artifact_root="s3://lake/artifacts",
                                    serve_healthz_url=server.serve.url)
        return server

    return run


def test_new_events_run_every_stage_and_deploy_within_the_role(kube):
    """With new valid events the run creates all five RayJobs from their templates and points the
    RayService at this run's artifacts; every call it makes is allowed by the Role, and the Role allows
    nothing the run does not call (least privilege: RBAC is additive, so any extra rule is unused power)."""
    server = kube(valid_events=42)
    assert server.denied == []
    stages = [job["metadata"]["labels"]["streamrec.io/stage"] for job in server.created]
    assert stages[:3] == ["ingest", "features", "samples"] and sorted(stages[3:]) == ["train", "train_retriever"]
    assert all(job["spec"]["suspend"] is False for job in server.created)
    artifact = {j["metadata"]["labels"]["streamrec.io/stage"]: j["spec"]["entrypoint"].partition(" --artifact ")[2]
                for j in server.created}
    run_dir = artifact["train"].removesuffix("/ranker")
    assert run_dir.startswith("s3://lake/artifacts/") and artifact["train_retriever"] == f"{run_dir}/retriever"
    serve = yaml.safe_load(server.patches[0]["spec"]["serveConfigV2"])
    artifacts = {d["name"]: d["user_config"]["artifact"] for app in serve["applications"]
                 for d in app.get("deployments", []) if d["name"] in ("Ranker", "Retriever")}
    assert artifacts == {"Ranker": artifact["train"], "Retriever": artifact["train_retriever"]}
    # The step read /healthz before the patch (the old versions) and after it until the new ones showed.
    assert server.reads_before_patch >= 1
    assert server.serve.reads[0]["model_versions"] == OLD
    assert server.served_after_patch()[-1]["model_versions"] == {
        "ranker": f"v-{run_dir.rsplit('/', 1)[-1]}-ranker", "retriever": f"v-{run_dir.rsplit('/', 1)[-1]}-retriever"}
    granted = {(g, r, v) for rule in server.rules for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert granted == set(server.calls)


def test_an_empty_batch_runs_nothing_after_ingest(kube):
    """`ingest: 0 batches, 0 files, 0 lines -> 0 valid, 0 quarantined`: the `dsl.If` group is skipped,
    so no features / samples / training RayJob is created and the RayService is left alone; the run
    itself succeeds (kfp.local raises on a failed task)."""
    server = kube(valid_events=0)
    assert server.denied == []
    assert [job["metadata"]["labels"]["streamrec.io/stage"] for job in server.created] == ["ingest"]
    assert server.patches == [] and server.serve.reads == []


# --- the serving step against /healthz ----------------------------------------------------------------
# Run as a single component by kfp.local (its own python process, as in a run), against the fake API server
# and a FakeServe that plays what Ray Serve does on a user_config change: each replica's `reconfigure` loads
# the new artifact, or keeps the model it has and reports the error (serving/ranker.py, serving/retriever.py),
# while the RayService stays RUNNING either way.

NEW = {"ranker": "s3://lake/artifacts/run2/ranker", "retriever": "s3://lake/artifacts/run2/retriever"}


def _update(server: FakeKube, artifacts: dict[str, str] = NEW, **options):
    return pipeline.update_serving(namespace=NAMESPACE, rayservice="streamrec-serve",
                                   ranker_artifact=artifacts["ranker"], retriever_artifact=artifacts["retriever"],
                                   healthz_url=server.serve.url, **options)


def test_serving_step_waits_until_healthz_reports_the_new_versions(cluster):
    """(a) After the patch the RayService is RUNNING at once, but /healthz still reports the old versions
    (replicas reconfiguring), then the new versions with an artifact problem left on one replica (not a
    failed load: not a failure, not yet a success), then the new versions cleanly: the step
    succeeds only after `confirm_reads` clean reads in a row."""
    def answer(kube):
        def reply(n):
            after = n - kube.reads_before_patch if kube.patches else -1
            if after < 0 or after == 0:
                return health(OLD["ranker"], OLD["retriever"])
            if after == 1:
                return health("ranker-new", "retriever-new", "ranker: no ranker artifact configured")
            return health("ranker-new", "retriever-new")
        return reply

    server = cluster(answer=answer)
    task = _update(server, poll_s=0, timeout_s=60)
    assert task.output == "streamrec-serve"
    assert server.reads_before_patch == 1 and server.new_artifacts() == NEW
    assert [r["model_versions"]["ranker"] for r in server.served_after_patch()] == [OLD["ranker"]] + ["ranker-new"] * 4


def assert_rolled_back(server: FakeKube, out: str) -> None:
    """The step sent exactly one more patch after its own: the rendered serveConfigV2, byte for byte, made
    conditional on the resourceVersion its own patch left (nothing else wrote in between); the API server
    holds it again; the step then read the RayService's status (waited for Ready); its message says so."""
    original = server.original["streamrec-serve"]
    assert len(server.patches) == 2 and server.patches[0]["spec"]["serveConfigV2"] != original
    assert server.patches[1] == {"metadata": {"resourceVersion": "2"}, "spec": {"serveConfigV2": original}}
    assert server.objects[("RayService", "streamrec-serve")]["spec"]["serveConfigV2"] == original
    last_patch = max(i for i, call in enumerate(server.calls) if call == ("ray.io", "rayservices", "patch"))
    assert ("ray.io", "rayservices/status", "get") in server.calls[last_patch + 1:]
    assert "serveConfigV2 of streamrec-dev/streamrec-serve was restored to the artifacts served before" in out
    assert "the RayService is Ready again" in out
    assert server.denied == []  # the rollback needs no permission beyond the roll forward's


def test_a_failed_load_fails_the_step_at_once_and_rolls_serve_config_back(cluster, capsys):
    """(b) The replicas cannot load the new ranker artifact: /healthz keeps the old versions and names the
    failed load in `problems`. The step fails on that first read, with the replica's message, says that
    the old model is still serving (the RayService itself is RUNNING), and first puts serveConfigV2 back to
    what it was, so that a replica started later loads the old artifacts, not the broken one."""
    problem = "ranker: artifact failed to load (FileNotFoundError)"

    def answer(kube):
        return lambda n: health(OLD["ranker"], OLD["retriever"], *([problem] if kube.patches else []))

    server = cluster(answer=answer)
    with pytest.raises(RuntimeError, match="finished with status"):
        _update(server, poll_s=0, timeout_s=60)
    out = capsys.readouterr().out
    assert f"deploy failed: {problem}" in out and "The old model is still serving" in out
    assert str(OLD) in out  # the versions still served
    assert len(server.served_after_patch()) == 1
    assert_rolled_back(server, out)


def test_a_serve_config_someone_else_changed_meanwhile_is_left_alone(cluster, capsys):
    """(d) While the step waits, someone edits serveConfigV2 themselves (a hot-fix artifact for the ranker),
    then /healthz names a failed load of the ranker. The step still fails as in (b), but sends no rollback:
    the object no longer holds what the step wrote, so putting the old string back would undo their change.
    The message says serveConfigV2 was not restored and why."""
    problem = "ranker: artifact failed to load (FileNotFoundError)"
    theirs = {}

    def answer(kube):
        def reply(n):
            if not kube.patches:
                return health(OLD["ranker"], OLD["retriever"])
            if not theirs:  # the human's edit lands before the step's first read after its patch
                theirs["config"] = kube.patches[0]["spec"]["serveConfigV2"].replace(
                    NEW["ranker"], "s3://lake/artifacts/hotfix/ranker")
                kube.edit("streamrec-serve", {"serveConfigV2": theirs["config"]})
            return health(OLD["ranker"], OLD["retriever"], problem)
        return reply

    server = cluster(answer=answer)
    with pytest.raises(RuntimeError, match="finished with status"):
        _update(server, poll_s=0, timeout_s=60)
    out = capsys.readouterr().out
    assert f"deploy failed: {problem}" in out and "The old model is still serving" in out
    assert len(server.patches) == 1  # the step's own patch only: no rollback
    assert server.objects[("RayService", "streamrec-serve")]["spec"]["serveConfigV2"] == theirs["config"]
    assert "serveConfigV2 of streamrec-dev/streamrec-serve was NOT restored: someone else changed it" in out


def test_versions_that_never_change_time_out(cluster, capsys):
    """(c) /healthz stays at the old versions with no problem at all (as if the change never reached the
    replicas): RUNNING is not taken for success; the step fails at its timeout, after rolling serveConfigV2
    back as in (b) (an artifact that never showed up in time is not one to leave for new replicas)."""
    server = cluster(answer=lambda kube: lambda n: health(OLD["ranker"], OLD["retriever"]))
    with pytest.raises(RuntimeError, match="finished with status"):
        _update(server, poll_s=1, timeout_s=2)
    out = capsys.readouterr().out
    assert "TimeoutError" in out and "did not report the new models within 2s" in out
    assert "The old model keeps serving" in out
    assert len(server.served_after_patch()) >= 2
    assert_rolled_back(server, out)


def test_redeploying_the_same_artifacts_accepts_the_same_versions_only_without_problems(cluster, capsys):
    """A run that re-deploys the artifacts the RayService already names: the patch changes nothing and
    no replica reloads, so the versions stay by design. Accepted when /healthz names no artifact problem;
    a failed load of that artifact (a model that never loaded) fails the step as in (b)."""
    docs = rendered(f"k8s/overlays/{NAMESPACE.removeprefix('streamrec-')}")
    serve = yaml.safe_load(find(docs, "RayService", "streamrec-serve")[0]["spec"]["serveConfigV2"])
    same = {d["name"].lower(): d["user_config"]["artifact"] for app in serve["applications"]
            for d in app["deployments"] if d["name"] in ("Ranker", "Retriever")}

    server = cluster(answer=lambda kube: lambda n: health(OLD["ranker"], OLD["retriever"]))
    assert _update(server, same, poll_s=0, timeout_s=30).output == "streamrec-serve"
    assert server.new_artifacts() == same

    problem = "retriever: artifact failed to load (ValueError)"
    server = cluster(answer=lambda kube: lambda n: health(OLD["ranker"], None, problem))
    with pytest.raises(RuntimeError, match="finished with status"):
        _update(server, same, poll_s=0, timeout_s=30)
    assert f"deploy failed: {problem}" in capsys.readouterr().out
