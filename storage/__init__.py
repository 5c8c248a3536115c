"""One filesystem layer for every file a stage reads or writes: local paths and `s3://` URIs alike.

Artifacts, checkpoints, the landing folder, exported sequences and oracle files all go through here
(Delta tables go through delta-rs, Ray Train through its own pyarrow filesystem; both read the same
environment). Remote endpoints and credentials come only from the environment, never from a file in
the repository: `AWS_ENDPOINT_URL` (MinIO, a local S3 server), `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or an IRSA / workload-identity token,
which pyarrow's S3 client picks up itself).

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> write_json(join(root, "a", "b.json"), {"x": 1})
>>> read_json(join(root, "a", "b.json")), exists(join(root, "a")), list_files(join(root, "a"))
({'x': 1}, True, ['b.json'])
>>> join("s3://bucket/lake", "events", "x.parquet")
's3://bucket/lake/events/x.parquet'
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from typing import Any

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than file:// (s3://, gs://, ...)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts with '/' without touching the scheme (pathlib would turn s3://b into s3:/b)."""
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(uri, *parts)


def local_path(uri: str) -> str:
    """A local path or file:// URI as an absolute local path."""
    uri = str(uri)
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it. `s3://` takes its endpoint and credentials from the
    environment (pyarrow reads AWS_ENDPOINT_URL and the AWS variables itself)."""
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """Names of the files under a folder (relative to it, sorted; [] when the folder is missing)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    prefix = path.rstrip("/") + "/"
    return sorted(i.path[len(prefix):] for i in infos if i.type == pafs.FileType.File)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Locally through a temporary file and a rename, so readers never see half of it;
    an object store's PUT is atomic by itself."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, (json.dumps(value, indent=1) + "\n").encode())


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_file(local: str, uri: str) -> None:
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local: str) -> None:
    """Copy every file under `uri` into the local folder `local` (created)."""
    fs, path = filesystem(uri)
    os.makedirs(local, exist_ok=True)
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
