"""The projector's writer thread (``WriterLoop``, decision 0095): coroutines run on its
own loop and thread, results and errors come back, cancelling the caller cancels the
write there, and ``stop`` lets what runs end before the thread stops."""

from __future__ import annotations

import asyncio
import threading

import pytest

from streams.projections.projector import WriterLoop

pytestmark = pytest.mark.unit

WAIT_S = 5.0


async def _thread_id() -> int:
    await asyncio.sleep(0)
    return threading.get_ident()


async def _fails() -> None:
    raise RuntimeError("refused write")


def test_a_coroutine_runs_on_the_writer_thread_and_its_result_comes_back() -> None:
    async def main() -> None:
        writer = WriterLoop("test-writer")
        try:
            assert await writer.call(_thread_id()) != threading.get_ident()
            with pytest.raises(RuntimeError, match="refused write"):
                await writer.call(_fails())
        finally:
            await writer.stop(None)
        assert not any(t.name == "test-writer" for t in threading.enumerate())

    asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_cancelling_the_caller_cancels_the_write_and_stop_waits_for_its_unwinding() -> None:
    started, unwound = threading.Event(), threading.Event()

    async def long_write() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # a rollback takes a step on the writer's loop
            unwound.set()

    async def main() -> None:
        writer = WriterLoop("test-writer-cancel")
        caller = asyncio.ensure_future(writer.call(long_write()))
        while not started.is_set():
            await asyncio.sleep(0.001)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await writer.stop(None)
        assert unwound.is_set()

    asyncio.run(asyncio.wait_for(main(), WAIT_S))


def test_the_metrics_show_where_the_projection_loop_waited() -> None:
    from streams.projections.metrics import ProjectorMetrics
    from streams.projections.projector import ProjectionStats

    metrics = ProjectorMetrics()
    stats = ProjectionStats(batches=1, write_wait_s=1.5, read_wait_s=0.25, end_offset_wait_s=0.5,
                            follow_cpu_s=2.0, write_cpu_s=0.75)
    metrics.on_stats(stats, batches_before=0)
    for on, seconds in (("write", 1.5), ("read", 0.25), ("end_offset", 0.5)):
        assert metrics.registry.get_sample_value(
            "capledger_projector_waited_seconds", {"on": on}) == seconds
    for part, seconds in (("follow", 2.0), ("write", 0.75)):  # decision 0096
        assert metrics.registry.get_sample_value(
            "capledger_projector_cpu_seconds", {"part": part}) == seconds
