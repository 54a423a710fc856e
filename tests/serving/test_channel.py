"""The engine-to-request event channel: nothing lost, nothing twice, order kept, lagging pieces merged."""

from __future__ import annotations

import asyncio
import threading

from dbtrimkv.serving.channel import EventChannel, merge_tokens
from dbtrimkv.serving.records import Event


def test_merge_joins_consecutive_token_pieces_only():
    events = [Event("token", text="a"), Event("token", text="b"), Event("done", finish_reason="stop"),
              Event("token", text="c")]
    assert merge_tokens(events) == [Event("token", text="ab"), Event("done", finish_reason="stop"),
                                    Event("token", text="c")]
    assert merge_tokens([]) == []


def test_events_from_another_thread_arrive_in_order_once_and_lagging_pieces_come_merged():
    pieces = [f"<{i}>" for i in range(2000)]

    async def main():
        channel = EventChannel(asyncio.get_running_loop())
        calls = []
        real = channel.loop.call_soon_threadsafe
        channel.loop.call_soon_threadsafe = lambda *a: calls.append(1) or real(*a)

        def engine():
            for piece in pieces:
                channel.put(Event("token", text=piece))
            channel.put(Event("done", finish_reason="length"))

        thread = threading.Thread(target=engine)
        thread.start()
        got, takes = [], 0
        while True:
            batch = await channel.take()
            takes += 1
            assert all(a.kind != "token" or b.kind != "token" for a, b in zip(batch, batch[1:]))  # merged
            got += batch
            if got[-1].kind == "done":
                break
            await asyncio.sleep(0)  # a slow reader
        thread.join()
        return got, takes, len(calls)

    got, takes, wakes = asyncio.run(main())
    assert "".join(e.text for e in got if e.kind == "token") == "".join(pieces)  # in order, none lost or repeated
    assert got[-1] == Event("done", finish_reason="length") and sum(e.kind == "done" for e in got) == 1
    assert takes < len(pieces) and wakes < len(pieces)  # the reader lagged: fewer wake-ups and chunks than tokens


def test_take_waits_for_the_next_event():
    async def main():
        channel = EventChannel(asyncio.get_running_loop())
        waiter = asyncio.ensure_future(channel.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        threading.Thread(target=channel.put, args=(Event("token", text="x"),)).start()
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(main()) == [Event("token", text="x")]
