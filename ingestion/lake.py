"""Delta Lake helpers: create tables with the contract's schema, idempotent appends.

Exactly-once rests on Delta application transactions: every append carries
(app_id, version = ingestion batch number) in the same atomic commit as its data, and an
append happens only if the table's recorded version for that app is older. A replay of the same
batch therefore never duplicates rows, whatever moment a previous run died at. The check and the
append are one optimistic transaction: the commit is made against the snapshot that was checked, and
delta-rs refuses it if a concurrent commit for the same app landed in between (no check-then-write race).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction

INGEST_APP_ID = "streamrec-ingest"


def open_or_create(path: str, schema: pa.Schema, partition_by: list[str] | None = None,
                   storage_options: dict[str, str] | None = None) -> DeltaTable:
    """Open the table, creating it when missing. Not safe against a concurrent creator (delta-rs may then commit
    a second CREATE TABLE): the ingestion job calls it only while holding the lake's lease."""
    try:
        return DeltaTable(path, storage_options=storage_options or None)
    except TableNotFoundError:
        return DeltaTable.create(path, schema, partition_by=partition_by, mode="ignore",
                                 storage_options=storage_options or None)


def committed_version(table: DeltaTable, app_id: str = INGEST_APP_ID) -> int:
    """The last batch number committed to this table by `app_id` (0 when none)."""
    table.update_incremental()
    return table.transaction_version(app_id) or 0


def _commit_once(table: DeltaTable, batch_no: int, app_id: str, commit) -> bool:
    """Run `commit(CommitProperties)` unless the table already holds batch `batch_no` of `app_id`."""
    if committed_version(table, app_id) >= batch_no:
        return False
    try:
        # The table object, not its URI: the commit's read version is the one checked above.
        commit(CommitProperties(app_transactions=[Transaction(app_id=app_id, version=batch_no)],
                                custom_metadata={"ingest_batch": str(batch_no)}))
    except CommitFailedError:
        if committed_version(table, app_id) >= batch_no:
            return False
        raise
    return True


def append_once(table: DeltaTable, data: pa.Table | Iterable[pa.RecordBatch], schema: pa.Schema,
                batch_no: int, partition_by: list[str] | None = None, app_id: str = INGEST_APP_ID) -> bool:
    """Append `data` with transaction (app_id, batch_no) unless that batch is already committed.

    Returns True when it committed, False when the table already held the batch (also when a concurrent
    writer committed it first). Rows and the transaction marker land in one commit, so a crash leaves
    either both or neither. Raises CommitFailedError when a concurrent commit of another batch of the same
    app got in between: two writers are interleaving batches, which the ingestion lease should prevent.
    """
    data = data.cast(schema) if isinstance(data, pa.Table) else pa.RecordBatchReader.from_batches(schema, data)
    return _commit_once(table, batch_no, app_id, lambda properties: write_deltalake(
        table, data, mode="append", partition_by=partition_by, commit_properties=properties))


def commit_once(table: DeltaTable, data_files: list[AddAction], schema: pa.Schema, batch_no: int,
                partition_by: list[str] | None = None, app_id: str = INGEST_APP_ID) -> bool:
    """`append_once` for data files already written into the table's folder (`ingestion.staging`): one commit
    adds them all with the transaction marker (none: the marker alone, for a batch with no rows)."""
    return _commit_once(table, batch_no, app_id, lambda properties: table.create_write_transaction(
        data_files, "append", schema, partition_by=partition_by, commit_properties=properties))
