"""Concurrent calls merged into one: the online client's reads from serving's thread pool.

A serving replica answers many requests at once, each needing one read of the online store. Run one by one, a
read costs ~1 ms of CPU, mostly under the GIL, and 16 in flight on two cores queue behind each other (the p99 of
16 closed-loop readers was 30-48 ms, BENCHMARKS.md). Merged, the requests waiting at one moment become one read:
the per-read costs (statement, round trip, decoding set-up) are paid once, and the candidates and authors that
several requests share are read once.

`MergedCalls(read_many, slots, most, depth)` runs `read_many` on the waiting requests, at most `most` per call, on at
most `slots` reader threads. A caller whose request is in a call gets its own answer (or the call's exception).
Freshness is kept: a call only takes requests that were waiting when it started, so no request is answered by
a read that began before it arrived. Order is kept: requests are taken oldest first.

A call's answers come back as a list, or from a generator (`return answers`) that yields while it waits for a
store that answers over the network. A reader thread keeps up to `depth` such calls in flight and steps them in
turn: while the server answers one call, the thread decodes another's answer or sends its request, instead of
waiting on a socket with the server and the client each idle half the time (Redis: BENCHMARKS.md, feature store).
Several calls in flight on one thread, not one call on each of several threads: two reader threads contend for
the GIL, and a thread whose answer has arrived can wait up to the 5 ms switch interval for it.

Why reader threads, not the callers' own threads taking turns (the design until 2026-12-05): a reader thread
that has answered a call goes straight on to the next one, while a caller handed the turn must first be woken
and win the GIL from the callers just answered; that hand-over sat on the critical path of every read (16
closed-loop readers on SQLite: p99 13-15 ms handing over, 8.6-8.7 with a reader thread). The price is one
wake-up (~0.1 ms) for a request that arrives alone. A reader thread idle for `idle_s` ends; the next call
starts one again.

>>> merged = MergedCalls(lambda xs: [x * 2 for x in xs], slots=1, most=8)
>>> merged(21)
42
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Generator
from types import GeneratorType
from typing import Generic, TypeVar

Ask = TypeVar("Ask")
Answer = TypeVar("Answer")


class _Waiting:
    __slots__ = ("answer", "ask", "done", "error")

    def __init__(self, ask):
        self.ask, self.answer, self.error = ask, None, None
        # Released once, by the reader thread, when the answer (or error) is set. A bare lock rather than an
        # Event: an Event's set and wait go through a Condition written in Python.
        self.done = threading.Lock()
        self.done.acquire()


Steps = Generator[None, None, list]  # yields while the store answers, returns the answers


class MergedCalls(Generic[Ask, Answer]):
    """`read_many(asks) -> answers` (same length and order, or a generator returning them) called for many
    concurrent callers at once."""

    def __init__(self, read_many: Callable[[list[Ask]], list[Answer] | Steps], slots: int, most: int,
                 depth: int = 1, idle_s: float = 10.0):
        if slots < 1 or most < 1 or depth < 1:
            raise ValueError(f"slots, most and depth must be >= 1, got {slots}, {most} and {depth}")
        self.read_many, self.slots, self.most, self.depth, self.idle_s = read_many, slots, most, depth, idle_s
        self._cv, self._waiting = threading.Condition(threading.Lock()), deque()
        self._idle = self._readers = 0  # reader threads waiting for work / alive
        self.reading = 0  # calls of read_many in progress
        self.calls = 0  # read_many calls made (the tests and benchmarks read the merge ratio from it)

    def __call__(self, ask: Ask) -> Answer:
        me = _Waiting(ask)
        with self._cv:
            self._waiting.append(me)
            if self._idle:
                self._cv.notify()
            elif self._readers < self.slots:
                self._readers += 1
                threading.Thread(target=self._read_while_asked, name="merged-reads", daemon=True).start()
        me.done.acquire()
        if me.error is not None:
            raise me.error
        return me.answer

    def _read_while_asked(self) -> None:
        """A reader thread: answer the oldest waiting requests, call after call, until idle for `idle_s`; with
        `depth` > 1, the calls that are generators are stepped in turn, up to `depth` at once."""
        in_flight: deque[tuple[list[_Waiting], Steps]] = deque()
        while True:
            with self._cv:
                while not self._waiting and not in_flight:
                    self._idle += 1
                    notified = self._cv.wait(self.idle_s)
                    self._idle -= 1
                    if not notified and not self._waiting:
                        self._readers -= 1
                        return
                batch = None
                if self._waiting and len(in_flight) < self.depth:
                    batch = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.most))]
                    self.calls += 1
                    self.reading += 1
            if batch is not None:
                try:
                    answers = self.read_many([w.ask for w in batch])
                except BaseException as err:
                    self._finish(batch, None, err)
                    continue
                if isinstance(answers, GeneratorType):
                    self._step(batch, answers, in_flight)  # its first step sends its request
                else:
                    self._finish(batch, answers, None)
                continue  # room for another call while this one's request is out?
            # Step the oldest call in flight: it sent its request longest ago, so its answer is the likeliest to be
            # there already.
            self._step(*in_flight.popleft(), in_flight)

    def _step(self, batch: list[_Waiting], steps: Steps, in_flight: deque) -> None:
        try:
            next(steps)
        except StopIteration as done:
            self._finish(batch, done.value, None)
        except BaseException as err:
            self._finish(batch, None, err)
        else:
            in_flight.append((batch, steps))

    def _finish(self, batch: list[_Waiting], answers: list | None, error: BaseException | None) -> None:
        """Hand each request of a call its answer, or every request the call's failure; the thread reads on."""
        if error is None and len(answers) != len(batch):
            error = RuntimeError(f"read_many answered {len(answers)} of {len(batch)} requests")
        for n, w in enumerate(batch):
            if error is None:
                w.answer = answers[n]
            else:
                w.error = error
        with self._cv:
            self.reading -= 1
        for w in batch:
            w.done.release()


def run_steps(steps: Steps) -> list:
    """The answers of a `read_many` generator called directly, without merging: it run to the end."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
