"""Feast's Redis online store with an atomic "newer wins" write.

Two processes write the online store: the batch job (materialise) and the real-time updater (push). Feast's
own Redis store reads each entity's `_ts:<view>` in one round trip and writes in another, so a push landing
in between is overwritten by an older batch row. Here each entity's write is one Lua call that compares and
sets on the server: a row older than (or as old as) the stored one is dropped. The comparison uses a plain
integer field `_tsus:<view>` (event time in microseconds, exact in Lua's doubles) written beside Feast's
protobuf `_ts:<view>`, which readers keep using; a hash written before this store existed has no such field
and counts as older.

Selected in the Feast repo config as `type: features.redis_store.GuardedRedisOnlineStore` (features/repo.py);
every other setting is Feast's `RedisOnlineStoreConfig`.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from feast import utils
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, _versioned_fv_name
from google.protobuf.timestamp_pb2 import Timestamp

TYPE = "features.redis_store.GuardedRedisOnlineStore"

# KEYS[1] the entity's hash; ARGV[1] the integer-time field, ARGV[2] the row's time (us), ARGV[3] TTL seconds
# (0: none), then field/value pairs. Returns 1 when written.
_COMPARE_AND_SET = """
local stored = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if stored >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


class GuardedRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    type: Literal["features.redis_store.GuardedRedisOnlineStore"] = TYPE  # type: ignore[assignment]


class GuardedRedisOnlineStore(RedisOnlineStore):
    def online_write_batch(self, config, table, data, progress) -> None:
        client = self._get_client(config.online_store)
        script = client.register_script(_COMPARE_AND_SET)
        view = _versioned_fv_name(table, config)  # the hash field names Feast's readers expect
        ttl = config.online_store.key_ttl_seconds or 0
        with client.pipeline(transaction=False) as pipe:
            for entity_key, values, timestamp, _ in data:
                ts = Timestamp()
                ts.FromDatetime(utils.make_tzaware(timestamp))
                fields = [f"_ts:{view}", ts.SerializeToString()]
                for name, value in values.items():
                    fields += [_mmh3(f"{view}:{name}"), value.SerializeToString()]
                key = _redis_key(config.project, entity_key,
                                 entity_key_serialization_version=config.entity_key_serialization_version)
                micros = ts.seconds * 1_000_000 + ts.nanos // 1000
                script(keys=[key], args=[f"_tsus:{view}", micros, ttl, *fields], client=pipe)
            results = pipe.execute()
        if progress:
            progress(len(results))

    async def online_write_batch_async(self, config, table, data, progress) -> None:
        await asyncio.to_thread(self.online_write_batch, config, table, data, progress)
