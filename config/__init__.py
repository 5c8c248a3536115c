"""Load a typed `PlatformConfig` from a YAML profile plus `--set key.path=value` overrides.

>>> cfg = load(None, ["ingest.max_batch_bytes=1024", "lake.root=/tmp/lake"])
>>> cfg.ingest.max_batch_bytes, cfg.lake.events
(1024, '/tmp/lake/events')

String values may name environment variables as `${NAME}` (how Kubernetes Secrets reach a profile,
e.g. the Redis connection string); an unset variable is an error naming the key, never a literal.

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

from config.schema import PlatformConfig

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = PROFILES_DIR / "embedded.yaml"


class ConfigError(ValueError):
    """A profile or override that does not fit the schema; the message names the key."""


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, where: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        def value(match: re.Match) -> str:
            if match.group(1) not in os.environ:
                raise ConfigError(f"{where}: environment variable {match.group(1)} is not set")
            return os.environ[match.group(1)]
        return _ENV_REF.sub(value, node)
    return node


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> PlatformConfig:
    """Read a profile (a name under config/profiles, a path, or None for the embedded default)."""
    if path is None:
        path = DEFAULT_PROFILE
    path = Path(path)
    if not path.exists() and (PROFILES_DIR / f"{path}.yaml").exists():
        path = PROFILES_DIR / f"{path}.yaml"
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for override in overrides or []:
        _apply_override(tree, override)
    tree = _expand_env(tree)
    try:
        return PlatformConfig.model_validate(tree)
    except Exception as err:  # pydantic's message names the offending key path
        raise ConfigError(f"{path}: {err}") from err


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="profile name (embedded, cluster) or YAML path; default embedded")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. lake.root=/data/lake")


def from_args(args: argparse.Namespace) -> PlatformConfig:
    return load(args.config, args.overrides)
