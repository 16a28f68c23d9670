"""Data-parallel training under torchrun: one process per GPU (NCCL) or per CPU slot (gloo).

`resmemnet train` started by `torchrun --nproc_per_node=N` reads RANK/WORLD_SIZE/LOCAL_RANK from
the environment; without them (a plain `resmemnet train`) everything here is a no-op and the run
is exactly the single-process one.

How the work is split, so that N processes compute what one process computes with the same
global batch (tests/test_ddp.py checks losses and weights):

- Batches: every rank builds the same global batches (same seeded permutation and shape groups)
  and takes its interleaved share `batch[rank::N]` (`local_part`). The schedule's step counter
  is the global batch index, so the per-epoch one-cycle rate is the same on every rank.
  torch's DistributedSampler shards the permutation instead, which gives other batches than
  one process would draw, and pads or drops images to even out the shards.
- Gradients: DistributedDataParallel averages them; each rank's loss is its share of the
  global batch's weighted mean (`sum / global count * N`), so uneven shares stay exact.
- BatchNorm: training-mode BatchNorm layers normalise with global-batch statistics
  (`sync_batchnorm`: two all-reduces of per-channel sums per layer, differentiable; the same
  code on GPUs and CPUs, where torch's SyncBatchNorm has no kernel). It equals torch's
  BatchNorm in float64 to 1e-12; in float32 its two-pass sums were the more accurate of the two
  (tests/test_ddp.py). Frozen (eval-mode) BatchNorm layers use their running statistics and
  need no communication.
- Rank 0 alone writes the run folder, logs, checkpoints and the training state; every rank can
  resume from it (same files, same seeds).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

# the feature cache is built between two barriers: give a long extraction room
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank and the torch backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def env_dist(environ=None) -> Dist:
    """Rank and world size as torchrun exports them; SINGLE when not under torchrun."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    return Dist(rank=int(environ["RANK"]), world=world, local_rank=int(environ.get("LOCAL_RANK", "0")))


def init_distributed(device_name: str) -> tuple[Dist, str]:
    """Join the torchrun job (NCCL when training on CUDA, else gloo).
    Returns (dist, device name for resolve_device: cuda:<local rank> on GPUs)."""
    dist = env_dist()
    if not dist.enabled:
        return dist, device_name
    import torch
    import torch.distributed as td

    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(dist.local_rank)
        device_name = f"cuda:{dist.local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    if not td.is_initialized():
        kwargs = {"device_id": torch.device(device_name)} if use_cuda else {}
        td.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    return Dist(dist.rank, dist.world, dist.local_rank, backend), device_name


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if dist.backend == "nccl":
            td.barrier(device_ids=[dist.local_rank])
        else:
            td.barrier()


def local_part(batch: np.ndarray, dist: Dist) -> np.ndarray:
    """This rank's share of a global batch: every world-th image from position rank."""
    return batch[dist.rank::dist.world] if dist.enabled else batch


def all_reduce_sum(values, dist: Dist, device=None) -> np.ndarray:
    """Element-wise sum over ranks of a float vector (float64 on the wire)."""
    values = np.asarray(values, dtype=np.float64)
    if not dist.enabled:
        return values
    import torch
    import torch.distributed as td

    t = torch.from_numpy(values.copy())
    if dist.backend == "nccl":
        t = t.to(device)
    td.all_reduce(t)
    return t.cpu().numpy()


def broadcast_tensors(tensors, dist: Dist) -> None:
    """Copy rank 0's values of `tensors` into every rank's (in place)."""
    if not dist.enabled:
        return
    import torch.distributed as td

    for t in tensors:
        td.broadcast(t.data, src=0)


def broadcast_object(obj, dist: Dist):
    if not dist.enabled:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


# -- BatchNorm with global-batch statistics ---------------------------------------------------

_ALL_REDUCE = None


def _all_reduce_autograd():
    """A differentiable all-reduce (sum): the gradient of a sum over ranks is the sum over ranks
    of the gradients. (torch.distributed.nn's own is deprecated in favour of a private module.)"""
    global _ALL_REDUCE
    if _ALL_REDUCE is None:
        import torch
        import torch.distributed as td

        class AllReduceSum(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                t = t.clone()
                td.all_reduce(t)
                return t

            @staticmethod
            def backward(ctx, grad):
                grad = grad.clone()
                td.all_reduce(grad)
                return grad

        _ALL_REDUCE = AllReduceSum.apply
    return _ALL_REDUCE


def _global_batch_norm(bn, x):
    """Training-mode batch norm of x (N, C, *) over the whole global batch: per-channel sums are
    all-reduced (differentiably), so gradients flow through the global statistics as well."""
    import torch

    all_reduce = _all_reduce_autograd()

    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x if x.dtype == torch.float64 else x.float()
    count = torch.tensor([float(x.numel() // x.shape[1])], dtype=torch.float32, device=x.device)
    s = all_reduce(torch.cat([xf.sum(dims), count]))
    n = s[-1]
    mean = s[:-1] / n
    centred = xf - mean.view(shape)
    var = all_reduce((centred * centred).sum(dims)) / n  # two passes: as accurate as BatchNorm's own
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            unbiased = var * (n / (n - 1)) if float(n) > 1 else var
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
    return y.to(x.dtype)


def _sync_forward(self, x):
    import torch.distributed as td

    if not (self.training and td.is_available() and td.is_initialized()):
        return self._plain_class.forward(self, x)
    return _global_batch_norm(self, x)


_SYNC_CLASSES: dict[type, type] = {}


def sync_batchnorm(module) -> list:
    """Make every BatchNorm layer of `module` normalise with global-batch statistics while
    training (in place: parameters, buffers and state-dict keys stay). Returns what
    `restore_batchnorm` needs to undo it."""
    from torch.nn.modules.batchnorm import _BatchNorm

    changed = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and type(m) not in _SYNC_CLASSES.values():
            plain = type(m)
            if plain not in _SYNC_CLASSES:
                _SYNC_CLASSES[plain] = type(f"Global{plain.__name__}", (plain,),
                                            {"forward": _sync_forward, "_plain_class": plain})
            m.__class__ = _SYNC_CLASSES[plain]
            changed.append((m, plain))
    return changed


def restore_batchnorm(changed: list) -> None:
    for m, plain in changed:
        m.__class__ = plain


def wrap_ddp(module, dist: Dist, device):
    """DistributedDataParallel over `module`'s trainable parameters (rebuild it when they change)."""
    from torch.nn.parallel import DistributedDataParallel

    if not any(p.requires_grad for p in module.parameters()):
        return module
    import inspect

    ids = [device.index if device.index is not None else dist.local_rank] if device.type == "cuda" else None
    # buffers: BatchNorm statistics are already equal on every rank (global-batch statistics);
    # newer torch renamed the switch
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=ids, **{no_sync: False})
