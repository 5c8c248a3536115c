"""Secrets in the configuration (issue 20): `${NAME}` only in allow-listed keys, no value in any error, dumps
(what rendered files are written from) keep the reference; TLS settings for Redis and S3 validated."""

from __future__ import annotations

import traceback

import pytest
import yaml

import config
from config.schema import LakeConfig, OnlineStoreConfig

SECRET = "redis-host:6379,password=hunter2-do-not-print"


def _profile(tmp_path, text: str):
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def redis_secret(monkeypatch):
    monkeypatch.setenv("REDIS_CONNECTION_STRING", SECRET)


def test_references_expand_only_in_allow_listed_keys(tmp_path, redis_secret, monkeypatch):
    cfg = config.load(None, ["features.online_store.type=redis",
                             "features.online_store.connection_string=${REDIS_CONNECTION_STRING}"])
    assert cfg.features.online_store.connection_string == SECRET
    monkeypatch.setenv("STREAMREC_BUCKET", "bucket-1")
    assert config.load(None, ["lake.root=s3://${STREAMREC_BUCKET}/lake"]).lake.root == "s3://bucket-1/lake"
    # Elsewhere a reference is an error naming the key, and the secret is not expanded into it.
    for override in ("serving.api_key_env=${REDIS_CONNECTION_STRING}", "simulator.seed=${REDIS_CONNECTION_STRING}",
                     "features.project=x-${REDIS_CONNECTION_STRING}"):
        key = override.split("=")[0]
        with pytest.raises(config.ConfigError, match=rf"{key}: \$\{{\.\.\.\}} environment references are allowed "
                                                     "only in") as err:
            config.load(None, [override])
        assert "hunter2" not in str(err.value)
    path = _profile(tmp_path, "ingest:\n  file_patterns: ['${REDIS_CONNECTION_STRING}']\n")
    with pytest.raises(config.ConfigError, match=r"ingest.file_patterns\[0\]: "):
        config.load(path)


def test_malformed_or_unset_references_are_errors(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(config.ConfigError, match=r"lake\.root: environment variable NOT_SET_ANYWHERE is not set"):
        config.load(None, ["lake.root=s3://${NOT_SET_ANYWHERE}/lake"])
    with pytest.raises(config.ConfigError, match=r"lake.root: a \$\{\.\.\.\} reference must name a variable"):
        config.load(None, ["lake.root=s3://${bad-name}/lake"])


def test_validation_errors_never_echo_values(tmp_path, redis_secret):
    """The review's finding: a Redis password printed by a pydantic error. Every error path of the loader."""
    store = "features.online_store"
    redis = [f"{store}.type=redis"]
    cases = [
        # the secret's reference next to a value of the wrong type (timeout_ms is an int)
        [*redis, f"{store}.connection_string=${{REDIS_CONNECTION_STRING}}", f"{store}.timeout_ms=hunter2-do-not-print"],
        # malformed connection strings holding the password, and one whose TLS setting disagrees
        [*redis, f"{store}.connection_string=redis://:hunter2-do-not-print@h"],
        [*redis, f"{store}.connection_string=h:port,password=hunter2-do-not-print"],
        [*redis, f"{store}.connection_string=${{REDIS_CONNECTION_STRING}}", f"{store}.tls=true"],
        # an unknown key, an override without '=', YAML that does not parse
        [f"{store}.passwrd=hunter2-do-not-print"],
        [f"{store}.connection_string:hunter2-do-not-print"],
        [f"{store}.connection_string=[hunter2-do-not-print"],
    ]
    for overrides in cases:
        with pytest.raises(config.ConfigError) as err:
            config.load(None, overrides)
        printed = "".join(traceback.format_exception(err.value))  # what a failing stage's log shows
        assert "hunter2" not in printed, overrides
    path = _profile(tmp_path, "features:\n  online_store: {type: redis, connection_string: hunter2-do-not-print\n")
    with pytest.raises(config.ConfigError, match="not valid YAML at line") as err:
        config.load(path)
    assert "hunter2" not in str(err.value)
    # The models hide values themselves too (any code that validates without config.load).
    with pytest.raises(ValueError) as err:
        OnlineStoreConfig(type="redis", connection_string=SECRET, timeout_ms="hunter2-do-not-print")
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in repr(OnlineStoreConfig(type="redis", connection_string=SECRET))


def test_dumps_keep_the_reference_not_the_secret(tmp_path, redis_secret):
    """What rendered files are written from: the Feast repo's platform.yaml (features/repo.py), a profile a demo
    writes for a subprocess. The reference round-trips; a value replaced after loading is dumped as it is."""
    cfg = config.load(None, ["features.online_store.type=redis",
                             "features.online_store.connection_string=${REDIS_CONNECTION_STRING}",
                             f"features.feast_dir={tmp_path / 'feast'}"])
    dumped = cfg.model_dump(mode="json")
    assert dumped["features"]["online_store"]["connection_string"] == "${REDIS_CONNECTION_STRING}"
    assert "hunter2" not in cfg.model_dump_json() and "hunter2" not in yaml.safe_dump(cfg.model_dump())
    copied = cfg.model_copy(deep=True)
    assert "hunter2" not in str(copied.model_dump())
    reloaded = config.load(_profile(tmp_path, yaml.safe_dump(dumped)))
    assert reloaded.features.online_store.connection_string == SECRET

    from features.repo import PLATFORM_FILE, render_repo

    rendered = (render_repo(cfg) / PLATFORM_FILE).read_text()
    assert "hunter2" not in rendered and "${REDIS_CONNECTION_STRING}" in rendered

    copied.features.online_store.connection_string = "other:6379"
    assert copied.model_dump()["features"]["online_store"]["connection_string"] == "other:6379"


def test_redis_tls_option_validated():
    assert OnlineStoreConfig(type="redis", connection_string="h:6380,ssl=true,password=p", tls=True).tls
    assert OnlineStoreConfig(type="redis", connection_string="h1:6379,h2:6379,db=0").tls is False
    problems = {
        "needs ssl=true when features.online_store.tls is set": dict(connection_string="h:6379", tls=True),
        "has ssl=true; set features.online_store.tls": dict(connection_string="h:6379,ssl=true"),
        "not a redis:// or rediss:// URL": dict(connection_string="rediss://h:6379", tls=True),
        "must start with host:port": dict(connection_string="h:port,db=0"),
        "ssl_cert_reqs=none turns certificate checks off": dict(connection_string="h:1,ssl=true,ssl_cert_reqs=none",
                                                               tls=True),
        "connection_string is required for redis": dict(connection_string=None),
    }
    for message, fields in problems.items():
        with pytest.raises(ValueError, match=message):
            OnlineStoreConfig(type="redis", **fields)
    assert OnlineStoreConfig(type="sqlite").connection_string is None


def test_s3_tls_option_validated(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    assert LakeConfig(storage_options={"AWS_ENDPOINT_URL": "https://s3.example.com"}).s3_allow_http is False
    assert LakeConfig(storage_options={"AWS_ALLOW_HTTP": "true"}, s3_allow_http=True).s3_allow_http
    problems = {
        "sends S3 traffic unencrypted": {"AWS_ENDPOINT_URL": "http://minio:9000"},
        "AWS_ALLOW_HTTP or an http://": {"AWS_ALLOW_HTTP": "TRUE"},
        "turns S3 certificate checks off": {"AWS_ALLOW_INVALID_CERTIFICATES": "true"},
        r"\['AWS_SECRET_ACCESS_KEY'\] are credentials": {"aws_secret_access_key": "k"},
    }
    for message, options in problems.items():
        with pytest.raises(ValueError, match=message):
            LakeConfig(storage_options=options)
    # pyarrow and boto3 read the endpoint from the environment: config.load holds it to the same rule.
    on_s3 = ["lake.root=s3://bucket/lake"]
    assert config.load(None, on_s3).lake.root == "s3://bucket/lake"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    with pytest.raises(config.ConfigError, match="sends S3 traffic over plain http"):
        config.load(None, on_s3)
    assert config.load(None, [*on_s3, "lake.s3_allow_http=true"]).lake.s3_allow_http
    assert config.load(None).lake.root == "data/lake"  # a local lake never talks to S3
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    with pytest.raises(config.ConfigError, match="sends S3 traffic over plain http"):
        config.load(None, on_s3)


@pytest.mark.parametrize("profile", ["embedded", "cluster", "movielens", "rehearsal"])
def test_repository_profiles_load(profile, monkeypatch, tmp_path):
    for name, value in {"REDIS_CONNECTION_STRING": SECRET, "STREAMREC_BUCKET": "b", "STREAMREC_SCRATCH": str(tmp_path),
                        "STREAMREC_SERVE_PORT": "8123", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}.items():
        monkeypatch.setenv(name, value)
    cfg = config.load(profile)
    assert cfg.profile == profile
    assert "hunter2" not in str(cfg.model_dump())


def test_config_docstring_examples(monkeypatch):
    import doctest

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    result = doctest.testmod(config)
    assert result.failed == 0 and result.attempted > 0
