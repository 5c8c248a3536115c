"""The Feast repository: `feature_store.yaml` rendered from the platform config, and opening the store.

`features/feature_repo/` is a Feast repo for the embedded profile, so Feast's own workflow works there:

    cd features/feature_repo && feast apply && feast materialize-incremental 2026-01-06T00:00:00

Any other config (the cluster profile, the demo's folders, a test's temp lake) gets the same repo
rendered into `<features.feast_dir>/repo`: the same `definitions.py`, a `feature_store.yaml` for that
config (Redis and an s3:// registry on the cluster profile) and the config itself as `platform.yaml`,
which `definitions.py` reads. Feast's registry and online database live under the data folder, never
in the source tree.

    python -m features.repo --config cluster          # render, print the folder
    python -m features.repo --apply                    # render and `feast apply` it (in-process)
    python -m features.repo --template                 # rewrite features/feature_repo/feature_store.yaml
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

import config
from config.schema import PlatformConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = Path(__file__).resolve().parent / "feature_repo"
PLATFORM_FILE = "platform.yaml"
TEMPLATE_HEADER = ("# The embedded profile's Feast repo config, rendered by `python -m features.repo --template`.\n"
                   "# Paths are relative to this folder; the registry and online store live under data/feast.\n")


def _is_local(path: str) -> bool:
    return "://" not in path


def absolute_paths(cfg: PlatformConfig, base: Path | None = None) -> PlatformConfig:
    """A copy of `cfg` whose local paths (lake, Feast folder, registry, SQLite file) are absolute."""
    base = base or Path.cwd()

    def fix(path: str) -> str:
        return str((base / path).resolve()) if _is_local(path) else path

    out = cfg.model_copy(deep=True)
    out.lake.root = fix(out.lake.root)
    out.features.feast_dir = fix(out.features.feast_dir)
    if out.features.registry:
        out.features.registry = fix(out.features.registry)
    out.features.online_store.path = fix(out.features.online_store.path)
    return out


def registry_path(cfg: PlatformConfig) -> str:
    return cfg.features.registry or f"{cfg.features.feast_dir.rstrip('/')}/registry.db"


def repo_dir(cfg: PlatformConfig) -> Path:
    return Path(cfg.features.feast_dir) / "repo"


def feature_store_yaml(cfg: PlatformConfig, relative_to: Path | None = None) -> dict:
    """Feast's repo config for `cfg` (local paths relative to `relative_to` when given, else absolute)."""
    cfg = absolute_paths(cfg)

    def local(path: str) -> str:
        return os.path.relpath(path, relative_to) if relative_to and _is_local(path) else path

    online = cfg.features.online_store
    if online.type == "redis":
        if not online.connection_string:
            raise ValueError("features.online_store.connection_string is required for redis")
        # The file Feast reads keeps a secret's `${VAR}` reference (Feast expands it when it loads the file), so
        # the password is never written to disk; a string given literally stays literal.
        written = cfg.model_dump(mode="json")["features"]["online_store"]["connection_string"]
        from features.redis_store import TYPE as guarded_redis  # imports Feast: only when Redis is used

        online_store = {"type": guarded_redis, "connection_string": written}
    else:
        online_store = {"type": "sqlite", "path": local(online.path)}
    return {
        "project": cfg.features.project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": local(registry_path(cfg)), "cache_ttl_seconds": 60},
        "online_store": online_store,
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
    }


def render_repo(cfg: PlatformConfig) -> Path:
    """Write the Feast repo for `cfg` into <feast_dir>/repo; returns the folder (where `feast apply` works)."""
    cfg = absolute_paths(cfg)
    folder = repo_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    if _is_local(registry_path(cfg)):
        Path(registry_path(cfg)).parent.mkdir(parents=True, exist_ok=True)
    if cfg.features.online_store.type == "sqlite":
        Path(cfg.features.online_store.path).parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(folder / "feature_store.yaml", yaml.safe_dump(feature_store_yaml(cfg), sort_keys=False))
    _write_if_changed(folder / PLATFORM_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    _write_if_changed(folder / "definitions.py", (TEMPLATE_DIR / "definitions.py").read_text())
    return folder


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def platform_config_for(folder: Path) -> PlatformConfig:
    """The config a repo folder was rendered for; in the template folder, $STREAMREC_CONFIG or the default."""
    rendered = Path(folder) / PLATFORM_FILE
    if rendered.exists():
        return config.load(rendered)
    return absolute_paths(config.load(os.environ.get("STREAMREC_CONFIG")), base=PROJECT_ROOT)


def open_store(cfg: PlatformConfig):
    """A `feast.FeatureStore` on the rendered repo for `cfg` (renders it first)."""
    from feast import FeatureStore

    from features.offline import configure_feast_duckdb, install_delta_extension

    install_delta_extension()
    configure_feast_duckdb()
    return FeatureStore(repo_path=str(render_repo(cfg)))


def apply_definitions(cfg: PlatformConfig):
    """Render the repo, register its objects (what `feast apply` does) and return the store."""
    from features.definitions import feast_objects

    store = open_store(cfg)
    store.apply(list(feast_objects(absolute_paths(cfg)).values()))
    return store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--apply", action="store_true", help="also register the definitions")
    parser.add_argument("--template", action="store_true",
                        help=f"rewrite {TEMPLATE_DIR / 'feature_store.yaml'} for the embedded profile")
    args = parser.parse_args(argv)
    if args.template:
        text = yaml.safe_dump(feature_store_yaml(absolute_paths(config.load(), PROJECT_ROOT), TEMPLATE_DIR),
                              sort_keys=False)
        (TEMPLATE_DIR / "feature_store.yaml").write_text(TEMPLATE_HEADER + text)
        print(TEMPLATE_DIR)
        return 0
    cfg = config.from_args(args)
    if args.apply:
        apply_definitions(cfg)
    print(render_repo(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
