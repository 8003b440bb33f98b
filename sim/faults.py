"""Faults, each an op of the log: Redis restarted (SIGTERM or SIGKILL, AOF on) or paused past the
client timeout while paid calls are in flight, a server process SIGKILLed mid-request and started again."""
from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from .ops import Op

if TYPE_CHECKING:
    from .runner import Sim


def _payers(sim: "Sim", op: Op, n: int) -> list[str]:
    users = sim.lane.users
    return [users[(op.b + k) % len(users)].username for k in range(min(n, len(users)))] if users else []


async def redis_restart(sim: "Sim", op: Op) -> None:
    """Redis stops (SIGTERM: flushes its AOF; SIGKILL: a crash), paid calls meet it down, it comes back."""
    sig = signal.SIGKILL if op.a % 2 else signal.SIGTERM
    sim.fault_counts["redis_restart_" + ("sigkill" if sig == signal.SIGKILL else "sigterm")] += 1
    sim.cluster.redis.stop(sig)
    for k, payer in enumerate(_payers(sim, op, 1 + op.c % 2)):
        await sim.paid_call(op, payer, op.c + k)
    sim.cluster.redis.start()
    await sim.cluster.reconnect()
    await sim.cluster.wait_ready()


async def redis_pause(sim: "Sim", op: Op) -> None:
    await _stall(sim, op, busy=False)


async def redis_busy(sim: "Sim", op: Op) -> None:
    await _stall(sim, op, busy=True)


async def _stall(sim: "Sim", op: Op, busy: bool) -> None:
    """Redis stalls for 3 × REDIS_TIMEOUT_MS (CLIENT PAUSE ALL, or a slow script when `busy`), with paid
    calls (some slow: many documents) started just before and during it, so the stall lands on holds,
    on handlers and on captures."""
    ms = 3 * sim.cfg.redis_timeout_ms
    payers = _payers(sim, op, 1 + op.c % 3)
    delays = [((op.a >> (8 * k)) % 40) / 1000 for k in range(len(payers))]
    docs = [1 if (op.c >> (4 + k)) % 2 else 20 + (op.a >> (3 * k)) % 180 for k in range(len(payers))]
    pause_at = (delays[0] if delays else 0) + (op.b % 120) / 10000  # 0-12 ms into the first call

    async def call(k: int, payer: str) -> None:
        await asyncio.sleep(delays[k])
        await sim.paid_call(op, payer, op.c + k, docs[k])

    async def pause() -> float:
        await asyncio.sleep(pause_at)
        started = time.monotonic()
        await (sim.cluster.redis_busy(ms) if busy else sim.cluster.redis_pause(ms))
        return started

    paused, *_ = await asyncio.gather(pause(), *(call(k, p) for k, p in enumerate(payers)))
    await asyncio.sleep(max(0.0, paused + ms / 1000 - time.monotonic()))
    await sim.cluster.wait_ready()


async def server_kill(sim: "Sim", op: Op) -> None:
    """SIGKILL the server process a paid call is talking to, a few ms into the call; start it again."""
    index = op.a % len(sim.cluster.servers)
    server = sim.cluster.servers[index]
    payers = _payers(sim, op, 1)
    call = asyncio.ensure_future(sim.paid_call(op, payers[0], index)) if payers else None
    await asyncio.sleep((op.c % 30) / 1000)
    server.stop(signal.SIGKILL)
    if call is not None:
        await call
    server.start()
    await sim.cluster.wait_ready()


async def worker_kill(sim: "Sim", op: Op) -> None:
    """SIGKILL a QA worker (a run it holds is claimed by the other after QA_LEASE) and start it again."""
    if not sim.cluster.workers:
        return
    worker = sim.cluster.workers[op.a % len(sim.cluster.workers)]
    worker.stop(signal.SIGKILL)
    worker.start()


FAULT_OPS: dict[str, Callable[["Sim", Op], Awaitable[None]]] = {
    "redis_restart": redis_restart, "redis_pause": redis_pause, "redis_busy": redis_busy, "server_kill": server_kill, "worker_kill": worker_kill,
}
