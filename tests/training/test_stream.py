"""The sample stream: file order from the Delta log, stream position bits, prediction files and rollback."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import CommitProperties, write_deltalake

from features.sample_contract import RankingContract
from training.stream import PredictionLog, SampleStream, StreamPosition

META = RankingContract(kind="ratings", tasks=("like", "love"), stat_names=("a", "b"), num_users=3, num_items=9,
                       num_authors=0).to_metadata()


def write_samples(path, ranges: list[range]) -> None:
    """One commit per range (each becomes its own file), with the sample builder's commit metadata."""
    for i, r in enumerate(ranges):
        table = pa.table({"sample_no": pa.array(list(r), pa.int64()), "user_id": pa.array([1] * len(r), pa.int64())})
        write_deltalake(str(path), table, mode="overwrite" if i == 0 else "append",
                        commit_properties=CommitProperties(custom_metadata=META))


def test_files_come_in_sample_order_and_max_requests_limits(tmp_path):
    write_samples(tmp_path / "s", [range(10, 20), range(0, 10), range(20, 25)])
    stream = SampleStream.open(str(tmp_path / "s"))
    assert stream.num_samples == 25 and stream.contract == RankingContract.from_metadata(META, "s")
    firsts = [pa.parquet.read_table(f.replace("file://", ""))["sample_no"][0].as_py() for f in stream.files]
    assert firsts == [0, 10, 20]
    limited = SampleStream.open(str(tmp_path / "s"), max_requests=12)
    assert limited.num_samples == 12 and len(limited.files) == 2 and limited.rows_in_files == 20


def test_overlapping_files_are_refused(tmp_path):
    write_samples(tmp_path / "s", [range(0, 10), range(5, 15)])
    with pytest.raises(ValueError, match="overlap"):
        SampleStream.open(str(tmp_path / "s"))


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


def test_dataset_reads_in_order_in_small_blocks(tmp_path, ray_local):
    write_samples(tmp_path / "s", [range(0, 300), range(300, 500)])
    ds = SampleStream.open(str(tmp_path / "s"), max_requests=450).dataset(["sample_no", "user_id"], block_rows=64)
    ds.context.execution_options.preserve_order = True
    got = [b["sample_no"].to_pylist() for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert [s for block in got for s in block] == list(range(450))
    assert max(len(b) for b in got) <= 64


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
