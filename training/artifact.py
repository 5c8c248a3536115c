"""The model artifact (docs/design.md, "Model artifact"): everything serving needs, in one folder, no pickle.

    <folder>/
      manifest.json            format, version string, model class, UTC time, sha256 of every file below
      config.json              model class name + constructor arguments (dataclasses tagged by name)
      weights.safetensors      the state dict
      metadata.json            feature / vocabulary metadata (e.g. dense item id -> source item id)
      metrics.json             the metrics the model was trained to
      semantic_ids.safetensors optional: the item -> semantic-ID table of a retrieval model
      selected.safetensors     optional: the weights validation selected, before a refit on the validation
                               items (a teacher whose validation scores are not leaked: training.retrieval)

The folder may be local or remote (`s3://bucket/artifacts/x`, through `storage`). A remote artifact is
written file by file with the manifest last, so a reader never finds a manifest whose files are missing;
loading one downloads it to a temporary folder and checks every file's sha256 there. A folder loads only
if its manifest lists exactly the files in it (none missing, none extra, the required ones present) and
every digest matches: weights the manifest does not vouch for are never read.

The model is rebuilt from a registry of known classes: `config` is either one registered config
dataclass (the constructor's only argument, e.g. `DLRM(DLRMConfig(...))`) or a dict of keyword
arguments whose values may be registered dataclasses, numbers, strings, lists, tuples and dicts
(e.g. `HSTURetrieval(cfg=HSTUConfig(...), num_items=3615)`). Nested dataclasses and tuples
round-trip exactly. Only registered names are ever instantiated, so loading a folder cannot run
arbitrary code.

>>> import tempfile, torch
>>> from models.hstu import HSTUConfig
>>> from models.retrieval import HSTURetrieval
>>> cfg = HSTUConfig(d_model=8, num_blocks=1, num_heads=1, d_qk=8, d_v=8, max_len=10, dropout=0.0)
>>> model = HSTURetrieval(cfg, num_items=30)
>>> folder = tempfile.mkdtemp() + "/hstu"
>>> manifest = save_artifact(folder, model, {"cfg": cfg, "num_items": 30}, {"dataset": "toy"}, {"hr@10": 0.5})
>>> loaded, manifest = load_artifact(folder)
>>> type(loaded).__name__, manifest.config["cfg"] == cfg, manifest.metrics
('HSTURetrieval', True, {'hr@10': 0.5})
>>> manifest.version.startswith("hsturetrieval-")
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import storage
from models.hstu import HSTUConfig
from models.nezha import NezhaConfig, NezhaRetriever
from models.retrieval import HSTURetrieval
from models.sasrec import SASRec
from training.ranking_models import RANKERS

FORMAT_VERSION = 1
MANIFEST, CONFIG, WEIGHTS = "manifest.json", "config.json", "weights.safetensors"
METADATA, METRICS, SEMANTIC_IDS = "metadata.json", "metrics.json", "semantic_ids.safetensors"
SELECTED = "selected.safetensors"
WEIGHT_SETS = ("final", "selected")

REQUIRED_FILES = frozenset({CONFIG, WEIGHTS, METADATA, METRICS})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

MODEL_CLASSES: dict[str, type[nn.Module]] = {}
CONFIG_CLASSES: dict[str, type] = {}
# Config classes renamed since artifacts were first saved: the name an artifact recorded -> the class's name now.
FORMER_CONFIG_NAMES = {"FeatureSpec": "RankingInputSpec"}


def register_model(cls: type[nn.Module]) -> type[nn.Module]:
    """Make a model class loadable by its class name (usable as a decorator)."""
    _register(MODEL_CLASSES, cls)
    return cls


def register_config(cls: type) -> type:
    """Make a config dataclass decodable by its class name (usable as a decorator)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    _register(CONFIG_CLASSES, cls)
    return cls


def _register(registry: dict[str, type], cls: type) -> None:
    known = registry.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"another class is already registered as {cls.__name__!r}: {known.__module__}")
    registry[cls.__name__] = cls


for _model in (HSTURetrieval, SASRec, NezhaRetriever):
    register_model(_model)
for _config in (HSTUConfig, NezhaConfig):
    register_config(_config)
for _ranker in RANKERS.values():  # the ranking models are declared once, where training.model names them
    for _cls in _ranker.classes:
        (register_model if issubclass(_cls, nn.Module) else register_config)(_cls)


def encode_config(value: Any, path: str = "config") -> Any:
    """JSON-ready form of a constructor config: dataclasses become {"__dataclass__": name, "fields": {...}},
    tuples {"__tuple__": [...]}; `path` names the offending value in errors.

    >>> encode_config({"dims": (2, 3), "rate": 0.5})
    {'dims': {'__tuple__': [2, 3]}, 'rate': 0.5}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if CONFIG_CLASSES.get(name) is not type(value):
            raise TypeError(f"{path}: dataclass {name} is not registered (training.artifact.register_config)")
        fields = {f.name: encode_config(getattr(value, f.name), f"{path}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": name, "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_config(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_config(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path}: dict keys must be strings")
        return {k: encode_config(v, f"{path}.{k}") for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{path}: cannot store a {type(value).__name__} in a model config")


def decode_config(value: Any) -> Any:
    """Inverse of `encode_config`; only registered dataclasses are instantiated.

    >>> decode_config(encode_config(HSTUConfig(d_model=8))) == HSTUConfig(d_model=8)
    True
    """
    if isinstance(value, list):
        return [decode_config(v) for v in value]
    if isinstance(value, dict):
        if "__dataclass__" in value:
            name = FORMER_CONFIG_NAMES.get(value["__dataclass__"], value["__dataclass__"])
            if name not in CONFIG_CLASSES:
                raise ValueError(f"unknown config class {name!r}; known: {sorted(CONFIG_CLASSES)}")
            return CONFIG_CLASSES[name](**{k: decode_config(v) for k, v in value["fields"].items()})
        if "__tuple__" in value:
            return tuple(decode_config(v) for v in value["__tuple__"])
        return {k: decode_config(v) for k, v in value.items()}
    return value


def build_model(model_class: str, config: Any) -> nn.Module:
    """Instantiate a registered model from its constructor config (one dataclass or a kwargs dict)."""
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {model_class!r}; known: {sorted(MODEL_CLASSES)}")
    cls = MODEL_CLASSES[model_class]
    return cls(**config) if isinstance(config, dict) else cls(config)


@dataclass
class Manifest:
    """What `load_artifact` returns next to the model (and `save_artifact` returns alone)."""

    folder: str  # a local path or a URI
    version: str
    model_class: str
    created_utc: str
    config: Any  # the decoded constructor config
    metadata: dict
    metrics: dict
    semantic_ids: torch.Tensor | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(folder: str) -> dict:
    try:
        manifest = storage.read_json(storage.join(folder, MANIFEST))
    except json.JSONDecodeError as err:
        raise ValueError(f"{storage.join(folder, MANIFEST)}: not JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{storage.join(folder, MANIFEST)}: not a JSON object")
    return manifest


def _check_listed(folder: str, files: Any, present: list[str]) -> None:
    """The manifest's `files` against the files found in the folder (relative paths, the manifest aside)."""
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{folder}: {MANIFEST} lists no files, so nothing in the folder can be checked")
    if bad := sorted(name for name, digest in files.items() if not _SHA256_HEX.fullmatch(str(digest))):
        raise ValueError(f"{folder}: {MANIFEST} gives no sha256 (64 lower-case hex digits) for {', '.join(bad)}")
    if unlisted := sorted(REQUIRED_FILES - files.keys()):
        raise ValueError(f"{folder}: {MANIFEST} does not list {', '.join(unlisted)}")
    found = set(present) - {MANIFEST}
    if missing := sorted(files.keys() - found):
        raise ValueError(f"{folder}: {', '.join(missing)} listed in {MANIFEST} but missing from the folder")
    if extra := sorted(found - files.keys()):
        raise ValueError(f"{folder}: {', '.join(extra)} in the folder but not listed in {MANIFEST}")


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=False) + "\n")


def save_artifact(folder: str | Path, model: nn.Module, config: Any, metadata: dict | None = None,
                  metrics: dict | None = None, *, name: str | None = None,
                  semantic_ids: torch.Tensor | None = None,
                  selected_weights: dict[str, torch.Tensor] | None = None) -> Manifest:
    """Write `model` as an artifact folder; returns its manifest. `selected_weights`: a second state dict of the
    same model (the epoch validation selected, before a refit), loaded with `load_artifact(..., weights="selected")`.

    `config` must rebuild the model: `type(model)(config)` for a dataclass, `type(model)(**config)`
    for a dict (checked here by building it, so a wrong config fails at save time, not in serving).
    The folder appears whole or not at all (written next to it, then renamed); it must not exist
    yet. The version is `<name>-<UTC time>-<first 8 hex of the weights' sha256>`, name defaulting
    to the lower-cased class name.
    """
    folder = str(folder)
    model_class = type(model).__name__
    if MODEL_CLASSES.get(model_class) is not type(model):
        raise TypeError(f"model class {model_class} is not registered (training.artifact.register_model)")
    if storage.list_files(folder):
        raise FileExistsError(f"artifact folder {folder} already exists and is not empty")
    encoded = encode_config(config)
    rebuilt = build_model(model_class, decode_config(encoded))
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != got:
        wrong = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise ValueError(f"config does not rebuild this model: state dict keys or shapes differ, e.g. {wrong}")
    if selected_weights is not None and {k: tuple(v.shape) for k, v in selected_weights.items()} != got:
        raise ValueError("selected_weights are not a state dict of this model (keys or shapes differ)")
    metadata, metrics = dict(metadata or {}), dict(metrics or {})

    remote = storage.is_remote(folder)
    parent = tempfile.gettempdir() if remote else os.path.dirname(storage.local_path(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{os.path.basename(folder.rstrip('/'))}.", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from a serving process of another user
        _write_json(tmp / CONFIG, {"model_class": model_class, "config": encoded})
        save_model(model, str(tmp / WEIGHTS))
        _write_json(tmp / METADATA, metadata)
        _write_json(tmp / METRICS, metrics)
        if semantic_ids is not None:
            save_file({"semantic_ids": semantic_ids.detach().cpu().contiguous()}, str(tmp / SEMANTIC_IDS))
        if selected_weights is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in selected_weights.items()}, str(tmp / SELECTED))
        created = datetime.now(UTC)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        version = f"{name or model_class.lower()}-{created:%Y%m%dT%H%M%SZ}-{files[WEIGHTS][:8]}"
        _write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "version": version,
                                     "model_class": model_class, "created_utc": created.isoformat(),
                                     "files": files})
        if remote:  # the manifest last: it is what makes the artifact loadable
            for file_name in [*files, MANIFEST]:
                storage.upload_file(str(tmp / file_name), storage.join(folder, file_name))
        else:
            if os.path.exists(folder):
                os.rmdir(folder)  # empty, checked above
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Manifest(folder, version, model_class, created.isoformat(), decode_config(encoded), metadata, metrics,
                    semantic_ids)


def load_artifact(folder: str | Path, device: str | torch.device = "cpu",
                  weights: str = "final") -> tuple[nn.Module, Manifest]:
    """Rebuild the model of an artifact folder (in eval mode, on `device`) and read its manifest; `weights`
    "selected" loads the selected weights kept beside the final ones (an error if the artifact has none).

    The manifest must list exactly the folder's files and each one's sha256 must match, so a half-copied,
    edited or padded artifact fails loudly, naming the file, instead of serving wrong weights.
    """
    if storage.is_remote(str(folder)):
        if not storage.exists(storage.join(str(folder), MANIFEST)):
            raise FileNotFoundError(f"{folder}: no {MANIFEST} (not an artifact, or still being written)")
        # The listing first, so a folder with extra or missing files is refused before anything is downloaded;
        # the downloaded copy is checked again below (the folder may change in between).
        manifest = _read_manifest(str(folder))
        _check_listed(str(folder), manifest.get("files"), storage.list_files(str(folder), recursive=True))
        with tempfile.TemporaryDirectory(prefix="artifact-") as local:
            storage.download_dir(str(folder), local)
            model, manifest = load_artifact(local, device, weights)
        manifest.folder = str(folder)
        return model, manifest
    if weights not in WEIGHT_SETS:
        raise ValueError(f"weights must be one of {WEIGHT_SETS}, got {weights!r}")
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise FileNotFoundError(f"{folder}: no {MANIFEST} (not an artifact, or still being written)")
    manifest = _read_manifest(str(folder))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported artifact format {manifest.get('format_version')!r}")
    _check_listed(str(folder), manifest.get("files"), storage.list_files(str(folder), recursive=True))
    for file_name, digest in manifest["files"].items():
        if _sha256(folder / file_name) != digest:
            raise ValueError(f"{folder / file_name}: sha256 does not match the manifest")
    stored = json.loads((folder / CONFIG).read_text())
    config = decode_config(stored["config"])
    model = build_model(stored["model_class"], config)
    if weights == "selected":
        if SELECTED not in manifest["files"]:
            raise ValueError(f"{folder}: no {SELECTED} (the model was not refitted after selection, or was saved "
                             "before selected weights were kept)")
        model.load_state_dict(load_file(str(folder / SELECTED), device=str(device)), strict=True)
    else:
        load_model(model, str(folder / WEIGHTS), strict=True, device=str(device))
    model.to(device).eval()
    semantic_ids = None
    if SEMANTIC_IDS in manifest["files"]:
        semantic_ids = load_file(str(folder / SEMANTIC_IDS), device=str(device))["semantic_ids"]
    return model, Manifest(
        folder=str(folder),
        version=manifest["version"],
        model_class=stored["model_class"],
        created_utc=manifest["created_utc"],
        config=config,
        metadata=json.loads((folder / METADATA).read_text()),
        metrics=json.loads((folder / METRICS).read_text()),
        semantic_ids=semantic_ids,
    )


def artifact_version(folder: str) -> str:
    """The version string in an artifact's manifest (local or remote), without loading the model."""
    return storage.read_json(storage.join(str(folder), MANIFEST))["version"]
