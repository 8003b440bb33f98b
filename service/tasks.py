"""Background tasks that always stop: every task the service starts is kept here (asyncio holds only weak
references to tasks) and stopped with a bounded wait, so a task that swallows its cancellation (a
library that turns CancelledError into its own error) cannot hang a shutdown."""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Iterable

import structlog

__all__ = ["spawn", "stop", "stop_spawned", "cancelling"]

log = structlog.get_logger("tasks")
_SPAWNED: set[asyncio.Task] = set()


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
    """Fire-and-forget work (webhooks): referenced until done, cancelled at shutdown by stop_spawned."""
    task = asyncio.create_task(coro, name=name)
    _SPAWNED.add(task)
    task.add_done_callback(_SPAWNED.discard)
    return task


def cancelling() -> bool:
    """True when the current task was asked to stop: a loop that catches Exception must re-raise then."""
    task = asyncio.current_task()
    return bool(task and task.cancelling())


async def stop(tasks: Iterable[asyncio.Task], timeout: float = 5.0) -> list[str]:
    """Cancel, then wait at most `timeout` s in all (asyncio.wait never re-waits on a stubborn task);
    returns the names of tasks still running, which are logged and left behind."""
    tasks = [t for t in tasks if not t.done()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task_failed", task=task.get_name(), error=repr(task.exception()))
    names = sorted(t.get_name() for t in pending)
    if names:
        log.error("tasks_did_not_stop", tasks=names, timeout=timeout)
    return names


async def stop_spawned(timeout: float = 5.0) -> list[str]:
    """Stop every task started with spawn() in this event loop."""
    loop = asyncio.get_running_loop()
    return await stop([t for t in _SPAWNED if t.get_loop() is loop], timeout)
