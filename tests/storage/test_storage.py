"""One filesystem layer for local paths and s3:// (storage/), against a real S3 server on 127.0.0.1 (moto)."""

from __future__ import annotations

import os

import pytest
import torch

import storage
from ray_jobs.local_cluster import S3Server
from training.artifact import artifact_version, load_artifact, save_artifact


@pytest.fixture(scope="module")
def s3():
    saved = dict(os.environ)
    with S3Server(bucket="unit") as server:
        os.environ.update(server.env)  # endpoint and keys from the environment only, as in a pod
        yield f"s3://{server.bucket}"
    os.environ.clear()
    os.environ.update(saved)


def test_join_keeps_the_scheme():
    # pathlib.Path("s3://b/x") would give "s3:/b/x": the bug that sent artifacts nowhere.
    assert storage.join("s3://b/root/", "a", "/c.json") == "s3://b/root/a/c.json"
    assert storage.join("/tmp/x", "a") == "/tmp/x/a"
    assert storage.is_remote("s3://b") and not storage.is_remote("file:///tmp") and not storage.is_remote("rel/x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip(where, s3, tmp_path):
    root = storage.join(s3, "files") if where == "s3" else str(tmp_path)
    storage.write_json(storage.join(root, "a", "b.json"), {"x": [1, 2]})
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"\x00\x01")
    assert storage.read_json(storage.join(root, "a", "b.json")) == {"x": [1, 2]}
    assert storage.list_files(storage.join(root, "a")) == ["b.json", "c.bin"]
    assert storage.list_files(storage.join(root, "missing")) == []
    assert storage.exists(storage.join(root, "a", "c.bin")) and not storage.exists(storage.join(root, "nope"))
    storage.delete_dir(storage.join(root, "a"))
    assert storage.list_files(storage.join(root, "a")) == []


def _tiny_model():
    from models.hstu import HSTUConfig
    from models.retrieval import HSTURetrieval

    cfg = HSTUConfig(d_model=8, num_blocks=1, num_heads=1, d_qk=8, d_v=8, max_len=10, dropout=0.0)
    return HSTURetrieval(cfg, num_items=30), {"cfg": cfg, "num_items": 30}


def test_artifact_on_s3_round_trips_and_refuses_tampering(s3, tmp_path):
    model, config = _tiny_model()
    uri = storage.join(s3, "artifacts", "hstu")
    manifest = save_artifact(uri, model, config, {"dataset": "toy"}, {"hr@10": 0.5})
    assert manifest.folder == uri and artifact_version(uri) == manifest.version
    loaded, read = load_artifact(uri)
    assert read.folder == uri and read.version == manifest.version
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="already exists"):
        save_artifact(uri, model, config)
    # A copy whose weights changed after the manifest was written: the load names the file, nothing is served.
    bad = storage.join(s3, "artifacts", "hstu-bad")
    for name in storage.list_files(uri):
        data = storage.read_bytes(storage.join(uri, name))
        storage.write_bytes(storage.join(bad, name), data[:-8] + bytes(8) if name == "weights.safetensors" else data)
    with pytest.raises(ValueError, match=r"weights\.safetensors: sha256 does not match"):
        load_artifact(bad)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        load_artifact(storage.join(s3, "artifacts", "nothing-here"))


