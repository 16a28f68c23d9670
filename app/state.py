"""The service's shared state: one loaded model (a model.scoring.Scorer), its batcher and worker
pools, and where start-up has got to. The app keeps one in `app.state.service`; every endpoint
reaches the model through it (app/routes.py, `_state`).

No model is loaded at import time. `start()` loads the checkpoint in a background thread, warms
it up, and only then is the phase "ready"; `stop()` refuses new work and finishes what was
accepted before the model thread stops.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

from .batcher import DynamicBatcher
from .errors import ServiceError
from .metrics import ServiceMetrics
from .settings import ServiceSettings

if TYPE_CHECKING:  # the model (and torch) is loaded in the background, never at import
    from model.scoring import Scorer

log = logging.getLogger("resmemnet.service")


class ServiceState:
    """The model, its batcher and worker pools, and where start-up has got to."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.phase = "starting"
        self.load_error: str | None = None
        self.scorer: Scorer | None = None  # set once loaded; every model call goes through it
        self.batcher: DynamicBatcher | None = None
        self.preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="resmemnet-decode")
        self.heatmap_pool = ThreadPoolExecutor(settings.heatmap_concurrency, thread_name_prefix="resmemnet-heatmap")
        self.heatmaps_running = 0
        self._loader: asyncio.Task | None = None
        self._ready_event: asyncio.Event | None = None
        self.on_failed: Callable[[], None] | None = None  # called once if the model fails to load

    # -- start-up ----------------------------------------------------------------------------
    async def start(self, scorer: Scorer | None = None) -> None:
        self._ready_event = asyncio.Event()
        self._loader = asyncio.get_running_loop().create_task(self._load(scorer), name="resmemnet-load")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """For tests and embedding: wait until ready (True) or failed (False)."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return self.phase == "ready"

    async def _load(self, scorer: Scorer | None) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            if scorer is None:
                self.phase = "loading"
                # A thread of its own: the load takes seconds and must not hold up /healthz.
                with ThreadPoolExecutor(1, thread_name_prefix="resmemnet-load") as pool:
                    scorer = await loop.run_in_executor(pool, self._load_scorer)
            self.scorer = scorer
            self.batcher = DynamicBatcher(
                scorer.score_batch,  # a batch mixing profiles is still one pass of the trunk
                max_batch_size=self.settings.max_batch_size, max_wait_s=self.settings.max_wait_ms / 1000.0,
                max_queue=self.settings.queue_size, metrics=None,
                # past a quarter of the deadline, fairness beats batch size
                max_starvation_s=self.settings.request_timeout_s / 4,
                # accept no more queued work than a third of the deadline: the rest is decode, the
                # pass itself and the estimate's error on a busy machine (bench/soak.py, 2x overload)
                max_queued_work_s=self.settings.request_timeout_s / 3,
            )
            self.batcher.start()
            if self.settings.warmup:
                self.phase = "warming_up"
                await self._warm_up()
            # Only now do the batcher's passes count: warm-up images are no scored images.
            self.batcher.attach_metrics(self.metrics)
            self._publish_info()
            self.phase = "ready"
            self.metrics.ready.set(1)
            log.info("model %s ready on %s in %.1fs", self.model_info["name"], self.model_info["device"],
                     time.perf_counter() - started)
        except Exception as exc:  # reported by /healthz and /readyz, and logged
            self.phase = "failed"
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the model: %s", self.load_error)
            if self.on_failed is not None:
                self.on_failed()
        finally:
            self._ready_event.set()

    def _load_scorer(self) -> Scorer:
        from model.scoring import Scorer

        from model.engines import check_backend
        from model.environment import torch_available

        # torch's threads (not imported for the onnxruntime backend, which is told its own)
        if check_backend(self.settings.backend) != "onnxruntime" and torch_available():
            configure_torch_threads(self.settings.torch_threads)
        return Scorer.from_checkpoint(self.settings.weights, device=self.settings.device,
                                      mixed_precision=self.settings.mixed_precision, precision=self.settings.precision,
                                      max_batch=self.settings.max_batch_size, backend=self.settings.backend,
                                      threads=self.settings.torch_threads or None, onnx=self.settings.onnx or None)

    async def _warm_up(self) -> None:
        """Run the common input shapes once (single and batched) so first requests pay no set-up cost."""
        sizes = sorted({1, min(4, self.settings.max_batch_size)})
        for shape in self.scorer.typical_input_shapes():
            for n in sizes:
                tensors = [self.scorer.filled_input(shape, 0.5) for _ in range(n)]
                with self.batcher.admit(n) as admission:
                    futures = admission.submit(tensors)
                results = await asyncio.gather(*futures)
                if not all(0.0 <= r.score <= 1.0 for r in results):
                    raise RuntimeError(f"warm-up produced scores outside [0, 1]: {[r.score for r in results]}")

    def _publish_info(self) -> None:
        scorer = self.scorer
        self.metrics.model_info.info({
            **self.model_info,
            "backbone": scorer.config.backbone,
            "mixed_precision": str(scorer.mixed_precision).lower(),
            "precision": scorer.precision,
            "input_size": str(scorer.input_size),
        })
        self.metrics.config_info.info({
            "max_batch_size": str(self.settings.max_batch_size), "max_wait_ms": str(self.settings.max_wait_ms),
            "queue_size": str(self.settings.queue_size),
        })

    @property
    def model_info(self) -> dict:
        """name, version and device of the served model (placeholders until it is loaded)."""
        meta = self.scorer.meta if self.scorer is not None else None
        return {
            "name": (meta.name if meta else None) or "resmemnet",
            "version": (meta.version if meta else None) or "unknown",
            "device": str(self.scorer.device) if self.scorer is not None else "cpu",
        }

    @property
    def profile_info(self) -> list[dict]:
        """The served model's score profiles, `default` first: name, description, alias_of,
        has_percentile and measured (metadata metrics.profiles[name], or None); [] until loaded."""
        if self.scorer is None:
            return []
        from model.profiles import profile_specs

        meta = self.scorer.meta
        measured = meta.profile_metrics() if meta is not None else {}
        rows = []
        for spec in profile_specs(self.scorer.config):
            rows.append({"name": spec.name, "description": spec.description,
                         "alias_of": spec.inputs[0] if spec.kind == "alias" else None,
                         "has_percentile": meta is not None and bool(meta.reference_quantiles(spec.name)),
                         "measured": measured.get(spec.name)})
        return rows

    # -- request gate ------------------------------------------------------------------------
    def require_ready(self) -> None:
        retry = self.settings.retry_after_s
        if self.phase == "stopping" or (self.batcher is not None and self.batcher.closing):
            raise ServiceError("shutting_down", "the server is shutting down; retry on another instance",
                               retry_after=retry)
        if self.phase == "failed":
            raise ServiceError("not_ready", f"the model failed to load ({self.load_error})", retry_after=retry)
        if self.phase != "ready":
            raise ServiceError("not_ready", f"the model is not ready yet ({self.phase})", retry_after=retry)

    # -- shutdown ----------------------------------------------------------------------------
    async def stop(self) -> None:
        self.phase = "stopping"
        self.metrics.ready.set(0)
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            try:
                await self._loader
            except (asyncio.CancelledError, Exception):
                pass
        if self.batcher is not None:
            # uvicorn has already waited out the grace period (and cut what was left), so the
            # queue holds at most a forward pass in progress; bound the wait by the same grace.
            await self.batcher.close(timeout=min(self.settings.request_timeout_s, self.settings.graceful_shutdown_s))
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
        self.heatmap_pool.shutdown(wait=False, cancel_futures=True)


def configure_torch_threads(requested: int) -> int:
    """Intra-op threads for the model; 0 keeps torch's default (one per physical core).

    Measured on a shared 2-core box: for ResNet-152 at 224 px, 2 threads beat 1 (about 1.4x);
    for a tiny 64-px model, 1 thread was 15x faster, because request handling preempts one thread
    of the OpenMP team and the other then stalls at every (short) op's barrier."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    log.info("torch uses %d intra-op threads", torch.get_num_threads())
    return torch.get_num_threads()
