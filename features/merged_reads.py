"""Concurrent calls merged into one: the online client's reads from serving's thread pool.

A serving replica answers many requests at once, each needing one read of the online store. Run one by one, a
read costs ~1 ms of CPU, mostly under the GIL, and 16 in flight on two cores queue behind each other (the p99 of
16 closed-loop readers was 30-48 ms, BENCHMARKS.md). Merged, the requests waiting at one moment become one read:
the per-read costs (statement, round trip, decoding set-up) are paid once, and the candidates and authors that
several requests share are read once.

`MergedCalls(read_many, slots, most)` runs `read_many` on the waiting requests, at most `most` per call and at
most `slots` calls at once. A caller whose request is in a call gets its own answer (or the call's exception).
Freshness is kept: a call only takes requests that were waiting when it started, so no request is answered by
a read that began before it arrived. Order is kept: requests are taken oldest first, and when a call ends its
slot goes to the oldest waiting request, whose thread then runs the next call (flat combining: no extra
thread, and a lone request runs at once on its own thread).

>>> merged = MergedCalls(lambda xs: [x * 2 for x in xs], slots=1, most=8)
>>> merged(21)
42
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

Ask = TypeVar("Ask")
Answer = TypeVar("Answer")


class _Waiting:
    __slots__ = ("answer", "ask", "error", "ready", "runs")

    def __init__(self, ask):
        self.ask, self.answer, self.error = ask, None, None
        self.ready = threading.Event()  # set once: answered, or handed a slot (`runs`)
        self.runs = False


class MergedCalls(Generic[Ask, Answer]):
    """`read_many(asks) -> answers` (same length and order) called for many concurrent callers at once."""

    def __init__(self, read_many: Callable[[list[Ask]], list[Answer]], slots: int, most: int):
        if slots < 1 or most < 1:
            raise ValueError(f"slots and most must be >= 1, got {slots} and {most}")
        self.read_many, self.most = read_many, most
        self.free, self._lock, self._waiting = slots, threading.Lock(), deque()
        self.calls = 0  # read_many calls made (the tests and benchmarks read the merge ratio from it)

    def __call__(self, ask: Ask) -> Answer:
        me = _Waiting(ask)
        with self._lock:
            if self.free:
                self.free -= 1
                me.runs = True
            else:
                self._waiting.append(me)
        if not me.runs:
            me.ready.wait()
        if me.runs:
            self._run(me)
        if me.error is not None:
            raise me.error
        return me.answer

    def _run(self, me: _Waiting) -> None:
        """Answer `me` and the oldest waiting requests in one call, then hand the slot on."""
        with self._lock:
            batch = [me] + [self._waiting.popleft() for _ in range(min(len(self._waiting), self.most - 1))]
            self.calls += 1
        try:
            answers = self.read_many([w.ask for w in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"read_many answered {len(answers)} of {len(batch)} requests")
            for w, answer in zip(batch, answers):
                w.answer = answer
        except BaseException as err:  # every request of the call gets the failure (and the slot is handed on)
            for w in batch:
                w.error = err
        finally:
            with self._lock:
                if self._waiting:
                    nxt = self._waiting.popleft()
                    nxt.runs = True
                    nxt.ready.set()
                else:
                    self.free += 1
            for w in batch[1:]:
                w.ready.set()
