"""The Great Expectations gate on each ingestion batch.

Two suites run on the rows that passed parsing (after de-duplication):
- `events_rows`: the row rules again (non-null, ids > 0, allowed actions, value and time bounds,
  unique event_id) plus "the batch is not empty". The parser already enforces these row by row;
  here they certify the batch as a whole, so a parser bug cannot slip rows into the lake.
- `events_batch`: statistics that only make sense over many rows: null rates of optional fields
  and the share of each action. It runs when the batch has at least `min_rows_for_rates` rows.
A failing expectation fails the batch; the caller quarantines it whole, naming the expectation.
Validation results and Data Docs are written to a file-backed GX project (`gx_root`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pandas as pd

from config.schema import IngestConfig
from ingestion.contract import ACTIONS, DEFAULT_VALUE_RANGE, REQUIRED_FIELDS, VALUE_RANGES, EventTimeBounds

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.WARNING)

import great_expectations as gx  # noqa: E402  (the environment must be set first)
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

POSITIVE_ID_FIELDS = ("user_id", "item_id", "author_id")
ROW_RULE_COLUMNS = ["event_id", "ts", "user_id", "item_id", "author_id", "action", "value"]


@dataclass
class GateResult:
    success: bool
    failed: list[str]  # one readable name per failed expectation


def _name(config) -> str:
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    args = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{config.type}({args})"


def row_suite() -> list:
    value_high = max([DEFAULT_VALUE_RANGE.high, *(r.high for r in VALUE_RANGES.values())])
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_FIELDS),
        *(gxe.ExpectColumnValuesToBeBetween(column=c, min_value=1) for c in POSITIVE_ID_FIELDS),
        # Time bounds depend on the batch's clock: filled in per run via expectation parameters.
        gxe.ExpectColumnValuesToBeBetween(column="ts", min_value={"$PARAMETER": "min_ts_ms"},
                                          max_value={"$PARAMETER": "max_ts_ms"}),
        gxe.ExpectColumnValuesToBeInSet(column="action", value_set=list(ACTIONS)),
        gxe.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=value_high),
        gxe.ExpectColumnValuesToBeUnique(column="event_id"),
    ]


def batch_suite(cfg: IngestConfig) -> list:
    rules = cfg.batch_rules
    out: list = [gxe.ExpectColumnValuesToNotBeNull(column=c, mostly=round(1.0 - rate, 6))
                 for c, rate in sorted(rules.max_null_rate.items())]
    for action, (low, high) in sorted(rules.action_share_bounds.items()):
        if low > 0:
            out.append(gxe.ExpectColumnValuesToBeInSet(column="action", value_set=[action], mostly=low))
        if high < 1:
            out.append(gxe.ExpectColumnValuesToNotBeInSet(column="action", value_set=[action],
                                                          mostly=round(1.0 - high, 6)))
    return out


class ExpectationGate:
    """Validates ingestion batches with a file-backed GX project and keeps its Data Docs."""

    def __init__(self, gx_root: str, cfg: IngestConfig):
        self.cfg = cfg
        self.ctx = gx.get_context(mode="file", project_root_dir=gx_root)
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.ctx.data_sources.add_or_update_pandas("landing")
        asset = source.add_dataframe_asset("events")
        self.batch_definition = asset.add_batch_definition_whole_dataframe("ingestion_batch")
        self.rows = self._checkpoint("events_rows", row_suite())
        self.stats = self._checkpoint("events_batch", batch_suite(cfg))
        # Only the columns some expectation reads are handed to GX (pandas conversion is costly).
        self.columns = ROW_RULE_COLUMNS + sorted(set(cfg.batch_rules.max_null_rate) - set(ROW_RULE_COLUMNS))

    def _checkpoint(self, name: str, expectations: list) -> gx.Checkpoint:
        suite = self.ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
        vd = self.ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=name, data=self.batch_definition, suite=suite))
        # BASIC, not SUMMARY: listing sample failing rows costs seconds per million rows, and the
        # rows that fail a row rule are already in quarantine with their reasons.
        return self.ctx.checkpoints.add_or_update(
            gx.Checkpoint(name=name, validation_definitions=[vd], result_format={"result_format": "BASIC"}))

    def validate(self, frame: pd.DataFrame, batch_no: int, bounds: EventTimeBounds,
                 now_ms: int) -> GateResult:
        params = {"min_ts_ms": bounds.min_ts_ms, "max_ts_ms": now_ms + bounds.max_future_ms}
        checkpoints = [self.rows]
        if len(frame) >= self.cfg.batch_rules.min_rows_for_rates:
            checkpoints.append(self.stats)
        failed: list[str] = []
        for cp in checkpoints:
            result = cp.run(batch_parameters={"dataframe": frame}, expectation_parameters=params,
                            run_id=gx.RunIdentifier(run_name=f"ingest-batch-{batch_no}"))
            for run in result.run_results.values():
                failed += [_name(r.expectation_config) for r in run.results if not r.success]
        return GateResult(success=not failed, failed=failed)

    def build_docs(self) -> str | None:
        """Render Data Docs for every stored validation; returns the index page's URL."""
        if not self.cfg.build_data_docs:
            return None
        self.ctx.build_data_docs()
        sites = self.ctx.get_docs_sites_urls()
        return sites[0]["site_url"] if sites else None
