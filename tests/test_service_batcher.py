"""The dynamic batcher on its own, with a fake model (fast, deterministic)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from app.batcher import BatcherClosedError, DynamicBatcher, QueueFullError


class FakeModel:
    """Score = mean of the tensor; records batch sizes and checks it never runs twice at once."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches: list[tuple] = []
        self.threads: set[str] = set()
        self._busy = threading.Lock()

    def __call__(self, batch: torch.Tensor, profiles=None):
        assert self._busy.acquire(blocking=False), "two forward passes at once"
        try:
            self.threads.add(threading.current_thread().name)
            self.batches.append(tuple(batch.shape))
            time.sleep(self.delay)
            return batch.mean(dim=(1, 2, 3))
        finally:
            self._busy.release()


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def image(value: float, h=8, w=8):
    return torch.full((3, h, w), float(value))


def test_concurrent_requests_share_batches_and_get_their_own_scores():
    model = FakeModel(delay=0.05)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.02, max_queue=64)
        batcher.start()
        values = [i / 100 for i in range(20)]
        results = await asyncio.gather(*(batcher.score(image(v)) for v in values))
        await batcher.close(timeout=5)
        return values, results

    values, results = run(main())
    assert [round(r.score, 6) for r in results] == [round(v, 6) for v in values]
    assert max(size for size, *_ in model.batches) == 8
    assert sum(size for size, *_ in model.batches) == 20
    assert all(r.batch_size >= 1 for r in results)
    assert len(model.threads) == 1 and next(iter(model.threads)).startswith("resmemnet-model")


def test_batches_never_mix_shapes():
    model = FakeModel(delay=0.02)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=16, max_wait_s=0.05, max_queue=64)
        batcher.start()
        tensors = [image(i, h=8, w=8 if i % 3 else 16) for i in range(12)]
        results = await asyncio.gather(*(batcher.score(t) for t in tensors))
        await batcher.close(timeout=5)
        return results

    results = run(main())
    assert [round(r.score) for r in results] == list(range(12))
    for shape in model.batches:
        assert shape[2:] in ((8, 8), (8, 16))
    assert len(model.batches) == 2  # one batch per shape: everything arrived within the window


def test_max_batch_one_turns_batching_off():
    model = FakeModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=1.0, max_queue=64)
        batcher.start()
        started = time.perf_counter()
        await asyncio.gather(*(batcher.score(image(i)) for i in range(5)))
        await batcher.close(timeout=5)
        return time.perf_counter() - started

    elapsed = run(main())
    assert [b[0] for b in model.batches] == [1] * 5
    assert elapsed < 1.0  # a full batch (of 1) never waits for the window


def test_full_queue_is_refused_at_once_and_frees_up_again():
    model = FakeModel(delay=0.2)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=3)
        batcher.start()
        admitted = [batcher.admit(1) for _ in range(3)]
        started = time.perf_counter()
        with pytest.raises(QueueFullError):
            batcher.admit(1)
        refused_in = time.perf_counter() - started
        with pytest.raises(QueueFullError):  # all-or-nothing for multi-image requests
            admitted[0].release() or batcher.admit(2)
        futures = [a.submit([image(i)])[0] for i, a in enumerate(admitted[1:])]
        await asyncio.gather(*futures)
        assert batcher.depth == 0
        batcher.admit(3).release()  # room again
        await batcher.close(timeout=5)
        return refused_in

    assert run(main()) < 0.05


def test_abandoned_requests_are_dropped_not_computed():
    model = FakeModel(delay=0.1)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=16)
        batcher.start()
        first = asyncio.ensure_future(batcher.score(image(1)))
        await asyncio.sleep(0.02)  # the first is in the model now
        with batcher.admit(3) as admission:
            later = admission.submit([image(2), image(3), image(4)])
        for f in later[:2]:
            f.cancel()  # e.g. their deadline passed
        await first
        result = await later[2]
        await batcher.close(timeout=5)
        return result

    result = run(main())
    assert round(result.score) == 4
    assert len(model.batches) == 2


def test_close_finishes_accepted_work_then_refuses_new():
    model = FakeModel(delay=0.05)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=10.0, max_queue=16)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.score(image(i))) for i in range(3)]
        await asyncio.sleep(0.01)
        await batcher.close(timeout=5)  # does not wait the 10 s window
        with pytest.raises(BatcherClosedError):
            batcher.admit(1)
        return [await p for p in pending]

    results = run(main())
    assert [round(r.score) for r in results] == [0, 1, 2]


def test_model_errors_reach_the_waiting_requests():
    def broken(batch, profiles):
        raise RuntimeError("CUDA error: out of memory")

    async def main():
        batcher = DynamicBatcher(broken, max_batch_size=4, max_wait_s=0.0, max_queue=16)
        batcher.start()
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.score(image(1))
        # and the batcher keeps working afterwards
        batcher.score_batch = lambda batch, profiles: batch.mean(dim=(1, 2, 3))
        result = await batcher.score(image(5))
        await batcher.close(timeout=5)
        return result

    assert round(run(main()).score) == 5


def test_largest_group_goes_first_unless_an_image_starves():
    async def scenario(max_starvation_s):
        model = FakeModel(delay=0.1)
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0, max_queue=64,
                                 max_starvation_s=max_starvation_s)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.score(image(0)))  # occupies the model
        await asyncio.sleep(0.02)
        rare = batcher.admit(1).submit([image(1, w=16)])  # queued first, a shape of its own
        await asyncio.sleep(0.01)
        common = batcher.admit(3).submit([image(v) for v in (2, 3, 4)])
        await asyncio.gather(blocker, *rare, *common)
        await batcher.close(timeout=5)
        return model.batches[1:]

    # the three same-shape images run before the older single one ...
    assert run(scenario(max_starvation_s=10.0)) == [(3, 3, 8, 8), (1, 3, 8, 16)]
    # ... unless it has waited past the starvation bound
    assert run(scenario(max_starvation_s=0.0)) == [(1, 3, 8, 16), (3, 3, 8, 8)]


def test_admission_refuses_more_queued_work_than_the_budget():
    """After a timed pass, the queue takes no more than max_queued_work_s of measured work."""
    model = FakeModel(delay=0.2)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=1, max_wait_s=0.0, max_queue=100, max_queued_work_s=1.0)
        batcher.start()
        assert batcher.seconds_per_image is None
        await batcher.score(image(0.1))  # one timed pass: about 0.2 s per image
        assert 0.15 < batcher.seconds_per_image < 1.0
        held = [batcher.admit(1) for _ in range(4)]  # 4 x 0.2 s = 0.8 s: within the budget
        with pytest.raises(QueueFullError, match="s of work"):
            for _ in range(10):
                held.append(batcher.admit(1))
        admitted = len(held)
        for admission in held:
            admission.release()
        await batcher.close(timeout=5)
        return admitted

    admitted = run(main())
    assert 4 <= admitted <= 6  # the moving average moves a little with the sleep's jitter


def test_admission_refuses_while_the_oldest_queued_image_waits_past_the_budget():
    """However good the estimate looked, a queue that has not moved for the budget takes nothing more."""
    model = FakeModel(delay=0.0)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=5.0, max_queue=100, max_queued_work_s=0.3)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.score(image(0.5)))  # held by the 5 s batching window
        await asyncio.sleep(0.05)
        batcher.admit(1).release()  # 0.05 s waited: fine
        await asyncio.sleep(0.4)
        with pytest.raises(QueueFullError, match="oldest queued image has waited"):
            batcher.admit(1)
        await batcher.close(timeout=10)
        return (await waiting).score

    assert abs(run(main()) - 0.5) < 1e-6
