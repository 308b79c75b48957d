"""The engine thread's outputs reach the event loop through services.inference.async_engine.OutputMailbox:
every output arrives, in order, in its own request's queue, with one loop wakeup for a burst (a step's
tokens for every running request) rather than one each."""

from __future__ import annotations

import asyncio
import threading

from services.inference.async_engine import OutputMailbox
from services.inference.engine import EngineOutput


def test_a_burst_of_outputs_is_one_wakeup_and_keeps_each_queues_order():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakeups = 0
        schedule = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakeups
            wakeups += 1
            return schedule(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        mailbox = OutputMailbox(loop)
        queues: list[asyncio.Queue[EngineOutput]] = [asyncio.Queue() for _ in range(32)]
        for step in range(3):  # one step's token for every request, without yielding to the loop
            for i, queue in enumerate(queues):
                mailbox.post(queue, EngineOutput(f"r{i}", [step]))
        assert wakeups == 1 and all(q.empty() for q in queues)
        await asyncio.sleep(0)
        assert [[q.get_nowait().token_ids[0] for _ in range(3)] for q in queues] == [[0, 1, 2]] * 32
        mailbox.post(queues[0], EngineOutput("r0", [3]))  # the next burst wakes the loop again
        assert wakeups == 2
        assert (await queues[0].get()).token_ids == [3]

    asyncio.run(main())


def test_outputs_posted_from_another_thread_all_arrive_in_order():
    async def main() -> None:
        mailbox = OutputMailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        thread = threading.Thread(target=lambda: [mailbox.post(queue, EngineOutput("r", [i])) for i in range(2000)])
        thread.start()
        got = [(await asyncio.wait_for(queue.get(), 5)).token_ids[0] for _ in range(2000)]
        thread.join()
        assert got == list(range(2000))

    asyncio.run(main())
