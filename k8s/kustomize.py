"""A small kustomize renderer in Python, for the features this repository's kustomizations use.

`kubectl kustomize` needs only the client, but CI machines may lack it; the offline tests render every
overlay with this module instead (and compare with `kubectl kustomize` where it exists). Supported:
`resources` (files and folders), `namespace`, `namePrefix`/`nameSuffix` (object names only),
`labels` (metadata only), `commonAnnotations`, `patches` (strategic merge or JSON6902, with or without
`target`), `configMapGenerator` (files/literals/envs, behavior create/merge/replace, hash suffix
disabled) and `images`. Any other key is an error, so a kustomization never renders differently here
than in kustomize without a test noticing.

    python -m k8s.kustomize k8s/overlays/prod > rendered.yaml
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "namePrefix", "nameSuffix", "labels",
             "commonAnnotations", "patches", "configMapGenerator", "images"}
# Kinds the namespace transformer leaves alone (they are cluster-scoped).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass", "PersistentVolume", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
# Strategic-merge list keys of the core API (kustomize reads them from the OpenAPI schema). Custom
# resources have no schema there, so kustomize replaces their lists whole: so does this renderer.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "ephemeralContainers": "name", "volumes": "name",
              "env": "name", "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
              "hostAliases": "ip", "topologySpreadConstraints": "topologyKey"}
CORE_GROUPS = {"", "v1", "apps", "batch", "networking.k8s.io", "rbac.authorization.k8s.io", "policy",
               "autoscaling"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render faithfully; the message names the file and key."""


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def _is_core(doc: Doc) -> bool:
    return _group(doc.get("apiVersion", "")) in CORE_GROUPS


def _unshare(node: Any) -> Any:
    """A tree without shared nodes: YAML aliases (`*env`) load as one object, which a patch of one place
    would change everywhere; kustomize expands them into independent copies."""
    if isinstance(node, dict):
        return {k: _unshare(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshare(v) for v in node]
    return node


def _load_docs(path: Path) -> list[Doc]:
    return [_unshare(d) for d in yaml.safe_load_all(path.read_text()) if d]


# --- strategic merge patch -----------------------------------------------------------------------


def strategic_merge(target: Any, patch: Any, core: bool) -> Any:
    """Merge `patch` into `target` the way kustomize does (maps merge, null deletes, lists per MERGE_KEYS)."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if key == "$patch":
            raise KustomizeError(f"unsupported $patch directive {value!r}")
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, core)
        elif isinstance(value, list) and isinstance(out.get(key), list) and core and key in MERGE_KEYS:
            out[key] = _merge_list(out[key], value, MERGE_KEYS[key], core)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(target: list, patch: list, key: str, core: bool) -> list:
    out = copy.deepcopy(target)
    for item in patch:
        match = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if match is not None:
                out.pop(match)
        elif match is None:
            out.append(copy.deepcopy(item))
        else:
            out[match] = strategic_merge(out[match], item, core)
    return out


# --- JSON6902 ------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KustomizeError(f"JSON6902 path {path}: no list index {part}")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KustomizeError(f"JSON6902 path {path}: no key {part!r}")
    return node


def json6902(doc: Doc, ops: list[dict]) -> Doc:
    """Apply RFC 6902 operations (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        if kind in ("move", "copy"):
            value = copy.deepcopy(_walk(doc, _pointer(op["from"]), op["from"]))
            if kind == "move":
                doc = json6902(doc, [{"op": "remove", "path": op["from"]}])
            kind, op = "add", {"value": value}
        if kind == "test":
            if _walk(doc, parts, path) != op["value"]:
                raise KustomizeError(f"JSON6902 test failed at {path}")
            continue
        parent = _walk(doc, parts[:-1], path)
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add":
                index = len(parent) if last == "-" else int(last)
                if index > len(parent):
                    raise KustomizeError(f"JSON6902 path {path}: index out of range")
                parent.insert(index, copy.deepcopy(op["value"]))
                continue
            _walk(parent, [last], path)
            if kind == "remove":
                parent.pop(int(last))
            elif kind == "replace":
                parent[int(last)] = copy.deepcopy(op["value"])
            else:
                raise KustomizeError(f"unknown JSON6902 op {kind!r}")
        elif isinstance(parent, dict):
            if kind == "add":
                parent[last] = copy.deepcopy(op["value"])
            elif kind in ("remove", "replace"):
                if last not in parent:
                    raise KustomizeError(f"JSON6902 {kind} at {path}: no key {last!r}")
                if kind == "remove":
                    del parent[last]
                else:
                    parent[last] = copy.deepcopy(op["value"])
            else:
                raise KustomizeError(f"unknown JSON6902 op {kind!r}")
        else:
            raise KustomizeError(f"JSON6902 path {path}: parent is not a map or list")
    return doc


# --- the transformers ----------------------------------------------------------------------------


def _matches(doc: Doc, target: dict) -> bool:
    unknown = set(target) - {"kind", "name", "group", "version", "namespace"}
    if unknown:
        raise KustomizeError(f"patch target keys {sorted(unknown)} are not supported")
    group, _, version = doc["apiVersion"].rpartition("/")
    fields = {"kind": doc["kind"], "name": doc["metadata"]["name"], "group": group, "version": version,
              "namespace": doc["metadata"].get("namespace", "")}
    # kustomize treats each target field as an anchored regular expression.
    return all(re.fullmatch(str(pattern), fields[key]) for key, pattern in target.items())


def _apply_patch(docs: list[Doc], entry: dict, base: Path) -> list[Doc]:
    if set(entry) - {"path", "patch", "target", "options"}:
        raise KustomizeError(f"{base}: patch keys {sorted(entry)} are not supported")
    text = (base / entry["path"]).read_text() if "path" in entry else entry["patch"]
    body = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(body, list):  # JSON6902: needs a target
        if not target:
            raise KustomizeError(f"{base}: a JSON6902 patch needs a target")
        selected = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not selected:
            raise KustomizeError(f"{base}: patch target {target} matches nothing")
        for i in selected:
            docs[i] = json6902(docs[i], body)
        return docs
    if not target:
        target = {"kind": body["kind"], "name": re.escape(body["metadata"]["name"])}
    selected = [i for i, d in enumerate(docs) if _matches(d, target)]
    if not selected:
        raise KustomizeError(f"{base}: patch target {target} matches nothing")
    for i in selected:
        patch = copy.deepcopy(body)
        # With an explicit target the patch's own name (and kind) do not rename the object.
        patch.setdefault("metadata", {})["name"] = docs[i]["metadata"]["name"]
        patch["kind"], patch["apiVersion"] = docs[i]["kind"], docs[i]["apiVersion"]
        docs[i] = strategic_merge(docs[i], patch, _is_core(docs[i]))
    return docs


def _set_image(image: str, rules: list[dict]) -> str:
    rest, _, digest = image.partition("@")
    name, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        name, tag = rest.rsplit(":", 1)
    for rule in rules:
        if rule["name"] == name:
            name = rule.get("newName", name)
            if "digest" in rule:
                return f"{name}@{rule['digest']}"
            if "newTag" in rule:
                return f"{name}:{rule['newTag']}"
            break
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _images(node: Any, rules: list[dict]) -> None:
    """kustomize rewrites `image` in every `containers` / `initContainers` list, custom resources included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and isinstance(container.get("image"), str):
                        container["image"] = _set_image(container["image"], rules)
            _images(value, rules)
    elif isinstance(node, list):
        for value in node:
            _images(value, rules)


def _config_map(entry: dict, base: Path) -> Doc:
    allowed = {"name", "namespace", "files", "literals", "envs", "behavior", "options"}
    if set(entry) - allowed:
        raise KustomizeError(f"{base}: configMapGenerator keys {sorted(set(entry) - allowed)} are not supported")
    if not (entry.get("options") or {}).get("disableNameSuffixHash"):
        # Custom resources (RayJob volumes) are not name-reference-rewritten by kustomize: a hash suffix
        # would leave them pointing at a ConfigMap that does not exist.
        raise KustomizeError(f"{base}: configMapGenerator {entry['name']} must set options.disableNameSuffixHash")
    data: dict[str, str] = {}
    for spec in entry.get("files", []):
        key, _, rel = spec.partition("=") if "=" in spec else (Path(spec).name, "", spec)
        data[key] = (base / rel).read_text()
    for literal in entry.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    for env_file in entry.get("envs", []):
        for line in (base / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                data[key.strip()] = value
    meta = {"name": entry["name"]}
    if entry.get("namespace"):
        meta["namespace"] = entry["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def render(folder: str | Path) -> list[Doc]:
    """Render the kustomization in `folder` into a list of objects (kustomize's order is not kept)."""
    folder = Path(folder)
    kfile = next((folder / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if (folder / n).exists()), None)
    if kfile is None:
        raise KustomizeError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kfile}: keys {sorted(unknown)} are not supported by k8s.kustomize")

    docs: list[Doc] = []
    for res in spec.get("resources", []):
        path = folder / res
        docs += render(path) if path.is_dir() else _load_docs(path)

    for entry in spec.get("configMapGenerator", []):
        generated = _config_map(entry, folder)
        behavior = entry.get("behavior", "create")
        existing = next((i for i, d in enumerate(docs)
                         if d["kind"] == "ConfigMap" and d["metadata"]["name"] == entry["name"]), None)
        if behavior == "create":
            if existing is not None:
                raise KustomizeError(f"{kfile}: ConfigMap {entry['name']} already exists (use behavior: merge/replace)")
            docs.append(generated)
        elif existing is None:
            raise KustomizeError(f"{kfile}: behavior {behavior} needs an existing ConfigMap {entry['name']}")
        elif behavior == "replace":
            docs[existing]["data"] = generated["data"]
        elif behavior == "merge":
            docs[existing].setdefault("data", {}).update(generated["data"])
        else:
            raise KustomizeError(f"{kfile}: unknown behavior {behavior!r}")

    for entry in spec.get("patches", []):
        docs = _apply_patch(docs, entry, folder)

    prefix, suffix = spec.get("namePrefix", ""), spec.get("nameSuffix", "")
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if (prefix or suffix) and doc["kind"] not in ("Namespace", "CustomResourceDefinition"):
            meta["name"] = f"{prefix}{meta['name']}{suffix}"
        if "namespace" in spec:
            if doc["kind"] == "Namespace":
                meta["name"] = spec["namespace"]  # kustomize renames a Namespace object to the target
            elif doc["kind"] not in CLUSTER_SCOPED:
                meta["namespace"] = spec["namespace"]
        for entry in spec.get("labels", []):
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                raise KustomizeError(f"{kfile}: labels with includeSelectors/includeTemplates are not supported")
            meta.setdefault("labels", {}).update(entry["pairs"])
        if spec.get("commonAnnotations"):
            meta.setdefault("annotations", {}).update(spec["commonAnnotations"])
    if spec.get("images"):
        for doc in docs:
            _images(doc, spec["images"])
    return docs


def key(doc: Doc) -> tuple[str, str, str, str]:
    meta = doc.get("metadata", {})
    return doc.get("apiVersion", ""), doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def dump(docs: list[Doc]) -> str:
    return yaml.safe_dump_all(sorted(docs, key=key), sort_keys=True)


if __name__ == "__main__":
    sys.stdout.write(dump(render(sys.argv[1] if len(sys.argv) > 1 else "k8s/overlays/dev")))
