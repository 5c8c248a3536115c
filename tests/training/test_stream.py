"""The sample stream: file order from the Delta log, each worker's feed against a plain read, stream position bits,
prediction files and rollback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake

from features.sample_contract import RankingContract
from training.stream import PredictionLog, SampleStream, StreamPosition

META = RankingContract(kind="ratings", tasks=("like", "love"), stat_names=("a", "b"), num_users=3, num_items=9,
                       num_authors=0).to_metadata()


def write_samples(path, ranges: list, row_group_rows: int | None = None) -> None:
    """One commit per range (each becomes its own file), with the sample builder's commit metadata."""
    props = WriterProperties(max_row_group_size=row_group_rows) if row_group_rows else None
    for i, r in enumerate(ranges):
        nos = list(r)
        table = pa.table({"sample_no": pa.array(nos, pa.int64()), "user_id": pa.array([n % 5 for n in nos], pa.int64()),
                          "ts": pa.array([[n, n + 1] for n in nos], pa.list_(pa.int64()))})
        write_deltalake(str(path), table, mode="overwrite" if i == 0 else "append", writer_properties=props,
                        commit_properties=CommitProperties(custom_metadata=META))


def test_files_come_in_sample_order_and_max_requests_limits(tmp_path):
    write_samples(tmp_path / "s", [range(10, 20), range(0, 10), range(20, 25)])
    stream = SampleStream.open(str(tmp_path / "s"))
    assert stream.num_samples == 25 and stream.contract == RankingContract.from_metadata(META, "s")
    firsts = [pa.parquet.read_table(f.replace("file://", ""))["sample_no"][0].as_py() for f in stream.files]
    assert firsts == [0, 10, 20]
    limited = SampleStream.open(str(tmp_path / "s"), max_requests=12)
    assert limited.num_samples == 12 and len(limited.files) == 2 and limited.rows_in_files == 20


def test_rows_that_are_not_0_to_n_each_once_are_refused(tmp_path):
    write_samples(tmp_path / "dup", [range(0, 10), range(5, 15)])
    with pytest.raises(ValueError, match=r"0\.\.14 over 20 rows, not 0\.\.N-1 each once"):
        SampleStream.open(str(tmp_path / "dup"))
    write_samples(tmp_path / "late", [range(3, 10)])
    with pytest.raises(ValueError, match=r"not 0\.\.N-1"):
        SampleStream.open(str(tmp_path / "late"))


@pytest.mark.parametrize("world", [1, 2])
def test_files_that_overlap_in_sample_no_are_merged(tmp_path, world):
    """delta-rs can write one partition's rows to two files at once: the files' ranges then overlap (2M-event
    simulator: 104,524..172,287 and 140,000..196,383)."""
    write_samples(tmp_path / "s", [[*range(0, 30), *range(50, 60)], range(30, 50), range(60, 70)], row_group_rows=8)
    stream, rows, b = SampleStream.open(str(tmp_path / "s")), plain_read(tmp_path / "s"), 6
    assert stream.num_samples == 70
    for r in range(world):
        got = [t.select(rows.column_names).to_pylist() for t in stream.shard(["user_id", "ts"], b, r, world)]
        assert got == [rows.slice(i * b, b).to_pylist() for i in range(r, -(-70 // b), world)]


def test_a_table_without_builder_metadata_is_refused(tmp_path):
    write_deltalake(str(tmp_path / "s"), pa.table({"sample_no": [0, 1]}))
    with pytest.raises(ValueError, match=r"ray_jobs\.samples"):
        SampleStream.open(str(tmp_path / "s"))


def test_a_table_from_before_the_contract_is_refused_with_the_fix(tmp_path):
    old = {k: META[k] for k in ("kind", "tasks", "stat_names")}
    write_deltalake(str(tmp_path / "s"), pa.table({"sample_no": [0, 1]}),
                    commit_properties=CommitProperties(custom_metadata=old))
    with pytest.raises(ValueError, match=r"lacks \['num_users', 'num_items', 'num_authors'\].*ray_jobs\.samples"):
        SampleStream.open(str(tmp_path / "s"))


def test_stream_head_reads_the_first_samples_in_order(tmp_path):
    write_samples(tmp_path / "s", [range(10, 20), range(0, 10)])
    stream = SampleStream.open(str(tmp_path / "s"))
    assert stream.head(["sample_no"], 12)["sample_no"].to_pylist() == list(range(12))
    assert stream.head(["sample_no"], 99).num_rows == 20


def plain_read(path) -> pa.Table:
    """The table read by delta-rs alone, in sample order: what the feed must hand out."""
    table = DeltaTable(str(path)).to_pyarrow_table()
    return table.take(pa.compute.sort_indices(table, [("sample_no", "ascending")]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_worker_reads_its_own_batches_in_rounds(tmp_path, world):
    # files of several row groups each, cut at places no batch boundary falls on
    write_samples(tmp_path / "s", [range(0, 45), range(45, 46), range(46, 130)], row_group_rows=8)
    stream, rows, b = SampleStream.open(str(tmp_path / "s")), plain_read(tmp_path / "s"), 7
    shards = [list(stream.shard(["user_id", "ts"], b, rank=r, world=world)) for r in range(world)]
    for r, batches in enumerate(shards):
        expected = [rows.slice(i * b, b) for i in range(r, -(-130 // b), world)]
        assert [t.select(rows.column_names).to_pylist() for t in batches] == [e.to_pylist() for e in expected]
    # round k (one DDP step) holds exactly the batches after those of every earlier round
    rounds = [sorted(s for shard in shards if k < len(shard) for s in shard[k]["sample_no"].to_pylist())
              for k in range(len(shards[0]))]
    assert [s for rnd in rounds for s in rnd] == list(range(130))


def test_a_resumed_shard_starts_at_the_round_of_the_watermark(tmp_path):
    write_samples(tmp_path / "s", [range(0, 50), range(50, 100)], row_group_rows=16)
    stream = SampleStream.open(str(tmp_path / "s"), max_requests=90)
    firsts = [t["sample_no"][0].as_py() for t in stream.shard(["user_id"], 10, rank=1, world=2, start=47)]
    assert firsts == [50, 70]  # round 2 (40-59) holds the watermark; the stream ends at 90
    assert [t.num_rows for t in stream.shard([], 25, rank=0, world=1)] == [25, 25, 25, 15]


def test_rows_out_of_order_inside_a_file_come_out_in_order(tmp_path):
    # as delta-rs writes the builder's chunks: a later chunk first, a row group straddling the two
    write_samples(tmp_path / "s", [[*range(20, 27), *range(0, 20)], range(27, 40)], row_group_rows=4)
    stream = SampleStream.open(str(tmp_path / "s"))
    for rank in (0, 1):
        got = [s for t in stream.shard(["user_id"], 3, rank=rank, world=2) for s in t["sample_no"].to_pylist()]
        assert got == [s for s in range(40) if (s // 3) % 2 == rank]


def test_a_sample_written_twice_is_refused(tmp_path):
    # five rows that end at 4 pass the count check; 1 is missing and 2 is there twice
    write_samples(tmp_path / "s", [[0, 2, 4, 2, 3]])
    with pytest.raises(ValueError, match="appears twice"):
        list(SampleStream.open(str(tmp_path / "s")).shard(["user_id"], 2, rank=0, world=1))


def test_bad_shard_arguments_are_named(tmp_path):
    write_samples(tmp_path / "s", [range(0, 4)])
    with pytest.raises(ValueError, match="rank < world"):
        next(SampleStream.open(str(tmp_path / "s")).shard([], 2, rank=2, world=2))


def test_position_bits_round_trip():
    position = StreamPosition(1000)
    position.mark(np.arange(0, 500))
    position.mark(np.array([700]))
    back = StreamPosition.from_bytes(position.to_bytes())
    assert back.count == 501 and back.watermark == 500
    assert back.untrained(np.array([499, 500, 700, 999])).tolist() == [False, True, False, True]


def test_rollback_sets_aside_only_later_steps_of_that_worker(tmp_path):
    tasks = ("click",)

    def log_for(rank: int, steps_and_samples: list[tuple[int, list[int]]]) -> PredictionLog:
        log = PredictionLog(str(tmp_path), rank, tasks)
        for step, samples in steps_and_samples:
            s = np.array(samples)
            log.add(s, s, s, np.full((len(s), 1), 0.5), np.zeros((len(s), 1)))
            log.flush(step)
        return log

    log0 = log_for(0, [(10, [0, 1]), (20, [4, 5])])
    log_for(1, [(10, [2, 3]), (20, [6, 7])])
    log0.rollback(after_step=10)
    kept = PredictionLog.read(str(tmp_path), tasks)
    assert kept["sample_no"].to_pylist() == [0, 1, 2, 3, 6, 7]
    assert kept.column("step").to_pylist() == [10, 10, 10, 10, 20, 20]
    assert PredictionLog.read(str(tmp_path), tasks, rolled_back=True)["sample_no"].to_pylist() == [4, 5]


def test_a_worker_killed_while_writing_its_scores_leaves_no_truncated_file(tmp_path, monkeypatch):
    """A kill trial landed a SIGKILL inside a scores flush: the truncated file broke the audit's read. The write
    goes to a partial file first; a later restart's rollback removes it, and every read still works."""
    import pyarrow.parquet as pq

    tasks, write = ("click",), pq.write_table
    log = PredictionLog(str(tmp_path), 0, tasks)
    s = np.array([0, 1])
    log.add(s, s, s, np.full((2, 1), 0.5), np.zeros((2, 1)))
    log.flush(10)

    def killed_mid_write(table, where, filesystem=None, **kwargs):
        with filesystem.open_output_stream(where) as out:
            out.write(b"PAR1 and then nothing")
        raise SystemExit("killed")

    log.add(s + 2, s, s, np.full((2, 1), 0.5), np.zeros((2, 1)))
    monkeypatch.setattr(pq, "write_table", killed_mid_write)
    with pytest.raises(SystemExit):
        log.flush(20)
    monkeypatch.setattr(pq, "write_table", write)
    assert PredictionLog.read(str(tmp_path), tasks)["sample_no"].to_pylist() == [0, 1]
    resumed = PredictionLog(str(tmp_path), 0, tasks)
    resumed.rollback(after_step=10)
    resumed.rollback(after_step=10)  # a second restart sets nothing aside twice
    assert sorted(f.name for f in tmp_path.iterdir()) == ["step-000000010-rank-0.parquet"]
    assert PredictionLog.read(str(tmp_path), tasks, rolled_back=True).num_rows == 0


def test_a_shard_reads_a_table_on_s3(tmp_path, monkeypatch):
    """The cluster path: the Delta log through delta-rs, the files through storage/ (pyarrow S3), both configured
    from the environment alone, as in a pod."""
    from ray_jobs.local_cluster import S3Server

    with S3Server(bucket="feed") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        write_samples("s3://feed/s", [range(0, 30), range(30, 50)], row_group_rows=8)
        stream = SampleStream.open("s3://feed/s")
        local = tmp_path / "s"
        write_samples(local, [range(0, 30), range(30, 50)])
        got = pa.concat_tables(stream.shard(["user_id", "ts"], 6, rank=1, world=2))
        expected = plain_read(local).filter(pa.array([(n // 6) % 2 == 1 for n in range(50)]))
        assert got.select(expected.column_names).to_pylist() == expected.to_pylist()
