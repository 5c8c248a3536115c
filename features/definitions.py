"""The Feast objects (entities, sources, push sources, feature views) for one platform config.

Views:
- `item_stats`, `author_stats`, `user_stats` (online): the windowed stats packed in one `stats` vector
  (layout `FeatureStoreSpec.stat_names`). Online stores keep one row (SQLite) or hash field (Redis) per
  feature, so one packed value per entity is what makes a 200-candidate read, a materialisation and a
  real-time push cheap;
- `item_stats_named`, ... (offline only): the same values, one feature per stat, from the same table;
- `user_sequence` (online): the last N engagements as parallel arrays.
Each batch source is a Delta table in the lake read by Feast's DuckDB offline store; each online view
has a push source so real-time updates go straight online.

Every view also has `asof_ms`: the exclusive upper bound, in epoch ms, of the event times its values
include. The leakage tests and the real-time updater's hand-over from batch rows read it.

>>> import config
>>> objs = feast_objects(config.load(None, ["lake.root=/tmp/lake"]))
>>> sorted(k for k, v in objs.items() if type(v).__name__ == "FeatureView" and v.online)
['author_stats', 'item_stats', 'user_sequence', 'user_stats']
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import DeltaFormat
from feast.types import Array, Float64, Int64

from config.schema import PlatformConfig
from features.offline import FEATURE_TABLES
from features.spec import (
    ENTITY_KEYS,
    SEQUENCE_FIELDS,
    SEQUENCE_VIEW,
    STATS_ENTITIES,
    FeatureStoreSpec,
    push_source,
    stats_view,
)


def _source(cfg: PlatformConfig, kind: str, view: str) -> FileSource:
    endpoint = cfg.lake.storage_options.get("AWS_ENDPOINT_URL")
    return FileSource(name=f"{view}_source", path=cfg.lake.table(FEATURE_TABLES[kind]), file_format=DeltaFormat(),
                      timestamp_field="event_timestamp", s3_endpoint_override=endpoint)


def feast_objects(cfg: PlatformConfig) -> dict[str, object]:
    """Name -> Feast object, ready for `FeatureStore.apply(list(...values()))` or a repo module's globals."""
    spec = FeatureStoreSpec.from_config(cfg.features)
    entities = {name: Entity(name=name, join_keys=[key], value_type=ValueType.INT64,
                             description=f"a {name}, keyed by the events' {key}")
                for name, key in ENTITY_KEYS.items()}
    objects: dict[str, object] = {f"{name}_entity": e for name, e in entities.items()}
    counts = set(spec.count_stat_names)
    named = [Field(name=n, dtype=Int64 if n in counts else Float64) for n in spec.stat_names]
    ttl = timedelta(milliseconds=spec.ttl_ms)
    for entity in STATS_ENTITIES:
        view = stats_view(entity)
        extra = [Field(name="item_author_id", dtype=Int64)] if entity == "item" else []
        source = _source(cfg, entity, view)
        push = PushSource(name=push_source(view), batch_source=source)
        objects[push.name] = push
        objects[view] = FeatureView(
            name=view, entities=[entities[entity]], ttl=ttl, source=push,
            schema=[Field(name="asof_ms", dtype=Int64), *extra, Field(name="stats", dtype=Array(Float64))],
            description=f"stats vector ({len(spec.stat_names)} values, layout in {view}_named): counts and value "
                        f"sums per action over {', '.join(spec.window_labels)}, smoothed ctr/ltr",
        )
        objects[f"{view}_named"] = FeatureView(
            name=f"{view}_named", entities=[entities[entity]], ttl=ttl, source=source, online=False,
            schema=[Field(name="asof_ms", dtype=Int64), *named],
            description=f"the same stats as {view}, one feature each (offline: training and analysis)",
        )
    push = PushSource(name=push_source(SEQUENCE_VIEW), batch_source=_source(cfg, "sequence", SEQUENCE_VIEW))
    objects[push.name] = push
    # ttl 0 = never expires: the last N engagements stay the last N however old they are.
    objects[SEQUENCE_VIEW] = FeatureView(
        name=SEQUENCE_VIEW, entities=[entities["user"]], ttl=timedelta(0), source=push,
        schema=[Field(name="asof_ms", dtype=Int64), *(Field(name=f, dtype=Array(Int64)) for f in SEQUENCE_FIELDS)],
        description=f"the user's last {spec.sequence_length} engagements, oldest first",
    )
    return objects
