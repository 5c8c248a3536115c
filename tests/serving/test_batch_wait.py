"""BusyBatchWait: a request waits for company only while an earlier batch is still running."""

import asyncio

from serving.common import BusyBatchWait


class _Batched:
    def __init__(self):
        self.waits = []

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_wait_is_zero_when_idle_and_busy_s_while_a_batch_runs():
    batched = _Batched()
    wait = BusyBatchWait(batched, busy_s=0.02)

    async def scenario():
        wait.before_request()

        async def outer():
            wait.before_request()
            await wait.run(inner_batch)  # Serve may run a second batch concurrently
            wait.before_request()

        def inner_batch():
            wait.before_request()

        await wait.run(lambda: asyncio.run(outer()))
        wait.before_request()

    asyncio.run(scenario())
    assert batched.waits == [0.0, 0.02, 0.02, 0.02, 0.0]
