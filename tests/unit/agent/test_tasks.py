"""TaskSet: named tracked tasks, crashes logged once, shutdown with grace that never cancels a protected task."""
from __future__ import annotations

import asyncio

import pytest
import structlog

from agent.daemon.tasks import TaskSet


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_spawned_task_is_tracked_until_it_ends():
    async def main():
        ts = TaskSet("t")
        gate = asyncio.Event()
        task = ts.spawn(gate.wait(), "waiter")
        assert task.get_name() == "waiter" and list(ts) == [task] and len(ts) == 1
        gate.set()
        await task
        await asyncio.sleep(0)          # ok: the done-callback runs on the next loop turn
        return len(ts)

    assert run(main()) == 0


def test_crash_is_logged_once_with_traceback():
    async def boom():
        raise RuntimeError("kaboom")

    async def main():
        ts = TaskSet("t")
        with structlog.testing.capture_logs() as logs:
            task = ts.spawn(boom(), "bomb")
            await asyncio.wait([task])
            await asyncio.sleep(0)      # ok: one loop turn for the done-callback
        return logs, len(ts)

    logs, left = run(main())
    crashes = [e for e in logs if e["event"] == "task_crashed"]
    assert left == 0 and len(crashes) == 1
    assert crashes[0]["task"] == "bomb" and "kaboom" in crashes[0]["error"]
    assert crashes[0]["exc_info"][0] is RuntimeError          # the traceback travels with it


def test_shutdown_lets_tasks_finish_within_grace():
    async def main():
        ts = TaskSet("t")
        done = []

        async def short():
            await asyncio.sleep(0.05)   # ok: a task that takes a while, inside the grace
            done.append("short")

        task = ts.spawn(short(), "short")
        await ts.shutdown(grace_s=5.0)
        return task, done

    task, done = run(main())
    assert done == ["short"] and not task.cancelled()


def test_shutdown_cancels_cancellable_and_waits_for_protected():
    async def main():
        ts = TaskSet("t")
        release = asyncio.Event()
        log = []

        async def forever():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                log.append("cancelled")
                raise

        async def rollback():
            await release.wait()          # ends only when released: must not be cancelled
            log.append("rolled back")

        a = ts.spawn(forever(), "forever")
        b = ts.spawn(rollback(), "rollback", cancellable=lambda: False)
        stopper = asyncio.create_task(ts.shutdown(grace_s=0.05))
        while not a.done():
            await asyncio.sleep(0.01)   # poll: until the cancellable task is cancelled
        assert not stopper.done() and not b.done()     # still waiting for the protected task
        release.set()
        await stopper
        return a, b, log

    a, b, log = run(main())
    assert a.cancelled() and not b.cancelled()
    assert log == ["cancelled", "rolled back"]


def test_cancellable_is_asked_at_the_end_of_the_grace():
    """A task that becomes uncancellable during the grace (a switchover began) is not cancelled."""
    async def main():
        ts = TaskSet("t")
        state = {"phase": "precopy"}
        release = asyncio.Event()

        async def job():
            state["phase"] = "resume"
            await release.wait()

        task = ts.spawn(job(), "job", cancellable=lambda: state["phase"] == "precopy")
        stopper = asyncio.create_task(ts.shutdown(grace_s=0.05))
        await asyncio.sleep(0.2)        # ok: past the 0.05 s grace, nothing may cancel the task
        assert not task.done()
        release.set()
        await stopper
        return task

    assert not run(main()).cancelled()


def test_cancel_all_for_pollers():
    async def main():
        ts = TaskSet("t")
        t = ts.spawn(asyncio.sleep(60), "poller")
        ts.cancel_all()
        await asyncio.wait([t])
        return t

    assert run(main()).cancelled()


@pytest.mark.parametrize("grace", [0, 0.01])
def test_shutdown_of_an_empty_set_returns(grace):
    run(TaskSet("t").shutdown(grace))
