"""The Lua scripts of every atomic Redis step, read from `service/lua/<name>.lua` (shipped as package data):
one file per script, its header documenting KEYS, ARGV and what it returns."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

__all__ = ["lua", "register", "LUA_DIR"]

LUA_DIR = Path(__file__).with_name("lua")


@cache
def lua(name: str) -> str:
    """The text of `lua/<name>.lua` (read once per process); FileNotFoundError names a missing script."""
    return (LUA_DIR / f"{name}.lua").read_text(encoding="utf-8")


def register(redis: aioredis.Redis, name: str) -> AsyncScript:
    """`lua/<name>.lua` registered on `redis` (EVALSHA, reloaded by redis-py after a SCRIPT FLUSH)."""
    return redis.register_script(lua(name))
