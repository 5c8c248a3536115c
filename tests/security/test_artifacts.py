"""Artifacts load only when the manifest vouches for exactly the files present (issue 20): none missing, none
extra, not empty, every sha256 matching; the error names the file. Local folders and s3:// alike."""

from __future__ import annotations

import json
import os

import pytest
import torch

import storage
from ray_jobs.local_cluster import S3Server
from training.artifact import MANIFEST, WEIGHTS, load_artifact, save_artifact


def _tiny_model():
    from models.hstu import HSTUConfig
    from models.retrieval import HSTURetrieval

    cfg = HSTUConfig(d_model=8, num_blocks=1, num_heads=1, d_qk=8, d_v=8, max_len=10, dropout=0.0)
    return HSTURetrieval(cfg, num_items=30), {"cfg": cfg, "num_items": 30}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, bytes]:
    """One good artifact's files, name -> bytes."""
    folder = tmp_path_factory.mktemp("artifact") / "good"
    save_artifact(folder, *_tiny_model())
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def _manifest(files: dict[str, bytes]) -> dict:
    return json.loads(files[MANIFEST])


def _with_manifest(folder: dict[str, bytes], **changes) -> dict[str, bytes]:
    return {**folder, MANIFEST: json.dumps({**_manifest(folder), **changes}).encode()}


def _without(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != name}


def _cases(saved: dict[str, bytes]) -> dict[str, tuple[dict[str, bytes], str]]:
    """Tampered copies of `saved` and the error each must raise."""
    listed = _manifest(saved)["files"]
    other_weights = torch.zeros(4).numpy().tobytes()
    return {
        # The review's finding: `files: {}` checked nothing and loaded the weights.
        "empty list": (_with_manifest(saved, files={}), "lists no files"),
        "no list": (_with_manifest(saved, files=None), "lists no files"),
        "weights not listed": (_with_manifest(saved, files=_without(listed, WEIGHTS)),
                               r"manifest\.json does not list weights\.safetensors"),
        "extra file": ({**saved, "extra.pt": b"pickle"}, r"extra\.pt in the folder but not listed"),
        "nested extra file": ({**saved, "sub/x.bin": b"x"}, r"sub/x\.bin in the folder but not listed"),
        "missing file": (_without(saved, "metrics.json"), r"metrics\.json listed in manifest\.json but missing"),
        "escaping name": (_with_manifest(saved, files={**listed, "../outside.json": "0" * 64}),
                          r"\.\./outside\.json listed in manifest\.json but missing"),
        "not a digest": (_with_manifest(saved, files={**listed, WEIGHTS: "abc"}),
                         r"gives no sha256 .* for weights\.safetensors"),
        "changed weights": ({**saved, WEIGHTS: saved[WEIGHTS][:-len(other_weights)] + other_weights},
                            r"weights\.safetensors: sha256 does not match"),
        "manifest not an object": ({**saved, MANIFEST: b"[]"}, r"manifest\.json: not a JSON object"),
    }


def _write(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)


def test_intact_artifact_loads(saved, tmp_path):
    _write(str(tmp_path / "a"), saved)
    _, manifest = load_artifact(tmp_path / "a")
    assert manifest.version == _manifest(saved)["version"]


def test_local_artifact_refused_unless_manifest_matches_the_folder(saved, tmp_path):
    for case, (files, message) in _cases(saved).items():
        folder = str(tmp_path / case.replace(" ", "-"))
        _write(folder, files)
        with pytest.raises(ValueError, match=message):
            load_artifact(folder)


@pytest.fixture(scope="module")
def s3():
    saved_env = dict(os.environ)
    with S3Server(bucket="security") as server:
        os.environ.update(server.env)
        yield f"s3://{server.bucket}"
    os.environ.clear()
    os.environ.update(saved_env)


def test_s3_artifact_refused_unless_manifest_matches_the_folder(saved, s3, monkeypatch):
    downloads, download_dir = [], storage.download_dir

    def recorded_download(uri: str, local: str) -> None:
        downloads.append(uri)
        download_dir(uri, local)

    monkeypatch.setattr(storage, "download_dir", recorded_download)
    for case, (files, message) in _cases(saved).items():
        uri = storage.join(s3, "artifacts", case.replace(" ", "-"))
        _write(uri, files)
        with pytest.raises(ValueError, match=message) as err:
            load_artifact(uri)
        if "sha256 does not match" not in message and "JSON object" not in message:
            assert uri in str(err.value), case  # refused on the remote listing, before any download
    # Only the copy whose listing is right but whose bytes are wrong is downloaded (its hash is checked locally).
    assert [uri.rsplit("/", 1)[1] for uri in downloads] == ["changed-weights"]
    _write(storage.join(s3, "artifacts", "good"), saved)
    assert load_artifact(storage.join(s3, "artifacts", "good"))[1].folder == storage.join(s3, "artifacts", "good")
