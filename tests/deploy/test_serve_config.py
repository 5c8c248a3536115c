"""serveConfigV2 is generated from serving/config.yaml: the committed patch must agree with it."""

from __future__ import annotations

import pytest
import yaml

from k8s import serve_config
from k8s.pipeline.pipeline import SERVE_ARTIFACTS
from tests.deploy.conftest import OVERLAYS, find, rendered

SAMPLE = """
proxy_location: HeadOnly
http_options: {host: 127.0.0.1, port: 8001, request_timeout_s: 10}
applications:
  - name: streamrec
    route_prefix: /
    import_path: serving.app:build_app
    runtime_env: {working_dir: ., env_vars: {A: "1"}, pip: [torch]}
    args: {config: embedded, overrides: []}
    deployments:
      - {name: Ranker, num_replicas: 2, max_ongoing_requests: 32, user_config: {artifact: data/artifacts/ranker}}
"""


def _source():
    if not serve_config.SOURCE.exists():
        pytest.skip(f"{serve_config.SOURCE} is missing (the serving application is not in this checkout)")
    return serve_config.SOURCE


def test_committed_patch_matches_serving_config():
    assert serve_config.TARGET.read_text() == serve_config.render_patch(_source()), \
        "k8s/base/serve-config.yaml is stale: run python -m k8s.serve_config"


def test_committed_prod_patch_matches_serving_config_and_autoscaling():
    fresh = serve_config.render_patch(_source(), serve_config.load_autoscaling())
    assert serve_config.PROD_TARGET.read_text() == fresh, "the prod patch is stale: run python -m k8s.serve_config"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_rayservice_carries_the_serving_config(overlay):
    source = yaml.safe_load(_source().read_text())
    svc = find(rendered(f"k8s/overlays/{overlay}"), "RayService")[0]
    v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    autoscaling = serve_config.load_autoscaling() if overlay == "prod" else {}
    assert v2 == serve_config.serve_config_v2(source, autoscaling)
    # Everything Serve tunes (limits, user_config) is the file's; in prod, replica counts of the deployments
    # in serve-autoscaling.yaml become its autoscaling_config.
    for app, mine in zip(source["applications"], v2["applications"], strict=True):
        assert app["import_path"] == mine["import_path"]
        for theirs, ours in zip(app["deployments"], mine["deployments"], strict=True):
            if ours["name"] in autoscaling:
                assert ours == {**{k: v for k, v in theirs.items() if k != "num_replicas"},
                                "autoscaling_config": autoscaling[ours["name"]]}
            else:
                assert ours == theirs


def test_serving_step_targets_deployments_that_exist():
    source = yaml.safe_load(_source().read_text())
    names = {d["name"] for app in source["applications"] for d in app.get("deployments") or []}
    assert set(SERVE_ARTIFACTS.values()) <= names


def test_generator_rewrites_only_what_a_cluster_needs(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(SAMPLE)
    patch = yaml.safe_load(serve_config.render_patch(path))
    assert patch["kind"] == "RayService" and patch["metadata"]["name"] == "streamrec-serve"
    v2 = yaml.safe_load(patch["spec"]["serveConfigV2"])
    app = v2["applications"][0]
    assert v2["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 10}
    assert v2["proxy_location"] == "HeadOnly"
    assert app["runtime_env"] == {"env_vars": {"A": "1"}}  # code and packages come from the image
    assert app["args"] == {"config": "/etc/streamrec/profile.yaml", "overrides": []}
    assert app["deployments"] == yaml.safe_load(SAMPLE)["applications"][0]["deployments"]
    out, prod = tmp_path / "patch.yaml", tmp_path / "prod.yaml"
    (tmp_path / "autoscaling.yaml").write_text("Ranker: {min_replicas: 1, max_replicas: 4}\n")
    argv = ["--source", str(path), "--out", str(out), "--prod-out", str(prod),
            "--autoscaling", str(tmp_path / "autoscaling.yaml")]
    assert serve_config.main([*argv, "--check"]) == 1
    assert serve_config.main(argv) == 0
    assert serve_config.main([*argv, "--check"]) == 0
    prod_app = yaml.safe_load(yaml.safe_load(prod.read_text())["spec"]["serveConfigV2"])["applications"][0]
    assert prod_app["deployments"] == [{"name": "Ranker", "max_ongoing_requests": 32, "user_config": {
        "artifact": "data/artifacts/ranker"}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}]
    with pytest.raises(ValueError, match="do not exist"):
        serve_config.serve_config_v2(yaml.safe_load(SAMPLE), {"Nope": {"max_replicas": 2}})
    path.write_text("applications: []\n")
    with pytest.raises(ValueError, match="applications"):
        serve_config.render_patch(path)
