"""Dynamic batching: concurrent requests share one forward pass.

Requests live on the event loop; the model runs in ONE dedicated worker thread, so the loop
never blocks and the model never runs two batches at once. Queued images are grouped by
tensor shape (the resize policy gives a small set of shapes), so a batch is a plain
stack (model.preprocess.stack_inputs: numpy arrays or torch tensors) with no padding and an image's score does not depend on its batch mates.

Scheduling: a batch runs at once when a group reaches `max_batch_size`, otherwise as soon as
the oldest image has waited `max_wait_s`. The largest group goes first (bigger batches, more
images/s under load), except that an image waiting longer than `max_starvation_s` has its group
go first, oldest first, so a rare shape is never starved into its deadline. While a batch runs,
new images pile up and the next batch forms from them without extra waiting.

Score profiles: every image names the profile it wants (model.network.PROFILES). Profiles do
not split batches: `score_batch` gets each image's profile and gives each its own profile's
score from one pass (Scorer.score_batch: the trunk once, only the head's combination differs).

Admission is bounded: `admit(n)` reserves n places (decoding + waiting) or raises
`QueueFullError` at once, so overload answers 503 instead of a growing queue. Two bounds: a
count (`max_queue` images) and, once a forward pass has been timed, the work already queued
(`max_queued_work_s`: queued images x the seconds per image the queue has been draining at, a
moving average), which also refuses while the oldest queued image has waited longer than
that. The second keeps a slow model (a big checkpoint on a small CPU) from accepting more than it can
answer before the request deadline: past it, the answer is 503 at once, not 504 much later.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

from model.errors import ResMemNetError
from model.preprocess import stack_inputs

log = logging.getLogger("resmemnet.batcher")


class QueueFullError(ResMemNetError):
    """No room in the queue for the images of this request."""


class BatcherClosedError(ResMemNetError):
    """The batcher is shutting down and takes no new work."""


@dataclass(frozen=True)
class BatchResult:
    score: float
    queue_wait_s: float
    model_s: float
    batch_size: int


DEFAULT_PROFILE = "default"


@dataclass
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future
    enqueued: float
    profile: str = DEFAULT_PROFILE


class Admission:
    """Places reserved in the queue for one request; unused places are freed on exit."""

    def __init__(self, batcher: "DynamicBatcher", count: int):
        self._batcher = batcher
        self._held = count

    def submit(self, tensors: Sequence[torch.Tensor], profile: str = DEFAULT_PROFILE) -> list[asyncio.Future]:
        """Queue the images, all to be scored with `profile`; one future per image."""
        if len(tensors) > self._held:
            raise ValueError(f"{len(tensors)} images submitted on an admission for {self._held}")
        futures = self._batcher._enqueue(tensors, profile)
        self._held -= len(tensors)
        self.release()
        return futures

    def release(self) -> None:
        if self._held:
            self._batcher._reserved -= self._held
            self._held = 0
            self._batcher._update_depth()

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DynamicBatcher:
    """Gathers (3, H, W) tensors from concurrent requests into batched calls of `score_batch`.

    `score_batch(stacked: Tensor[B, 3, H, W], profiles: list of B names) -> sequence of B floats`, each
    image's score in its own (already checked) profile, runs in the worker thread: the service
    passes model.scoring.Scorer.score_batch. A batch may mix profiles; it is one pass.
    """

    def __init__(self, score_batch: Callable[[torch.Tensor, Sequence[str]], Sequence[float]], *,
                 max_batch_size: int = 32, max_wait_s: float = 0.005, max_queue: int = 128, max_starvation_s: float = 5.0, metrics=None,
                 max_queued_work_s: float | None = None, thread_name: str = "resmemnet-model"):
        self.score_batch = score_batch
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.max_queue = max(1, int(max_queue))
        self.max_starvation_s = max(self.max_wait_s, float(max_starvation_s))
        self.metrics = metrics
        self.max_queued_work_s = max_queued_work_s
        self.seconds_per_image: float | None = None  # moving average of the drain rate
        self._last_done: float | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._groups: dict[tuple, deque[_Item]] = {}
        self._waiting = 0  # images enqueued, not yet in a forward pass
        self._reserved = 0  # places admitted, images still decoding
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler on the running event loop."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name="resmemnet-batcher")

    async def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish everything already queued, then stop the worker thread."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                log.warning("batcher: queued work did not finish within %.1fs; cancelling it", timeout)
                self._task.cancel()
                self._fail_all(BatcherClosedError("the server shut down before this image was scored"))
        self.executor.shutdown(wait=False)

    def attach_metrics(self, metrics) -> None:
        """Start reporting to `metrics` (passes before this, e.g. warm-up, are not counted)."""
        self.metrics = metrics
        self._update_depth()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def depth(self) -> int:
        """Images admitted and not yet in a forward pass."""
        return self._waiting + self._reserved

    # -- submitting --------------------------------------------------------------------------
    def admit(self, count: int = 1) -> Admission:
        """Reserve `count` places or raise QueueFullError / BatcherClosedError immediately."""
        if self._closing:
            raise BatcherClosedError("the server is shutting down")
        if self.depth + count > self.max_queue:
            raise QueueFullError(f"{self.depth} images queued (limit {self.max_queue})")
        if self.max_queued_work_s is not None and self.depth:
            # the estimate, and the measured wait of the oldest queued image (which catches a
            # model that slowed down since the estimate, e.g. other processes took the CPU)
            if self.seconds_per_image is not None:
                work = (self.depth + count) * self.seconds_per_image
                if work > self.max_queued_work_s:
                    raise QueueFullError(f"{self.depth} images queued, about {work:.1f} s of work at {self.seconds_per_image:.2f} "
                                         f"s per image (limit {self.max_queued_work_s:.1f} s)")
            waited = self._oldest_wait()
            if waited > self.max_queued_work_s:
                raise QueueFullError(f"the oldest queued image has waited {waited:.1f} s "
                                     f"(limit {self.max_queued_work_s:.1f} s)")
        self._reserved += count
        self._update_depth()
        return Admission(self, count)

    async def score(self, tensor: torch.Tensor, profile: str = DEFAULT_PROFILE) -> BatchResult:
        """Convenience: admit, submit and await one image."""
        with self.admit(1) as admission:
            future = admission.submit([tensor], profile)[0]
        return await future

    def _enqueue(self, tensors: Sequence[torch.Tensor], profile: str = DEFAULT_PROFILE) -> list[asyncio.Future]:
        if self._task is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for tensor in tensors:
            item = _Item(tensor, loop.create_future(), now, profile)
            self._groups.setdefault(tuple(tensor.shape), deque()).append(item)
            futures.append(item.future)
        self._waiting += len(tensors)
        self._reserved -= len(tensors)
        self._update_depth()
        self._wakeup.set()
        return futures

    # -- scheduling --------------------------------------------------------------------------
    async def _schedule(self) -> None:
        try:
            while True:
                self._drop_abandoned()
                if self._waiting == 0:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = self._take_ready_batch()
                if batch is None:
                    await self._sleep_until_due()
                    continue
                await self._run(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave requests hanging
            log.exception("batcher scheduler crashed")
            self._fail_all(exc)
            raise

    def _oldest_wait(self) -> float:
        """Seconds the oldest image still wanted has been queued (0 when none is)."""
        oldest = min((item.enqueued for items in self._groups.values() for item in items if not item.future.done()),
                     default=None)
        return 0.0 if oldest is None else time.perf_counter() - oldest

    def _oldest_group(self) -> tuple[tuple, float]:
        shape, items = min(self._groups.items(), key=lambda kv: kv[1][0].enqueued)
        return shape, items[0].enqueued

    def _take_ready_batch(self) -> list[_Item] | None:
        """The batch to run now, or None when it is worth waiting for more images."""
        now = time.perf_counter()
        oldest_shape, oldest = self._oldest_group()
        if now - oldest >= self.max_starvation_s:
            shape = oldest_shape
        else:
            full = any(len(items) >= self.max_batch_size for items in self._groups.values())
            if not (full or self._closing or now >= oldest + self.max_wait_s):
                return None
            # largest group first; among equals, the one waiting longest
            shape = max(self._groups, key=lambda s: (min(len(self._groups[s]), self.max_batch_size),
                                                     -self._groups[s][0].enqueued))
        items = self._groups[shape]
        batch = [items.popleft() for _ in range(min(self.max_batch_size, len(items)))]
        if not items:
            del self._groups[shape]
        self._waiting -= len(batch)
        self._update_depth()
        return batch

    async def _sleep_until_due(self) -> None:
        _, oldest = self._oldest_group()
        delay = oldest + self.max_wait_s - time.perf_counter()
        if delay <= 0:
            return
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), delay)
        except asyncio.TimeoutError:
            pass

    def _drop_abandoned(self) -> None:
        """Forget images whose request gave up (deadline passed, client gone)."""
        for shape in list(self._groups):
            items = self._groups[shape]
            kept = deque(item for item in items if not item.future.done())
            if len(kept) != len(items):
                self._waiting -= len(items) - len(kept)
                if kept:
                    self._groups[shape] = kept
                else:
                    del self._groups[shape]
                self._update_depth()

    async def _run(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        m = self.metrics
        if m is not None:
            m.batch_size.observe(len(batch))
            m.images_in_model.set(len(batch))
            for item in batch:
                m.queue_wait.observe(started - item.enqueued)
        try:
            scores = await loop.run_in_executor(self.executor, self._forward, [item.tensor for item in batch],
                                                [item.profile for item in batch])
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError("the server shut down while scoring this image"))
            raise
        except Exception as exc:
            log.exception("forward pass on a batch of %d failed", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            if m is not None:
                m.images_in_model.set(0)
        done = time.perf_counter()
        model_s = done - started
        # Seconds per image as the queue drains: since the previous pass ended (or since this
        # batch's oldest image arrived, if the model was idle). Unlike the pass time alone, this
        # counts the gaps between passes, small batches of rare shapes and CPU taken by heatmaps.
        busy_since = max(self._last_done or 0.0, min(item.enqueued for item in batch))
        per_image = (done - busy_since) / len(batch)
        self._last_done = done
        self.seconds_per_image = per_image if self.seconds_per_image is None else \
            0.7 * self.seconds_per_image + 0.3 * per_image
        if m is not None:
            m.model_time.observe(model_s)
            m.images_scored.inc(len(batch))
        for item, score in zip(batch, scores):
            if not item.future.done():
                item.future.set_result(BatchResult(float(score), started - item.enqueued, model_s, len(batch)))

    def _forward(self, tensors: list[torch.Tensor], profiles: list[str]) -> list[float]:
        """Each image's score in its own profile, from one pass over the stacked batch."""
        scores = self.score_batch(stack_inputs(tensors), profiles)
        scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
        if len(scores) != len(tensors):
            raise RuntimeError(f"the model returned {len(scores)} scores for {len(tensors)} images")
        return scores

    def _fail_all(self, exc: BaseException) -> None:
        for items in self._groups.values():
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
        self._groups.clear()
        self._waiting = 0
        self._update_depth()

    def _update_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)
