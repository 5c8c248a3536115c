"""Offline validation of rendered manifests: schemas, KubeRay's own rules, the restricted pod profile.

    python -m k8s.validate k8s/overlays/dev k8s/overlays/prod infra/k8s

Checks, each reported as "<Kind>/<name>: <path>: <problem>":
- core kinds against the upstream schemas (`kubernetes-validate`, strict: unknown fields are errors);
- RayCluster / RayJob / RayService against KubeRay's CRD schemas (../shared/k8s/crds, or
  $STREAMREC_CRDS_DIR), unknown fields rejected as the API server's strict field validation does;
- the operator's checks a schema cannot express (KubeRay's validation.go) and this project's rules for
  stages (shutdownAfterJobFinishes, a TTL, a deadline) and clusters (Ray token authentication);
- the "restricted" Pod Security Standard and resource requests/limits on every pod a manifest makes,
  the pods KubeRay makes from RayCluster templates (and its autoscaler sidecar) included;
- secrets only by reference: no Secret objects with data, credential-like env vars only from secretKeyRef;
- identities across one kustomization: head service accounts exist, the autoscaler's head has a token and
  KubeRay's autoscaler rules, other Ray pods mount no token;
- serveConfigV2 against Ray Serve's own schema (where Ray is installed) and where its proxies run.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS_ENV = "STREAMREC_CRDS_DIR"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # KubeRay's constants (suffixes it appends)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CONNECTION_STRING|CREDENTIAL)", re.I)
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# A finished stage's cluster holds its nodes until the TTL: minutes, enough to read its logs.
MAX_TTL_S = 900
# What KubeRay grants the in-tree autoscaler (ray-operator/controllers/ray/common/rbac.go, BuildRole).
AUTOSCALER_RULES = {("", "pods"): {"get", "list", "watch", "patch"}, ("", "pods/resize"): {"patch"},
                    ("ray.io", "rayclusters"): {"get", "patch"}}
MIN_TOKEN_AUTH_RAY = (2, 52)  # KubeRay validation.go: authOptions.mode token needs Ray >= 2.52.0


def crds_dir() -> Path:
    return Path(os.environ.get(CRDS_ENV, ROOT.parent / "shared" / "k8s" / "crds"))


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema: objects with `properties` reject unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators(folder: Path) -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    """(apiVersion, kind) -> a validator, for every served version of every CRD in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        # libyaml when present: the three CRDs are 3 MB of YAML (30 s with the pure-Python parser).
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                # The API server checks these itself; the schema leaves metadata open.
                schema.setdefault("properties", {})["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                schema["properties"]["metadata"] = {"type": "object"}
                schema["properties"].pop("status", None)
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return out


def _name(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def _path(parts) -> str:
    return "." + ".".join(str(p) for p in parts) if parts else "."


# --- schemas ---------------------------------------------------------------------------------------


def schema_problems(doc: dict, crds: Path | None) -> list[str]:
    if doc.get("kind") in RAY_KINDS:
        if crds is None:
            return []
        validator = crd_validators(crds).get((doc.get("apiVersion"), doc.get("kind")))
        if validator is None:
            return [f"{_name(doc)}: no CRD schema for {doc.get('apiVersion')} {doc.get('kind')} in {crds}"]
        return [f"{_name(doc)}: {_path(e.absolute_path)}: {e.message}"
                for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{_name(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    except kubernetes_validate.ValidationError as err:
        # kubernetes-validate stops at the first error (the object is re-checked after each fix).
        return [f"{_name(doc)}: {_path(err.path)}: {err.message}"]
    return []


# --- KubeRay's rules -------------------------------------------------------------------------------


def _cluster_problems(spec: dict, where: str) -> list[str]:
    out = []
    head = spec.get("headGroupSpec") or {}
    if not (head.get("template") or {}).get("spec", {}).get("containers"):
        out.append(f"{where}.headGroupSpec: needs at least one container")
    groups = [("head", head)] + [(g.get("groupName"), g) for g in spec.get("workerGroupSpecs") or []]
    names = [name for name, _ in groups[1:]]
    if len(set(names)) != len(names):
        out.append(f"{where}.workerGroupSpecs: groupName values must be unique ({names})")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            out.append(f"{where} group {name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            out.append(f"{where} group {name}: rayStartParams['labels'] is not supported; use labels")
        if name == "head":
            continue
        if not (group.get("template") or {}).get("spec", {}).get("containers"):
            out.append(f"{where} group {name}: needs at least one container")
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not all(isinstance(n, int) for n in (lo, hi, replicas)):
            continue  # a wrong type: the schema check reports it
        if lo > hi:
            out.append(f"{where} group {name}: minReplicas {lo} > maxReplicas {hi}")
        elif not lo <= replicas <= hi:
            out.append(f"{where} group {name}: replicas {replicas} outside [{lo}, {hi}]")
        if autoscaling and group.get("suspend"):
            out.append(f"{where} group {name}: cannot be suspended with the autoscaler enabled")
    head_container = (((head.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0]
    head_env = {e.get("name") for e in head_container.get("env") or []}
    if spec.get("gcsFaultToleranceOptions") is not None:
        # KubeRay passes the password and address itself and rejects these (utils/validation.go).
        if (head.get("rayStartParams") or {}).get("redis-password"):
            out.append(f"{where}.headGroupSpec.rayStartParams: no redis-password with gcsFaultToleranceOptions")
        for name in sorted(head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS"}):
            out.append(f"{where}.headGroupSpec: no {name} env with gcsFaultToleranceOptions (use its fields)")
    if (spec.get("authOptions") or {}).get("mode", "token" if spec.get("authOptions") else None) == "token":
        version = tuple(int(p) for p in re.findall(r"\d+", str(spec.get("rayVersion", "")))[:2])
        if version < MIN_TOKEN_AUTH_RAY:
            out.append(f"{where}.authOptions: token mode needs rayVersion >= 2.52.0")
    else:
        # The project's rule: KubeRay binds the dashboard to 0.0.0.0 (its default, and ours: the operator and
        # the submitter reach it), so without a token anyone who reaches port 8265 can submit a job.
        out.append(f"{where}.authOptions: mode token required (the dashboard and Jobs API listen on every address)")
    if autoscaling:
        options = spec.get("autoscalerOptions") or {}
        # The sidecar KubeRay injects takes these from autoscalerOptions; without them it runs unrestricted.
        if not options.get("securityContext"):
            out.append(f"{where}.autoscalerOptions.securityContext: required (the injected autoscaler container)")
        if not (options.get("resources") or {}).get("limits"):
            out.append(f"{where}.autoscalerOptions.resources: requests and limits required")
    return out


def operator_problems(doc: dict) -> list[str]:
    kind, meta, spec = doc.get("kind"), doc.get("metadata") or {}, doc.get("spec") or {}
    if kind not in RAY_KINDS:
        return []
    name, out = meta.get("name", ""), []
    if len(name) > MAX_NAME[kind]:
        out.append(f"{_name(doc)}: name longer than {MAX_NAME[kind]} characters")
    if not DNS1035.match(name):
        out.append(f"{_name(doc)}: name is not a DNS-1035 label")
    if kind == "RayCluster":
        out += [f"{_name(doc)}: {p}" for p in _cluster_problems(spec, ".spec")]
    elif kind == "RayService":
        out += [f"{_name(doc)}: {p}" for p in _cluster_problems(spec.get("rayClusterConfig") or {},
                                                                ".spec.rayClusterConfig")]
        kind_ = (spec.get("upgradeStrategy") or {}).get("type")
        if kind_ not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            out.append(f"{_name(doc)}: .spec.upgradeStrategy.type {kind_!r} is not valid")
        out += [f"{_name(doc)}: .spec.serveConfigV2: {p}" for p in serve_config_problems(spec.get("serveConfigV2"))]
        out += [f"{_name(doc)}: {p}" for p in _proxy_problems(spec)]
    else:
        out += [f"{_name(doc)}: {p}" for p in _rayjob_problems(spec)]
    return out


def _rayjob_problems(spec: dict) -> list[str]:
    out = []
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    mode = spec.get("submissionMode", "K8sJobMode")
    if spec.get("suspend") and not shutdown:
        out.append(".spec.suspend: needs shutdownAfterJobFinishes: true")
    if isinstance(ttl, int) and ttl < 0:
        out.append(".spec.ttlSecondsAfterFinished: must be >= 0")
    if isinstance(ttl, int) and ttl > 0 and not shutdown:
        out.append(".spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        out.append(".spec: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("clusterSelector") and (spec.get("suspend") or mode == "SidecarMode"):
        out.append(".spec.clusterSelector: not supported with suspend or SidecarMode")
    if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
        out.append(".spec: SidecarMode takes no submitterPodTemplate / submitterConfig")
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        out.append(".spec.backoffLimit: incompatible with InteractiveMode")
    if mode != "InteractiveMode" and not str(spec.get("entrypoint", "")).strip():
        out.append(".spec.entrypoint: required")
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and isinstance(deadline, int) and deadline <= 0:
        out.append(".spec.activeDeadlineSeconds: must be > 0")
    if isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] < 0:
        out.append(".spec.backoffLimit: must be >= 0")
    if spec.get("runtimeEnvYAML"):
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as err:
            out.append(f".spec.runtimeEnvYAML: not YAML ({err})")
    if spec.get("rayClusterSpec"):
        out += _cluster_problems(spec["rayClusterSpec"], ".spec.rayClusterSpec")
    # The project's rules for stage jobs: a finished job frees its cluster, is cleaned up, cannot hang.
    if not shutdown:
        out.append(".spec.shutdownAfterJobFinishes: stages must be true (the cluster is freed when the job ends)")
    if not ttl:
        out.append(".spec.ttlSecondsAfterFinished: stages must set a TTL")
    elif isinstance(ttl, int) and ttl > MAX_TTL_S:
        out.append(f".spec.ttlSecondsAfterFinished: {ttl}s keeps a finished cluster's pods; at most {MAX_TTL_S}s")
    if deadline is None:
        out.append(".spec.activeDeadlineSeconds: stages must set a deadline")
    return out


def _proxy_problems(spec: dict) -> list[str]:
    """Where Serve's proxies run against what KubeRay routes to. KubeRay marks a serve worker Ready only
    while a proxy answers on its serving port (common/pod.go, initLivenessAndReadinessProbe: RayService
    workers' readiness probe adds the proxy's /-/healthz), and with excludeHeadPodFromServeSvc the head
    never joins the serve Service (rayservice_controller.go, updateHeadPodServeLabel)."""
    try:
        config = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
    except yaml.YAMLError:
        return []  # serve_config_problems reports it
    location = config.get("proxy_location", "EveryNode") if isinstance(config, dict) else "EveryNode"
    out = []
    if location in ("HeadOnly", "Disabled") and (spec.get("rayClusterConfig") or {}).get("workerGroupSpecs"):
        out.append(f".spec.serveConfigV2: proxy_location {location}: serve workers run no proxy and never "
                   "become Ready (use EveryNode)")
        if spec.get("excludeHeadPodFromServeSvc"):
            out.append(".spec.excludeHeadPodFromServeSvc: with proxies only on the head, the serve Service "
                       "has no endpoints")
    return out


def serve_config_problems(text: Any) -> list[str]:
    if not isinstance(text, str) or not text.strip():
        return ["missing (generate it: python -m k8s.serve_config)"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return [f"not YAML ({err})"]
    apps = (config or {}).get("applications")
    if not isinstance(apps, list) or not apps:
        return ["needs a non-empty applications list"]
    out, routes, names = [], [], []
    for app in apps:
        names.append(app.get("name"))
        routes.append(app.get("route_prefix", "/"))
        if not app.get("import_path"):
            out.append(f"application {app.get('name')!r}: import_path required")
        deployments = [d.get("name") for d in app.get("deployments") or []]
        if len(set(deployments)) != len(deployments):
            out.append(f"application {app.get('name')!r}: deployment names repeat")
        if "working_dir" in (app.get("runtime_env") or {}):
            out.append(f"application {app.get('name')!r}: runtime_env.working_dir has no meaning in the image")
    if len(set(names)) != len(names) or len(set(routes)) != len(routes):
        out.append("application names and route prefixes must be unique")
    return out + _ray_serve_schema_problems(config)


def _ray_serve_schema_problems(config: dict) -> list[str]:
    """Ray Serve's own check of a config (ray.serve.schema.ServeDeploySchema, what `serve deploy` and
    KubeRay's submission go through): e.g. num_replicas next to autoscaling_config is rejected. Skipped
    where Ray is not installed."""
    try:
        from pydantic import ValidationError
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        return [f"rejected by Ray Serve: {e['loc']}: {e['msg']}" for e in err.errors()]
    return []


# --- pods ------------------------------------------------------------------------------------------


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod this object makes (KubeRay's templates included)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        yield ".spec", spec
    elif kind in POD_TEMPLATE_KINDS:
        yield ".spec.template.spec", (spec.get("template") or {}).get("spec") or {}
    elif kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        yield ".spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {}
    elif kind in RAY_KINDS:
        cluster, prefix = {"RayCluster": (spec, ".spec"),
                           "RayJob": (spec.get("rayClusterSpec"), ".spec.rayClusterSpec"),
                           "RayService": (spec.get("rayClusterConfig"), ".spec.rayClusterConfig")}[kind]
        cluster = cluster or {}
        head = ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec")
        if head is not None:
            yield f"{prefix}.headGroupSpec.template.spec", head
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{prefix}.workerGroupSpecs[{i}].template.spec", (group.get("template") or {}).get("spec") or {}
        if kind == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and spec.get("rayClusterSpec"):
            template = spec.get("submitterPodTemplate")
            if template is None:
                # KubeRay's default submitter pod has no securityContext: it is rejected in a restricted namespace.
                yield ".spec.submitterPodTemplate", {"containers": [{"name": "ray-job-submitter (KubeRay default)"}]}
            else:
                yield ".spec.submitterPodTemplate.spec", template.get("spec") or {}


def pod_problems(where: str, pod: dict, injected: list[dict] = ()) -> list[str]:
    """The restricted Pod Security Standard, plus requests and limits on every container."""
    out = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{where}.{flag}: must not be true")
    for volume in pod.get("volumes") or []:
        types = set(volume) - {"name"}
        if types - RESTRICTED_VOLUMES:
            out.append(f"{where}.volumes[{volume.get('name')}]: volume type {sorted(types)} not allowed (restricted)")
    psc = pod.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        out.append(f"{where}.securityContext.runAsUser: 0 (root) not allowed")
    if psc.get("runAsNonRoot") is False:  # Pod Security admission rejects an explicit false at pod level
        out.append(f"{where}.securityContext: runAsNonRoot must be true, not false")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"{where}.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost")
    containers = [("containers", c) for c in pod.get("containers") or []]
    containers += [("initContainers", c) for c in pod.get("initContainers") or []]
    containers += [("injected", c) for c in injected]
    for field, c in containers:
        at = f"{where}.{field}[{c.get('name')}]"
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{at}.securityContext.privileged: must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{at}.securityContext.allowPrivilegeEscalation: must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{at}.securityContext.capabilities.drop: must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{at}.securityContext.capabilities.add: only NET_BIND_SERVICE is allowed")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{at}: runAsNonRoot must be true (pod or container securityContext)")
        if sc.get("runAsUser") == 0:
            out.append(f"{at}.securityContext.runAsUser: 0 (root) not allowed")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{at}: seccompProfile RuntimeDefault (or Localhost) required (pod or container)")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{at}.ports: hostPort not allowed")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not (res.get(part) or {}).get(resource):
                    out.append(f"{at}.resources.{part}.{resource}: required")
        for env in c.get("env") or []:
            if CREDENTIAL_ENV.search(env.get("name", "")) and "value" in env:
                out.append(f"{at}.env[{env['name']}]: a credential must come from a Secret (valueFrom.secretKeyRef)")
    return out


def _injected(doc: dict, where: str) -> list[dict]:
    """The autoscaler sidecar KubeRay adds to the head when in-tree autoscaling is on."""
    spec = doc.get("spec") or {}
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(doc.get("kind")) or {}
    if "headGroupSpec" not in where or not cluster.get("enableInTreeAutoscaling"):
        return []
    options = cluster.get("autoscalerOptions") or {}
    return [{"name": "autoscaler", "securityContext": options.get("securityContext"),
             "resources": options.get("resources")}]


def security_problems(doc: dict) -> list[str]:
    out = []
    for where, pod in pod_specs(doc):
        out += [f"{_name(doc)}: {p}" for p in pod_problems(where, pod, _injected(doc, where))]
    if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
        out.append(f"{_name(doc)}: a Secret with values must not be committed; create it in the cluster")
    return out


# --- identities (a whole rendered kustomization) -----------------------------------------------------


def _cluster_of(doc: dict) -> dict | None:
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}.get(doc.get("kind"))


def _token_mounted(pod: dict, accounts: dict[str, dict]) -> bool:
    if "automountServiceAccountToken" in pod:
        return bool(pod["automountServiceAccountToken"])
    account = accounts.get(pod.get("serviceAccountName", "default"), {})
    return account.get("automountServiceAccountToken", True) is not False


def _grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role.get("rules") or []:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                out.setdefault((group, resource), set()).update(rule.get("verbs") or [])
    return out


def identity_problems(docs: list[dict]) -> list[str]:
    """Service accounts of the Ray pods, checked across the objects of one namespace:
    - a head service account named in the template must exist: KubeRay creates one only when the template
      names none (raycluster_controller.go, reconcileAutoscalerServiceAccount);
    - with enableInTreeAutoscaling the head mounts a token and its account holds KubeRay's autoscaler rules
      (common/rbac.go, BuildRole): the sidecar calls the API with it (ray autoscaler/_private/kuberay/
      node_provider.py, load_k8s_secrets);
    - workers and submitters mount no token (they never call the API)."""
    accounts = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
    roles = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Role"}
    bound: dict[str, dict[tuple[str, str], set[str]]] = {}
    for binding in (d for d in docs if d.get("kind") == "RoleBinding"):
        role = roles.get((binding.get("roleRef") or {}).get("name"), {})
        for subject in binding.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                for key, verbs in _grants(role).items():
                    bound.setdefault(subject["name"], {}).setdefault(key, set()).update(verbs)
    out = []
    for doc in docs:
        if doc.get("kind") not in RAY_KINDS:
            continue
        cluster = _cluster_of(doc) or {}
        for where, pod in pod_specs(doc):
            account = pod.get("serviceAccountName", "default")
            if "headGroupSpec" in where:
                if account != "default" and account not in accounts:
                    out.append(f"{_name(doc)}: {where}: service account {account} does not exist")
                if cluster.get("enableInTreeAutoscaling"):
                    if not _token_mounted(pod, accounts):
                        out.append(f"{_name(doc)}: {where}: the autoscaler needs the head's token (automount)")
                    grants = bound.get(account, {})
                    missing = {k: v - grants.get(k, set()) for k, v in AUTOSCALER_RULES.items()}
                    if any(missing.values()):
                        out.append(f"{_name(doc)}: {where}: {account} lacks the autoscaler's rules "
                                   f"{ {k: sorted(v) for k, v in missing.items() if v} }")
            elif _token_mounted(pod, accounts):
                out.append(f"{_name(doc)}: {where}: mounts a service-account token it does not need")
    return out


def problems(docs: list[dict], crds: Path | None, *, whole: bool | None = None) -> list[str]:
    """Every problem in a rendered set of objects (empty when all is well). `whole`: the objects are a
    whole kustomization (default: when they hold a Namespace), so references between them are checked."""
    out = []
    for doc in docs:
        out += schema_problems(doc, crds) + operator_problems(doc) + security_problems(doc)
    if whole if whole is not None else any(d.get("kind") == "Namespace" for d in docs):
        out += identity_problems(docs)
    return out


def main(argv: list[str]) -> int:
    from k8s.kustomize import render

    crds = crds_dir()
    if not crds.is_dir():
        print(f"KubeRay CRDs not found at {crds} (set {CRDS_ENV}): Ray objects checked without schemas")
    failed = 0
    for folder in argv or ["k8s/overlays/dev", "k8s/overlays/prod"]:
        found = problems(render(folder), crds if crds.is_dir() else None)
        print(f"{folder}: {'ok' if not found else f'{len(found)} problems'}")
        for line in found:
            print(f"  {line}")
        failed |= bool(found)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
