"""Run one function in several threads at once; a failure in any thread fails the caller."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_together(fn: Callable[[], None], n: int) -> None:
    """`fn` in `n` threads started together; re-raises the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            fn()
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
