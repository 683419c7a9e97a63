"""The asyncio pieces of the runner: a slot gate for programs in flight, lanes that run a batch, and
an eager start for a program's steps asked ahead.

All run on one event loop (the engine's) and hold thousands of waiting programs at once, which is
why none is the standard library's: `Slots` releases in O(1), `Lanes` uses a task per program
in flight instead of a task per row, and `start_eagerly` makes a task only for a step that waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine
from typing import Any, Awaitable, Callable


class Slots:
    """A counting semaphore whose release is O(1): Python 3.11's asyncio.Semaphore scans its waiter
    queue on every release, past the waiters already woken but not yet run, and the runner keeps
    thousands of programs waiting for a slot."""

    def __init__(self, count: int):
        self.free = count
        self.waiters: deque[asyncio.Future] = deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return
        slot = asyncio.get_running_loop().create_future()
        self.waiters.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # handed a slot, then cancelled: pass it on
                self._release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        while self.waiters:  # hand the slot straight to the first waiter still waiting
            slot = self.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self.free += 1


Records = list[dict[str, Any]]


class Lanes:
    """A batch's rows, run by lanes: tasks that each take the batch's next row when their program ends.

    A lane runs rows one after another, so a batch needs a task per program in flight, not per row
    (a task is Python bookkeeping at creation, scheduling and in the all-tasks registry). Lanes
    start while slots are free: a lane that took a slot, when no lane it started has begun yet,
    starts as many as are running, up to the free slots and the rows left, so a batch's programs in
    flight double per turn of the loop. Programs that never wait (every window settled, an instant
    engine) run a whole batch in one lane.
    """

    def __init__(self, rows: list[dict[str, Any]], run_row: Callable[[dict[str, Any]], Awaitable[Records]],
                 slots: Slots):
        self.rows, self.run_row, self.slots = rows, run_row, slots
        self.records: list[Records] = [[] for _ in rows]
        self.next = 0  # the next row to take
        self.running = 0  # lanes running a row
        self.loop = asyncio.get_running_loop()
        self.tasks = [self.loop.create_task(self._lane())] if rows else []
        self.starting = len(self.tasks)  # lanes started that have not begun

    async def _lane(self) -> None:
        self.starting -= 1
        rows, slots = self.rows, self.slots
        while self.next < len(rows):
            index = self.next
            self.next += 1
            async with slots:
                self.running += 1
                if not self.starting and slots.free:
                    more = min(self.running, slots.free, len(rows) - self.next)
                    self.starting += more
                    self.tasks += [self.loop.create_task(self._lane()) for _ in range(more)]
                try:
                    self.records[index] = await self.run_row(rows[index])
                finally:
                    self.running -= 1

    async def results(self) -> list[Records]:
        """Every row's records, in row order, once every lane has ended."""
        done = 0
        while done < len(self.tasks):  # lanes start lanes: the list grows until the last one ends
            await self.tasks[done]
            done += 1
        return self.records

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class _Rest(Coroutine):
    """The rest of a coroutine already run up to its first wait, as a coroutine a task can drive: its
    first step hands the task what the coroutine waits on; a cancellation thrown in before it, or
    after, reaches the coroutine's own wait."""

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any):
        self._coro, self._waiting_on, self._first = coro, waiting_on, True

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            return self._waiting_on
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self._first = False
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __await__(self) -> "_Rest":  # awaited directly, it is its own iterator of the same steps
        return self


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Future:
    """Run `coro` now, up to its first wait, and return a future of its result: a finished one when
    it never waited (an instant engine, a reply ready at once), else a task that runs the rest. A
    task per step asked ahead is scheduling work on the loop even for a step that needs no waiting
    (what `asyncio.eager_task_factory` does from Python 3.12)."""
    loop = asyncio.get_running_loop()
    try:
        waiting_on = coro.send(None)
    except StopIteration as stop:
        done = loop.create_future()
        done.set_result(stop.value)
        return done
    except BaseException as exc:  # noqa: BLE001 - raised when awaited, as a task's would be
        failed = loop.create_future()
        failed.set_exception(exc)
        return failed
    return loop.create_task(_Rest(coro, waiting_on))
