"""The Great Expectations gate on each ingestion batch, over the batch's exact statistics.

The parser already applies the row rules to every line (`ingestion.parse.row_reasons`). The gate certifies
the batch as a whole with independent code, so a parser bug cannot slip rows into the lake: Arrow computes
exact aggregates over every row the batch writes (`ingestion.batch_stats`: null counts, minima and maxima,
unknown actions, repeated event_ids, value ranges per action, null rates and action shares; per file in the
parse tasks, merged in the driver) and GX validates that one-row frame against the suite `events_batch`.
Each row rule has an aggregate that holds exactly when the rule holds for every row (ids > 0 <=> the
minimum id > 0), so nothing is sampled away, and the cost is a few column scans instead of GX's row-by-row
pandas engine (2.6 s per million rows before, milliseconds now).

Rate rules (null rates of optional fields, the share of each action) need many rows to mean anything: below
`min_rows_for_rates` their statistics are null, which GX skips. A failing expectation fails the batch; the
caller quarantines it whole, naming the expectation. Validation results and Data Docs are written to a
file-backed GX project (`gx_root`).

The Data Docs' Jinja templates are compiled once per machine, not once per process (`TemplateCache`): compiling
them was ~0.1 s of a core in every run, a tenth of a fresh `--once` run over a million events.

    python -m ingestion.expectations --compile-templates /opt/streamrec/gx-templates   # ahead, e.g. in an image
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from jinja2 import FileSystemBytecodeCache

from config.schema import IngestConfig
from ingestion.batch_stats import POSITIVE_ID_FIELDS, value_groups
from ingestion.contract import (
    MAX_EVENT_ID_CHARS,
    MAX_REQUEST_ID_CHARS,
    REQUIRED_FIELDS,
    EventTimeBounds,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.WARNING)
log = logging.getLogger("ingestion")

import great_expectations as gx  # noqa: E402  (the environment must be set first)
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402
from great_expectations.data_context.types.resource_identifiers import (  # noqa: E402
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)

SUITE = "events_batch"


@dataclass
class GateResult:
    success: bool
    failed: list[str]  # one readable name per failed expectation


def _name(config) -> str:
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    args = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{config.type}({args})"


def suite(cfg: IngestConfig) -> list:
    """The expectations on `batch_statistics`' frame; `ts` bounds are parameters (they depend on the batch's clock).

    A statistic that every batch with a row has (counts, and the extremes of required fields) is checked by an
    aggregate expectation, the column's minimum: on a one-row frame the value itself, and GX resolves one metric
    for it where a per-row expectation resolves about ten (~3 ms of GX's graph building per expectation, ~half of
    the gate's time). A statistic that may be null (an optional field absent from the batch, a rate below
    `min_rows_for_rates`) keeps the per-row expectation, which skips a null where an aggregate would fail on it."""
    def present(column: str, low=None, high=None) -> gxe.ExpectColumnMinToBeBetween:
        return gxe.ExpectColumnMinToBeBetween(column=column, min_value=low, max_value=high)

    def between(column: str, low=None, high=None) -> gxe.ExpectColumnValuesToBeBetween:
        return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high)

    required_ids = [name for name in POSITIVE_ID_FIELDS if name in REQUIRED_FIELDS]
    rules = [
        present("rows", 1),  # an all-rejected batch fails its gate (and exits 2), as any failed batch does
        *(present(f"nulls_{name}", 0, 0) for name in REQUIRED_FIELDS),
        *(present(f"min_{name}", 1) for name in required_ids),
        *(between(f"min_{name}", 1) for name in POSITIVE_ID_FIELDS if name not in required_ids),
        present("min_ts", {"$PARAMETER": "min_ts_ms"}), present("max_ts", None, {"$PARAMETER": "max_ts_ms"}),
        present("min_event_id_chars", 1), present("max_event_id_chars", None, MAX_EVENT_ID_CHARS),
        between("max_request_id_chars", None, MAX_REQUEST_ID_CHARS),
        present("repeated_event_ids", 0, 0), present("unknown_action_rows", 0, 0),
        present("non_finite_values", 0, 0),
    ]
    for group, (low, high) in value_groups().items():
        rules += [between(f"min_value_{group}", low), between(f"max_value_{group}", None, high)]
    batch = cfg.batch_rules
    rules += [between(f"null_rate_{name}", None, rate) for name, rate in sorted(batch.max_null_rate.items())]
    rules += [between(f"share_{action}", low, high)
              for action, (low, high) in sorted(batch.action_share_bounds.items())]
    return rules


class TemplateCache(FileSystemBytecodeCache):
    """Compiled Jinja templates in a folder, as Python keeps compiled modules in `__pycache__`.

    An entry is found by the template's path and used only when the hash of the template's source matches, so a
    changed template (a GX upgrade) is compiled again. A folder that cannot be written (a read-only image layer)
    still serves what it holds; a template missing from it is compiled in memory, as without a cache. Entries are
    code the job runs: `template_cache` refuses a folder another user could write (the default is in the job's
    user's home, made 0700; the image's belongs to root and is read-only).

    >>> folder = tempfile.mkdtemp()
    >>> from jinja2 import DictLoader, Environment
    >>> env = Environment(loader=DictLoader({"page": "{{ 1 + 1 }}"}), bytecode_cache=TemplateCache(folder))
    >>> env.get_template("page").render(), len(list(Path(folder).glob("*.cache")))
    ('2', 1)
    """

    def dump_bytecode(self, bucket) -> None:
        try:
            super().dump_bytecode(bucket)
        except OSError as err:
            log.debug("template bytecode not cached in %s: %s", self.directory, err)


def template_cache(folder: str | None) -> TemplateCache | None:
    """The cache in `folder` (`ingest.gx_template_cache`; `~` expanded, made when missing), or None when off, when
    the folder cannot be made, or when someone else could have written its code: a folder owned by another user than
    this one or root, or writable by group or others (then the templates are compiled in memory, with a warning)."""
    if not folder:
        return None
    path = Path(folder).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
    except OSError as err:
        log.warning("GX template cache %s cannot be made (%s): Data Docs templates are compiled in memory", path, err)
        return None
    if status.st_uid not in (os.getuid(), 0) or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("GX template cache %s is owned by uid %d or writable by others (mode %o): not trusted, Data Docs "
                    "templates are compiled in memory", path, status.st_uid, stat.S_IMODE(status.st_mode))
        return None
    return TemplateCache(str(path))


def unreadable_project_files(gx_root: str) -> list[Path]:
    """The GX project's configuration files (great_expectations.yml, the stored suites, validation definitions
    and checkpoints) that are empty or do not parse: what a write cut short by a kill leaves behind.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp()); (root / "gx" / "checkpoints").mkdir(parents=True)
    >>> (root / "gx" / "checkpoints" / "events_batch.json").write_text("")
    0
    >>> [f.name for f in unreadable_project_files(str(root))]
    ['events_batch.json']
    """
    project = Path(gx_root) / "gx"
    broken = []
    for path in [project / "great_expectations.yml",
                 *(f for folder in ("expectations", "validation_definitions", "checkpoints")
                   for f in sorted((project / folder).glob("*.json")))]:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        try:
            parsed = yaml.safe_load(text) if path.suffix == ".yml" else json.loads(text)
        except (ValueError, yaml.YAMLError):
            parsed = None
        if not isinstance(parsed, dict):
            broken.append(path)
    return broken


class ExpectationGate:
    """Validates ingestion batches with a file-backed GX project and keeps its Data Docs."""

    def __init__(self, gx_root: str, cfg: IngestConfig):
        self.cfg = cfg
        try:
            self._open(gx_root)
        except Exception:
            # GX rewrites its project files on every open, in place: a run killed during that write leaves one
            # empty, and the next open fails. They are derived from this code; the results and Data Docs stay.
            broken = unreadable_project_files(gx_root)
            if not broken:
                raise
            log.warning("GX project files left unreadable by an interrupted run, rebuilt: %s",
                        ", ".join(str(f) for f in broken))
            for f in broken:
                f.unlink()
            self._open(gx_root)
        self._undocumented: list = []  # validation results not rendered into Data Docs yet
        self._builders: list | None = None  # the Data Docs site builders, made at the first render
        self._docs: threading.Thread | None = None
        self._docs_error: BaseException | None = None
        self._last_render = -float("inf")  # time.monotonic() of the last render's start
        if cfg.build_data_docs:
            # The suite's page, rendered while the first batch parses: it also makes the site builders and loads their
            # templates (compiles them, without a template cache), which the first validation's render would
            # otherwise wait for.
            self._render([ExpectationSuiteIdentifier(name=SUITE)])

    def _open(self, gx_root: str) -> None:
        """Open (or create) the file-backed project and (re)write the gate's suite and validation definition.

        No checkpoint: running one adds nothing the gate uses (no actions) and costs ~30 ms a batch, most of it
        GX comparing the checkpoint with its stored copy before every run."""
        cfg = self.cfg
        self.ctx = gx.get_context(mode="file", project_root_dir=gx_root)
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self._bound_docs_index()
        source = self.ctx.data_sources.add_or_update_pandas("landing")
        asset = source.add_dataframe_asset("batch_statistics")
        batch_definition = asset.add_batch_definition_whole_dataframe("ingestion_batch")
        expectations = self.ctx.suites.add_or_update(gx.ExpectationSuite(name=SUITE, expectations=suite(cfg)))
        self.validation = self.ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=SUITE, data=batch_definition, suite=expectations))

    def _bound_docs_index(self) -> None:
        """List only the newest `data_docs_index_validations` validations on the Data Docs index page.

        GX's index builder reads every stored validation result it lists at each render: a follower committing a
        batch every few seconds would spend ever more of a core on it, and a validation waits for a running
        render. Its `validation_results_limit` bounds that; GX also applies the same limit to the section that
        renders validation pages, so that section is given none: every validation still gets its page, whatever
        its age. The profiling section (unused here) is turned off: it lists every stored result again. What
        stays linear is GX listing the stored results' keys (about 0.1 s per 1,000 per listing, two listings per
        render; docs/scaling.md)."""
        sites = self.ctx.list_data_docs_sites()
        for name, site in sites.items():
            wanted = {**site,
                      "site_index_builder": {**site.get("site_index_builder", {}),
                                             "class_name": "DefaultSiteIndexBuilder",
                                             "validation_results_limit": self.cfg.data_docs_index_validations},
                      "site_section_builders": {**site.get("site_section_builders", {}),
                                                "validations": {"validation_results_limit": 0},
                                                "profiling": "None"}}  # none here; it re-lists every result
            if wanted != site:
                self.ctx.update_data_docs_site(name, wanted)

    def _site_builders(self) -> list:
        """The project's Data Docs site builders, made once and kept (what `ctx.build_data_docs` does, less its
        per-call set-up). `build_data_docs` makes new site builders on every call, and each makes a new Jinja
        environment that compiles its ~50 templates again, and reads the project's variables again: ~0.15 s of a
        core per render. The builders read the stores live, so a kept builder sees every new validation."""
        if self._builders is None:
            # The context's own constructor for them (GX 1.24, pinned): the same classes and configuration.
            self._builders = [self.ctx._init_site_builder_for_data_docs_site_creation(site_name=name, site_config=site)
                              for name, site in self.ctx.list_data_docs_sites().items()]
            cache = template_cache(self.cfg.gx_template_cache)
            if cache is not None:
                # Each page section and the index render through their own view, each with its own environment.
                for builder in self._builders:
                    for view in [*(section.view_class for section in builder.site_section_builders.values()),
                                 builder.site_index_builder.view_class]:
                        view.env.bytecode_cache = cache
        return self._builders

    def validate(self, statistics: dict[str, float | None], batch_no: int, bounds: EventTimeBounds,
                 now_ms: int) -> GateResult:
        """Validate a batch's statistics (`batch_stats.batch_statistics`)."""
        self._wait_docs()
        # float64 columns: GX reads a column of Nones as object dtype and cannot compare it.
        frame = pd.DataFrame([statistics], dtype="float64")
        params = {"min_ts_ms": bounds.min_ts_ms, "max_ts_ms": now_ms + bounds.max_future_ms}
        run_id = gx.RunIdentifier(run_name=f"ingest-batch-{batch_no}")
        result = self.validation.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                                     result_format={"result_format": "BASIC"}, run_id=run_id)
        # The key the run stored its result under (what a checkpoint would have returned), for the Data Docs.
        self._undocumented.append(ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=SUITE), run_id=run_id,
            batch_identifier=result.batch_id))
        failed = [_name(r.expectation_config) for r in result.results if not r.success]
        return GateResult(success=not failed, failed=failed)

    def start_docs(self, force: bool = False) -> None:
        """Render the validations not rendered yet (and the index) into Data Docs, in a thread.

        Incremental, because re-rendering every stored validation would grow with the lake's age; in a thread,
        because rendering is a few hundred ms of templating that can run while the batch's rows are committed.
        At most one render per `ingest.data_docs_interval_s` unless `force`: a follower committing batch after
        batch would otherwise spend a core on HTML; the validations wait and are rendered together (nothing
        is skipped: they are stored at validation). GX is not used by two threads at once: `validate` and
        `finish_docs` wait for a render."""
        if not self.cfg.build_data_docs or not self._undocumented:
            return
        if not force and (self._docs is not None or
                          time.monotonic() - self._last_render < self.cfg.data_docs_interval_s):
            return
        self._wait_docs()
        targets, self._undocumented = self._undocumented, []
        self._last_render = time.monotonic()
        self._render(targets)

    def _render(self, targets: list) -> None:
        """Render `targets` (and the index page) in a thread; the caller has waited for the previous render."""
        self._docs_error = None

        def render() -> None:
            try:
                for builder in self._site_builders():
                    builder.build(resource_identifiers=targets)
            except BaseException as err:  # raised again by the caller's next _wait_docs
                self._docs_error = err

        self._docs = threading.Thread(target=render, name="gx-data-docs")
        self._docs.start()

    def _wait_docs(self) -> None:
        if self._docs is not None:
            self._docs.join()
            self._docs = None
            if self._docs_error is not None:
                raise self._docs_error

    def finish_docs(self) -> str | None:
        """Render what is left and wait for it; returns the index page's URL (None when docs are off)."""
        self.start_docs(force=True)
        self._wait_docs()
        if not self.cfg.build_data_docs:
            return None
        sites = self.ctx.get_docs_sites_urls()
        return sites[0]["site_url"] if sites else None


def compile_templates(folder: str) -> int:
    """Fill `folder` with the compiled templates of the gate's Data Docs: a scratch project renders the suite's page,
    a validation's page and the index through it. Returns how many templates the folder holds.

    The scratch validation has every statistic at 1, so that expectations pass and fail and both kinds of result
    are rendered; a template no page used here is compiled at its first use (and cached, where writable)."""
    cfg = IngestConfig(gx_template_cache=folder)
    with tempfile.TemporaryDirectory(prefix="gx-templates-") as scratch:
        gate = ExpectationGate(scratch, cfg)
        columns = {expectation.column for expectation in suite(cfg)}
        gate.validate(dict.fromkeys(columns, 1.0), 1, EventTimeBounds.from_config(cfg), int(time.time() * 1000))
        gate.finish_docs()
    return len(list(Path(folder).expanduser().glob("*.cache")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the Data Docs templates ahead of the ingestion job's runs.")
    default = IngestConfig().gx_template_cache
    parser.add_argument("--compile-templates", metavar="DIR", nargs="?", const=default, default=default,
                        help="the folder to fill (default, also with no DIR: ingest.gx_template_cache's, %(default)s)")
    args = parser.parse_args(argv)
    count = compile_templates(args.compile_templates)
    print(f"{count} compiled templates in {Path(args.compile_templates).expanduser()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
