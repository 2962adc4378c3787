"""common/scripts.py against a real redis-server: a script is sent by SHA
and loaded again after Redis forgot it (SCRIPT FLUSH, as a restart does)."""

from __future__ import annotations

import redis

from common.redis_conn import pooled_client
from common.scripts import LuaScript
from common.settings import load_settings

ECHO = LuaScript("return {KEYS[1], ARGV[1]}")


async def test_a_flushed_script_is_loaded_again(redis_url: str, sync_redis: redis.Redis) -> None:
    client = pooled_client(load_settings(env={}, overrides={"redis.url": redis_url}).redis)
    try:
        assert await ECHO.run(client, ["k"], ["a"]) == [b"k", b"a"]  # never loaded: NOSCRIPT first
        assert sync_redis.script_exists(ECHO.sha) == [True]
        sync_redis.script_flush()
        assert await ECHO.run(client, ["k2"], ["b"]) == [b"k2", b"b"]
        assert sync_redis.script_exists(ECHO.sha) == [True]
    finally:
        await client.aclose()
