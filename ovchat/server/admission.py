"""Admission: how many requests of one model generate at once, and how many may wait their turn."""

from __future__ import annotations

import asyncio
import collections
from typing import Deque, Optional

from ovchat.errors import EngineUnavailableError, ServerBusyError


class Admission:
    """At most ``running`` requests generate at once; up to ``waiting`` more wait their turn (FIFO).

    Past that a request is refused at once (ServerBusyError: 429 with Retry-After), so a burst
    cannot pile up unbounded work. A slot is released exactly once, and a waiter that gives up
    (its client left) passes on a slot it was handed in the same instant. ``close`` refuses
    every waiter and every newcomer (the server is shutting down).
    """

    def __init__(self, running: int, waiting: int):
        self.running = running
        self.waiting = waiting
        self._free = running
        self._waiters: Deque[asyncio.Future] = collections.deque()
        self._closed = False

    @property
    def busy(self) -> int:
        return self.running - self._free

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> "Slot":
        if self._closed:
            raise EngineUnavailableError("the server is shutting down", code="shutting_down")
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return Slot(self)
        if len(self._waiters) >= self.waiting:
            raise ServerBusyError(f"the server is busy ({self.running} requests running, {len(self._waiters)} "
                                  "waiting); retry shortly", code="server_busy")
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled() and turn.exception() is None:
                self._release()  # handed a slot just as we gave up: pass it on
            elif turn in self._waiters:  # _release may already have skipped and dropped it
                self._waiters.remove(turn)
            raise
        return Slot(self)

    def close(self) -> int:
        """Refuse every waiter now and every later request; returns how many waited."""
        self._closed = True
        refused = 0
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_exception(EngineUnavailableError("the server is shutting down", code="shutting_down"))
                refused += 1
        return refused

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class Slot:
    def __init__(self, admission: Admission):
        self._admission: Optional[Admission] = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None
