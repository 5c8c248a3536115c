"""`MergedCalls`: concurrent requests merged into one call, oldest first, each answered with its own answer."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.merged_reads import MergedCalls, run_steps


def queue_in_order(merged: MergedCalls, asks: list[int], results: dict) -> list[threading.Thread]:
    """Start one thread per ask, each queued before the next starts (the running call holds every reader)."""
    threads = []
    for n, ask in enumerate(asks):
        def call(ask=ask):
            try:
                results[ask] = merged(ask)
            except Exception as err:  # the test inspects what each caller got
                results[ask] = err
        threads.append(threading.Thread(target=call))
        threads[-1].start()
        while len(merged._waiting) < n + 1:
            time.sleep(0.001)
    return threads


def test_requests_waiting_for_a_reader_are_read_together_oldest_first():
    calls, release = [], threading.Event()

    def read_many(asks):
        calls.append(list(asks))
        if asks == [0]:
            release.wait(10)
        return [ask * 10 for ask in asks]

    merged, results = MergedCalls(read_many, slots=1, most=3), {}
    first = threading.Thread(target=lambda: results.setdefault(0, merged(0)))
    first.start()
    while not calls:
        time.sleep(0.001)
    threads = queue_in_order(merged, [1, 2, 3, 4, 5], results)
    release.set()
    for t in [first, *threads]:
        t.join(10)
    # The running read took only what was waiting when it began; the rest went in calls of at most 3.
    assert calls == [[0], [1, 2, 3], [4, 5]]
    assert results == {n: n * 10 for n in range(6)} and merged.reading == 0 and merged.calls == 3


def test_a_failed_call_fails_only_its_own_requests():
    release = threading.Event()

    def read_many(asks):
        if asks == [0]:
            release.wait(10)
        if 2 in asks:
            raise RuntimeError("store down")
        return [-ask for ask in asks]

    merged, results = MergedCalls(read_many, slots=1, most=2), {}
    first = threading.Thread(target=lambda: results.setdefault(0, merged(0)))
    first.start()
    while not merged.reading:
        time.sleep(0.001)
    threads = queue_in_order(merged, [1, 2, 3], results)
    release.set()
    for t in [first, *threads]:
        t.join(10)
    assert results[0] == 0 and results[3] == -3
    assert all(isinstance(results[n], RuntimeError) for n in (1, 2)) and merged.reading == 0
    assert merged(4) == -4  # the reader thread reads on after a failed call


def test_a_call_that_answers_the_wrong_number_of_requests_is_an_error():
    with pytest.raises(RuntimeError, match="answered 0 of 1"):
        MergedCalls(lambda asks: [], slots=1, most=4)(1)
    with pytest.raises(ValueError, match="slots, most and depth"):
        MergedCalls(lambda asks: asks, slots=0, most=4)


def test_calls_in_flight_on_one_thread_are_stepped_oldest_first_and_fail_alone():
    """With `depth` 2, a reader thread starts a second call while the first waits on its store (the generator's
    yield), steps the oldest first, and a call that fails fails only its own requests."""
    log, release = [], threading.Event()

    def read_many(asks):
        (ask,) = asks
        log.append(("send", ask))
        if ask == 0:
            release.wait(10)  # the first call holds the thread until every request is waiting
        yield
        log.append(("receive", ask))
        if ask == 1:
            raise RuntimeError("store failed")
        return [ask * 10]

    merged, results = MergedCalls(read_many, slots=1, most=1, depth=2), {}
    threads = queue_in_order(merged, [0], results)
    while not log:
        time.sleep(0.001)
    threads += queue_in_order(merged, [1, 2], results)
    release.set()
    for t in threads:
        t.join(10)
    assert log == [("send", 0), ("send", 1), ("receive", 0), ("send", 2), ("receive", 1), ("receive", 2)]
    assert results[0] == 0 and results[2] == 20 and isinstance(results[1], RuntimeError)
    assert merged.reading == 0 and merged(3) == 30


@settings(max_examples=30, deadline=None)
@given(slots=st.integers(1, 3), most=st.integers(1, 6), threads=st.integers(1, 8), depth=st.integers(1, 3),
       stepped=st.booleans())
def test_under_contention_every_request_gets_its_own_answer_within_the_limits(slots, most, threads, depth, stepped):
    """Plain calls, or generator calls (`stepped`) of which each reader thread keeps up to `depth` in flight."""
    lock, running, peak, sizes = threading.Lock(), [0], [0], []

    def read_many(asks):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            sizes.append(len(asks))
        time.sleep(0.0005)
        if stepped:
            yield
            time.sleep(0.0005)
        with lock:
            running[0] -= 1
        return [(ask, "read") for ask in asks]

    merged, wrong = MergedCalls(read_many if stepped else lambda asks: run_steps(read_many(asks)), slots, most,
                                depth), []

    def caller(t: int) -> None:
        for k in range(30):
            ask = (t, k)
            if merged(ask) != (ask, "read"):
                wrong.append(ask)

    workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert not wrong and sum(sizes) == 30 * threads
    assert peak[0] <= slots * (depth if stepped else 1) and max(sizes) <= most and merged.reading == 0


def test_an_idle_reader_thread_ends_and_the_next_call_starts_one():
    merged = MergedCalls(lambda asks: [ask + 1 for ask in asks], slots=2, most=4, idle_s=0.05)
    assert merged(1) == 2 and merged._readers == 1  # a lone request needs one reader, not both slots
    deadline = time.monotonic() + 10
    while merged._readers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert merged._readers == 0
    assert merged(2) == 3 and merged.calls == 2
