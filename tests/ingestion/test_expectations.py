"""The GX gate: each expectation fails the batch that breaks its bound and only that one; a statistic that may be
null passes when null. Its Data Docs: rendered at most once per interval while a run goes on, everything at its end."""

from __future__ import annotations

import os

import jinja2
import pyarrow as pa

from config.schema import IngestConfig
from ingestion.batch_stats import batch_statistics, file_statistics
from ingestion.contract import EventTimeBounds
from ingestion.expectations import ExpectationGate, compile_templates, main, suite, template_cache
from ingestion.staging import to_events
from tests.ingestion.lake_checks import good_event


def statistics(cfg: IngestConfig) -> dict:
    rows = pa.Table.from_pylist([good_event(i) for i in range(5)])
    rows = rows.append_column("source_file", pa.array(["a"] * 5)).append_column("source_offset", pa.array(range(5)))
    return batch_statistics([file_statistics(to_events(rows, batch_no=1))], 0, cfg)


def rendered_batches(gx_root) -> set[str]:
    pages = (gx_root / "gx" / "uncommitted" / "data_docs").rglob("*.html")
    return {part for page in pages for part in page.parts if part.startswith("ingest-batch-")}


def test_data_docs_wait_for_their_interval_and_the_end_of_the_run_renders_the_rest(tmp_path):
    cfg = IngestConfig(data_docs_interval_s=3600)
    gate = ExpectationGate(str(tmp_path), cfg)
    bounds = EventTimeBounds.from_config(cfg)
    for batch in (1, 2, 3):
        assert gate.validate(statistics(cfg), batch, bounds, 1_800_000_000_000).success
        gate.start_docs()
    gate._wait_docs()
    assert rendered_batches(tmp_path) == {"ingest-batch-1"}  # 2 and 3 came within the interval
    assert gate.finish_docs() is not None
    assert rendered_batches(tmp_path) == {"ingest-batch-1", "ingest-batch-2", "ingest-batch-3"}


def test_the_docs_index_lists_only_the_newest_validations_and_every_validation_keeps_its_page(tmp_path):
    """GX reads every validation the index lists at each render: the index is bounded, the pages are not."""
    cfg = IngestConfig(data_docs_interval_s=3600, data_docs_index_validations=2)
    gate = ExpectationGate(str(tmp_path), cfg)
    bounds = EventTimeBounds.from_config(cfg)
    for batch in (1, 2, 3, 4):
        assert gate.validate(statistics(cfg), batch, bounds, 1_800_000_000_000).success
    index = gate.finish_docs()
    assert rendered_batches(tmp_path) == {f"ingest-batch-{b}" for b in (1, 2, 3, 4)}
    listed = (tmp_path / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").read_text()
    assert index is not None and [b for b in (1, 2, 3, 4) if f"ingest-batch-{b}/" in listed] == [3, 4]
    ExpectationGate(str(tmp_path), cfg)  # opening the project again keeps the bound, and does not stack it
    site = gate.ctx.list_data_docs_sites()["local_site"]
    assert site["site_index_builder"]["validation_results_limit"] == 2


def test_every_expectation_fails_the_batch_that_breaks_its_bound_and_no_other(tmp_path):
    """The suite mixes aggregate and per-row expectations (`suite`): each must see its own statistic."""
    cfg = IngestConfig(build_data_docs=False, batch_rules={"max_null_rate": {"author_id": 0.5},
                                                           "action_share_bounds": {"click": [0.01, 0.9]}})
    gate = ExpectationGate(str(tmp_path), cfg)
    bounds = EventTimeBounds.from_config(cfg)
    now_ms = 1_800_000_000_000
    parameters = {"min_ts_ms": bounds.min_ts_ms, "max_ts_ms": now_ms + bounds.max_future_ms}
    good = statistics(cfg)
    assert gate.validate(good, 0, bounds, now_ms).success
    rules = suite(cfg)
    for batch, rule in enumerate(rules, start=1):
        low, high = (parameters[v["$PARAMETER"]] if isinstance(v, dict) else v
                     for v in (rule.min_value, rule.max_value))
        broken = {**good, rule.column: low - 1 if low is not None else high + 1}
        result = gate.validate(broken, batch, bounds, now_ms)
        assert not result.success and len(result.failed) == 1, (rule.column, result.failed)
        assert f"column={rule.column}," in result.failed[0]
    nullable = [r.column for r in rules if r.expectation_type == "expect_column_values_to_be_between"]
    assert {"null_rate_author_id", "share_click", "min_value_gift", "min_author_id"} <= set(nullable)
    assert gate.validate({**good, **dict.fromkeys(nullable)}, len(rules) + 1, bounds, now_ms).success


def test_a_batch_without_rows_fails_its_gate(tmp_path):
    cfg = IngestConfig(build_data_docs=False)
    gate = ExpectationGate(str(tmp_path), cfg)
    empty = batch_statistics([], 0, cfg)
    result = gate.validate(empty, 1, EventTimeBounds.from_config(cfg), 1_800_000_000_000)
    assert not result.success and any("column=rows," in name for name in result.failed)


def test_compiled_templates_serve_every_later_render_without_compiling(tmp_path, monkeypatch):
    """`compile_templates` (run by `make setup` and the image build) leaves nothing for a run's Data Docs to compile."""
    folder = tmp_path / "templates"
    assert compile_templates(str(folder)) >= 20
    compiled = []
    compile_once = jinja2.Environment.compile
    monkeypatch.setattr(jinja2.Environment, "compile",
                        lambda env, source, name=None, *a, **k: compiled.append(name) or compile_once(
                            env, source, name, *a, **k))
    cfg = IngestConfig(gx_template_cache=str(folder))
    gate = ExpectationGate(str(tmp_path / "gx"), cfg)
    assert gate.validate(statistics(cfg), 1, EventTimeBounds.from_config(cfg), 1_800_000_000_000).success
    assert gate.finish_docs() is not None
    # Only the project's own stylesheet: a file of each project, so a new project compiles it (plain CSS: ~0.1 ms).
    assert rendered_batches(tmp_path / "gx") == {"ingest-batch-1"} and set(compiled) <= {"data_docs_custom_styles.css"}
    # Without the cache the same render compiles its templates: the check above sees compiling when it happens.
    ExpectationGate(str(tmp_path / "gx2"), IngestConfig(gx_template_cache=None)).finish_docs()
    assert "page.j2" in compiled


def test_a_template_cache_that_cannot_be_written_still_renders(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert template_cache(str(blocked / "templates")) is None  # cannot be made: compiled in memory, with a warning
    assert "cannot be made" in caplog.text
    folder = tmp_path / "gone"
    cache = template_cache(str(folder))
    folder.rmdir()  # as a read-only folder would, every write fails
    env = jinja2.Environment(loader=jinja2.DictLoader({"page": "{{ 6 * 7 }}"}), bytecode_cache=cache)
    assert env.get_template("page").render() == "42" and not folder.exists()


def test_the_setup_command_fills_the_default_folder_with_or_without_a_folder_named(tmp_path, monkeypatch, capsys):
    """`make setup` runs `python -m ingestion.expectations --compile-templates` with no folder."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the default folder is under ~
    for argv in (["--compile-templates"], []):
        assert main(argv) == 0
    assert "compiled templates in " + str(tmp_path / ".cache" / "streamrec" / "gx-templates") in capsys.readouterr().out
    assert main(["--compile-templates", str(tmp_path / "elsewhere")]) == 0
    assert list((tmp_path / "elsewhere").glob("*.cache"))


def test_a_template_cache_others_could_write_is_not_trusted(tmp_path, caplog):
    """Its entries are code the job runs: a folder open to other users is refused (compiled in memory instead)."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # mkdir's mode is cut by the umask
    assert template_cache(str(shared)) is None and "not trusted" in caplog.text
    shared.chmod(0o755)  # the image's folder: root's, read-only to the job's user
    assert template_cache(str(shared)) is not None
    if os.getuid() == 0:  # only root can give a folder away
        os.chown(shared, 12345, 12345)
        assert template_cache(str(shared)) is None
