"""TaskSet: the one way the daemon and the endpoint run long-lived tasks.

Compare asyncssh's ``create_task`` + ``_reap_task`` and uvicorn's shutdown:

- ``spawn(coro, name, cancellable=...)`` starts a named task and keeps it
  until it ends; the done-callback consumes its result, so a crash is
  logged once, with its traceback, and never as "exception was never
  retrieved".
- ``shutdown(grace_s)`` waits up to ``grace_s`` for every task, then
  cancels those whose ``cancellable()`` still says yes and waits for them
  (cancelling a migration rolls it back, which takes a moment); a task
  that says no (a rollback under way, a switchover past the point of no
  return) is never cancelled: it is waited for until it ends.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Coroutine, Iterator

from agent.observe.logs import get_logger

log = get_logger("livemig.tasks")

CANCEL_WAIT_S = 10.0           # after a cancel: time for the task's rollback to finish
PROTECTED_LOG_EVERY_S = 5.0    # how often a wait for uncancellable tasks is logged


def _always() -> bool:
    return True


class TaskSet:
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: dict[asyncio.Task, Callable[[], bool]] = {}

    def spawn(self, coro: Coroutine, name: str, *, cancellable: Callable[[], bool] = _always) -> asyncio.Task:
        """Run ``coro`` as task ``name``; ``cancellable()`` is asked at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = cancellable
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_crashed", owner=self.owner, task=task.get_name(), error=repr(exc),
                      exc_info=(type(exc), exc, exc.__traceback__))

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task]:
        return iter(list(self._tasks))

    def cancel_all(self) -> None:
        """Cancel every task now (for tasks that hold nothing: pollers, timers)."""
        for t in list(self._tasks):
            t.cancel()

    async def shutdown(self, grace_s: float, cancel_wait_s: float = CANCEL_WAIT_S) -> None:
        """Grace for all, then cancel the cancellable ones; the others are waited for."""
        pending = set(self._tasks)
        if pending and grace_s > 0:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        protected = {t for t in pending if not self._tasks.get(t, _always)()}
        cancelled = pending - protected
        for t in cancelled:
            log.info("task_cancelled_at_shutdown", owner=self.owner, task=t.get_name())
            t.cancel()
        if cancelled:
            _, late = await asyncio.wait(cancelled, timeout=cancel_wait_s)
            for t in late:
                log.error("task_did_not_end_after_cancel", owner=self.owner, task=t.get_name())
        await self._wait_protected(protected)

    async def _wait_protected(self, protected: set[asyncio.Task]) -> None:
        while protected:
            log.info("waiting_for_uncancellable_tasks", owner=self.owner,
                     tasks=sorted(t.get_name() for t in protected))
            _, protected = await asyncio.wait(protected, timeout=PROTECTED_LOG_EVERY_S)
