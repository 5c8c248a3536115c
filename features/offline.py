"""The feature tables in the lake (Delta) and the DuckDB that reads them the way Feast's offline store does.

Feast reads the feature tables through its DuckDB offline store (`FileSource(file_format=DeltaFormat())`),
which scans them with DuckDB's delta extension: it follows the Delta log, so files that a rewrite or
compaction removed are never read, however long they stay on disk before a vacuum. The extension binary
comes from the `duckdb-ext-delta` wheel and is installed with DuckDB's own `INSTALL '<file>'` into DuckDB's
extension folder, so every process (including the `feast` CLI) finds it without network access.

Writes go through `replace_from`: one Delta commit that replaces every row at or after a time with the
new rows (a predicate overwrite). A re-run after a crash, or after late events, therefore rewrites the
same range instead of appending duplicates.

>>> con = duckdb_connection()
>>> con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'delta'").fetchone()
(True,)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
from deltalake import ColumnProperties, CommitProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import TableNotFoundError

from features.spec import ENTITY_KEYS, SEQUENCE_FIELDS, FeatureStoreSpec
from ingestion.contract import TS_TYPE

if TYPE_CHECKING:  # imported where used: the feature job's Ray workers import this module for its schemas only
    import duckdb

PARTITION_BY = ["dt"]
FEATURE_TABLES = {"item": "features_item_stats", "author": "features_author_stats",
                  "user": "features_user_stats", "sequence": "features_user_sequence"}


# delta reads the tables; httpfs defines S3 secrets (delta_scan hands them to its object store); aws resolves
# credentials by the AWS chain (IRSA / workload identity) when no key is in the environment.
EXTENSIONS = ("delta", "httpfs", "aws")


@functools.cache
def install_delta_extension() -> None:
    """Install DuckDB's delta, httpfs and aws extensions from their PyPI wheels (no download), once per process."""
    import duckdb
    import duckdb_ext

    folder = Path(duckdb_ext.__path__[0]) / "extensions" / f"v{duckdb.__version__}"
    con = duckdb.connect()
    installed = dict(con.execute("SELECT extension_name, installed FROM duckdb_extensions()").fetchall())
    for name in EXTENSIONS:
        if not installed.get(name):
            con.execute(f"INSTALL '{next(folder.glob(f'*/{name}.duckdb_extension'))}'")
    con.close()


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the delta extension loaded (`delta_scan('<table path>')`) and, when the
    environment names S3 settings, an S3 secret built from them (DuckDB does not read AWS_* variables itself, and
    without a secret it asks the cloud metadata endpoint)."""
    import duckdb

    install_delta_extension()
    con = duckdb.connect()
    con.execute("LOAD delta")
    con.execute("SET TimeZone = 'UTC'")
    secret = s3_secret_sql(os.environ)
    if secret:
        con.execute(secret)
    return con


def configure_feast_duckdb() -> None:
    """The same S3 secret on ibis' default DuckDB connection, the one Feast's DuckDB offline store reads Delta
    tables with (`ibis.read_delta`); a no-op without S3 settings in the environment."""
    secret = s3_secret_sql(os.environ)
    if secret:
        import ibis

        ibis.get_backend().raw_sql(secret)


def s3_secret_sql(env) -> str | None:
    """`CREATE SECRET` for DuckDB from the same variables pyarrow and delta-rs read (storage/); None without any.

    >>> s3_secret_sql({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "k",
    ...                "AWS_SECRET_ACCESS_KEY": "s"}).split("(")[1]
    "TYPE s3, KEY_ID 'k', SECRET 's', REGION 'us-east-1', ENDPOINT '127.0.0.1:9000', URL_STYLE 'path', USE_SSL false)"
    """
    if not any(k in env for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE")):
        return None

    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    parts = ["TYPE s3"]
    if env.get("AWS_ACCESS_KEY_ID"):
        parts += [f"KEY_ID {quoted(env['AWS_ACCESS_KEY_ID'])}",
                  f"SECRET {quoted(env.get('AWS_SECRET_ACCESS_KEY', ''))}"]
        if env.get("AWS_SESSION_TOKEN"):
            parts.append(f"SESSION_TOKEN {quoted(env['AWS_SESSION_TOKEN'])}")
    else:
        parts.append("PROVIDER credential_chain")
    parts.append(f"REGION {quoted(env.get('AWS_REGION') or env.get('AWS_DEFAULT_REGION') or 'us-east-1')}")
    endpoint = env.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        parts += [f"ENDPOINT {quoted(host.rstrip('/'))}", "URL_STYLE 'path'",
                  f"USE_SSL {str(scheme == 'https').lower()}"]
    return f"CREATE OR REPLACE SECRET streamrec_s3 ({', '.join(parts)})"


def stats_schema(spec: FeatureStoreSpec, entity: str) -> pa.Schema:
    """Columns of an entity's stats table: key, time, the named stats, the packed `stats` vector, dt."""
    fields = [pa.field(ENTITY_KEYS[entity], pa.int64(), nullable=False),
              pa.field("event_timestamp", TS_TYPE, nullable=False), pa.field("asof_ms", pa.int64())]
    if entity == "item":
        fields.append(pa.field("item_author_id", pa.int64()))
    counts = set(spec.count_stat_names)
    fields += [pa.field(name, pa.int64() if name in counts else pa.float64()) for name in spec.stat_names]
    fields += [pa.field("stats", pa.list_(pa.float64())), pa.field("dt", pa.string(), nullable=False)]
    return pa.schema(fields)


SEQUENCE_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False), pa.field("event_timestamp", TS_TYPE, nullable=False),
    pa.field("asof_ms", pa.int64()), *(pa.field(f, pa.list_(pa.int64())) for f in SEQUENCE_FIELDS),
    pa.field("dt", pa.string(), nullable=False),
])


def table_schema(spec: FeatureStoreSpec, kind: str) -> pa.Schema:
    """The schema of a feature table: kind is an entity (`item`, `author`, `user`) or `sequence`."""
    return SEQUENCE_SCHEMA if kind == "sequence" else stats_schema(spec, kind)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def open_table(path: str, storage_options: dict[str, str] | None = None) -> DeltaTable | None:
    """The Delta table at `path`, or None when there is none yet."""
    try:
        return DeltaTable(path, storage_options=storage_options or None)
    except TableNotFoundError:
        return None


def writer_properties(spec: FeatureStoreSpec, kind: str) -> WriterProperties:
    """Parquet settings of a feature table. Dictionary encoding and statistics took more than half of the
    writes (the job's largest cost): both are off but for the keys and times, the columns readers filter on
    and the Delta log keeps statistics of. Files grow ~3x and stay ~10x smaller than the rows in memory."""
    plain = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
    filtered = [ENTITY_KEYS["user" if kind == "sequence" else kind], "event_timestamp", "asof_ms", "item_author_id"]
    return WriterProperties(compression="LZ4_RAW", default_column_properties=plain, column_properties={
        name: ColumnProperties(dictionary_enabled=False, statistics_enabled="CHUNK") for name in filtered})


def replace_from(path: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema, from_ms: int,
                 storage_options: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
                 properties: WriterProperties | None = None) -> None:
    """Replace every row with event_timestamp >= from_ms by `batches`, in one Delta commit."""
    opts = storage_options or None
    if open_table(path, storage_options) is None:
        DeltaTable.create(path, schema, partition_by=PARTITION_BY, mode="ignore", storage_options=opts)
    since = ms_to_datetime(from_ms).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    reader = pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in batches))
    write_deltalake(path, reader, mode="overwrite", predicate=f"event_timestamp >= '{since}'",
                    partition_by=PARTITION_BY, storage_options=opts, writer_properties=properties,
                    commit_properties=CommitProperties(custom_metadata=metadata or {}))
