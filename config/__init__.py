"""Load a typed `PlatformConfig` from a YAML profile plus `--set key.path=value` overrides.

>>> cfg = load(None, ["ingest.max_batch_bytes=1024", "lake.root=/tmp/lake"])
>>> cfg.ingest.max_batch_bytes, cfg.lake.events
(1024, '/tmp/lake/events')

A few keys may name environment variables as `${NAME}` (how Kubernetes Secrets reach a profile):
`SECRET_KEYS` (the Redis connection string) and `PER_RUN_KEYS` (locations the rehearsal picks per run).
A reference anywhere else, or to an unset variable, is an error naming the key. A secret's value never
appears in an error, and a dump of the config (`model_dump`, what rendered files are written from) keeps
its `${NAME}` reference instead of the value.

>>> import os; os.environ["LAKE_BUCKET"] = "bucket-1"
>>> load(None, ["lake.root=s3://${LAKE_BUCKET}/lake"]).lake.root
's3://bucket-1/lake'
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import PlatformConfig

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "embedded.yaml"

# Values a pod gets from a Kubernetes Secret: dumps keep their `${NAME}` reference.
SECRET_KEYS = frozenset({"features.online_store.connection_string"})
# Not secrets, but different on every rehearsal run (its bucket, node-local scratch folder and Serve port:
# config/profiles/rehearsal.yaml); dumps hold their values.
PER_RUN_KEYS = frozenset({
    "lake.root", "lake.gx_dir", "ingest.landing_dir", "simulator.oracle_dir", "features.registry",
    "features.feast_dir", "training.storage_path", "training.artifact_dir", "serving.port"})

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """A profile or override that does not fit the schema; the message names the key, never its value."""


def _apply_override(tree: dict[str, Any], override: str, number: int) -> None:
    if "=" not in override:
        raise ConfigError(f"override #{number} must look like section.key=value (it has no '=')")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {dotted!r}: the value is not valid YAML") from None


def _expand_env(node: Any, secrets: dict[str, tuple[str, str]], where: str = "") -> Any:
    """`node` with `${NAME}` references replaced; records each expanded secret as key -> (reference, value)."""
    if isinstance(node, dict):
        return {k: _expand_env(v, secrets, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, secrets, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    if where not in SECRET_KEYS | PER_RUN_KEYS:
        raise ConfigError(f"{where}: ${{...}} environment references are allowed only in "
                          f"{', '.join(sorted(SECRET_KEYS | PER_RUN_KEYS))}")
    if "${" in _ENV_REF.sub("", node):
        raise ConfigError(f"{where}: a ${{...}} reference must name a variable as ${{NAME}} (letters, digits, _)")

    def value(match: re.Match) -> str:
        if match.group(1) not in os.environ:
            raise ConfigError(f"{where}: environment variable {match.group(1)} is not set")
        return os.environ[match.group(1)]

    expanded = _ENV_REF.sub(value, node)
    if where in SECRET_KEYS:
        secrets[where] = (node, expanded)
    return expanded


def _read_profile(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None  # YAML's message quotes the line
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree


def _uses_s3(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_uses_s3(v) for v in node.values())
    return isinstance(node, str) and node.startswith("s3://")


def _check_s3_transport(cfg: PlatformConfig, path: Path) -> None:
    """pyarrow and boto3 take the S3 endpoint from the environment only: hold it to `lake.s3_allow_http` too."""
    if cfg.lake.s3_allow_http or not _uses_s3(cfg.model_dump()):
        return
    if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://") or \
            os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true":
        raise ConfigError(f"{path}: the environment's AWS_ENDPOINT_URL (http://) or AWS_ALLOW_HTTP sends S3 traffic "
                          "over plain http; set lake.s3_allow_http: true only for an S3 server without TLS")


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> PlatformConfig:
    """Read a profile (a name under config/profiles, a path, or None for the embedded default)."""
    if path is None:
        path = DEFAULT_PROFILE
    path = Path(path)
    if not path.exists() and (PROFILES_DIR / f"{path}.yaml").exists():
        path = PROFILES_DIR / f"{path}.yaml"
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    tree = _read_profile(path)
    for number, override in enumerate(overrides or [], 1):
        _apply_override(tree, override, number)
    secrets: dict[str, tuple[str, str]] = {}
    tree = _expand_env(tree, secrets)
    try:
        cfg = PlatformConfig.model_validate(tree)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_input=False))
        raise ConfigError(f"{path}: {problems}") from None  # pydantic's own text would repeat it
    cfg.keep_secret_references(secrets)
    _check_s3_transport(cfg, path)
    return cfg


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="profile name (embedded, cluster) or YAML path; default embedded")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. lake.root=/data/lake")


def from_args(args: argparse.Namespace) -> PlatformConfig:
    return load(args.config, args.overrides)
