"""One ingestion run at a time per lake: a lease made of create-if-absent objects in the lake.

The lease is a folder of immutable records `<generation>.json` (holder, expiry, released). The record
with the highest generation says who holds the lease. Taking it, renewing it and handing it back all
create the next generation with a conditional create that only one writer can win: locally a no-clobber
link (atomic on one filesystem), on S3 a PUT with `If-None-Match: *`. No record is ever overwritten, so
there is no read-modify-write to race on.

A holder that crashes stops renewing; its lease expires after `ttl_s` (a holder on the same host whose
process is gone is seen at once). A second run waits up to `wait_s` for the lease, then fails with
`LeaseHeldError` naming the holder. A holder that renews too late (another run took the expired lease)
gets `LeaseLostError` and must stop.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import UTC, datetime

import pyarrow.fs as pafs

import storage

KEEP_GENERATIONS = 8  # older records are deleted by the next holder


class LeaseHeldError(RuntimeError):
    """Another run holds the lease and did not give it back within the wait."""


class LeaseLostError(RuntimeError):
    """This run's lease expired and another run took it: this run must stop writing."""


def _pid_gone(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return False  # another machine's processes are not ours to see: only the expiry counts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """The ingestion lease of one lake, held with `with lease:` or acquire() / release()."""

    def __init__(self, folder: str, ttl_s: float, wait_s: float, storage_options: dict[str, str] | None = None):
        self.folder = folder.rstrip("/")
        self.fs, self.path = storage.filesystem(self.folder)
        self.ttl_s, self.wait_s = ttl_s, wait_s
        # The profile may name the endpoint (lake.storage_options); otherwise boto3 reads AWS_* itself.
        self.options = dict(storage_options or {})
        if not storage.is_remote(self.folder):
            os.makedirs(self.path, exist_ok=True)  # listed before the first record exists
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self.generation = 0  # 0 = not held
        self.renewed_at = 0.0

    # -- records ----------------------------------------------------------------------------
    def _generations(self) -> list[int]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(int(i.base_name[:-5]) for i in infos
                      if i.type == pafs.FileType.File and i.base_name.endswith(".json") and i.base_name[:-5].isdigit())

    def _read(self, generation: int) -> dict:
        with self.fs.open_input_stream(f"{self.path}/{generation:012d}.json") as fh:
            return json.loads(fh.read())

    def _create(self, generation: int, record: dict) -> bool:
        """Create record `generation` unless it exists; True when this call created it."""
        name = f"{generation:012d}.json"
        body = json.dumps(record).encode()
        if not storage.is_remote(self.folder):
            tmp = f"{self.path}/.{name}.{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, f"{self.path}/{name}")  # fails rather than replace an existing record
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return self._put_if_absent(f"{self.path}/{name}", body)

    def _put_if_absent(self, path: str, body: bytes) -> bool:
        # pyarrow's S3 filesystem has no conditional write; boto3 does (S3, MinIO and moto honour it).
        import boto3
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        client = boto3.client("s3", endpoint_url=self.options.get("AWS_ENDPOINT_URL"),
                              region_name=self.options.get("AWS_REGION"))
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as err:
            # 412: the record exists; 409: a concurrent conditional PUT of the same key is in flight.
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def _record(self, expires_at: float, released: bool = False) -> dict:
        return {**self.holder, "expires_at": expires_at, "released": released}

    def _free(self, record: dict, now: float) -> bool:
        return record["released"] or record["expires_at"] <= now or _pid_gone(record["host"], record["pid"])

    # -- holding ----------------------------------------------------------------------------
    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        while True:
            generations = self._generations()
            latest = generations[-1] if generations else 0
            record = self._read(latest) if latest else None
            now = time.time()
            if record is None or self._free(record, now):
                if self._create(latest + 1, self._record(now + self.ttl_s)) and self._still_latest(latest + 1):
                    self.generation, self.renewed_at = latest + 1, now
                    for old in generations[:-KEEP_GENERATIONS]:
                        self.fs.delete_file(f"{self.path}/{old:012d}.json")
                    return
                continue  # another run won this generation: look again
            if time.monotonic() >= deadline:
                until = datetime.fromtimestamp(record["expires_at"], tz=UTC).isoformat(timespec="seconds")
                raise LeaseHeldError(
                    f"another ingestion run holds the lake's lease ({self.folder}): host {record['host']}, "
                    f"pid {record['pid']}, until {until} unless renewed; waited {self.wait_s:g}s "
                    "(ingest.lease_wait_s). Run again when it has finished.")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _still_latest(self, generation: int) -> bool:
        # A run that listed long ago may create a generation that was already deleted below the latest.
        if self._generations()[-1] == generation:
            return True
        self.fs.delete_file(f"{self.path}/{generation:012d}.json")
        return False

    def renew(self) -> None:
        """Extend the lease (a new generation) once a third of it has passed; call between units of work."""
        now = time.time()
        if now < self.renewed_at + self.ttl_s / 3:
            return
        if not self._create(self.generation + 1, self._record(now + self.ttl_s)):
            raise LeaseLostError(
                f"this run's ingestion lease ({self.folder}) expired and another run took it: stopping. "
                f"A batch took longer than ingest.lease_ttl_s={self.ttl_s:g}s; raise it.")
        self.generation, self.renewed_at = self.generation + 1, now

    def release(self) -> None:
        # Losing this race means another run already took the expired lease: nothing to hand back.
        if self.generation:
            self._create(self.generation + 1, self._record(time.time(), released=True))
            self.generation = 0

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
