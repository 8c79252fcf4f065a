"""torchrun-style distributed training: process-group set-up, rank helpers, samplers, DDP wrapping.

Every function also works in a plain single process (no ``RANK``/``WORLD_SIZE`` in the environment), so
``python scripts/cam/train_vanilla.py`` and ``torchrun --nproc_per_node=4 scripts/cam/train_vanilla.py``
run the same code. ``--batch_size`` is always the *global* batch; each rank loads ``batch_size // world_size``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from core.errors import WSSSError

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 in a single process.
        world_size: number of processes, 1 in a single process.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise WSSSError(
            f"environment variable {name}={value!r} is not an integer: unset it or launch with torchrun"
        ) from e


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """Turn ``--device auto|cpu|cuda`` into a ``torch.device`` (``auto``: ``cuda:<local_rank>`` when available)."""
    if device not in DEVICES:
        raise WSSSError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WSSSError("--device cuda was given but no CUDA device is visible: use --device cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment, or run as a single process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Uses NCCL on CUDA and gloo on CPU. Calling it again
    in a process that already joined a group returns the same description without re-initialising.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("joined process group: rank %d of %d (%s) on %s", rank, world_size, backend, torch_device)
    return DistInfo(rank, world_size, local_rank, torch_device)


def is_distributed() -> bool:
    """Whether a process group with more than one member is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank, 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes, 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes shared files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if any) so the next run in this process starts clean."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo only CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank gets the same dict; keys must match on all ranks).

    Args:
        values: name -> float (or 0-d tensor) on this rank.

    Returns:
        name -> mean over ranks, as Python floats. Unchanged (as floats) in a single process.
    """
    names = sorted(values)
    if not is_distributed() or not names:
        return {k: float(values[k]) for k in names}
    packed = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed /= get_world_size()
    return dict(zip(names, packed.tolist(), strict=True))


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (e.g. confusion matrices); returns it. A no-op in a single process."""
    if is_distributed():
        moved = tensor.to(_reduce_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)
    return tensor


def all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank, so all ranks take the same branch (e.g. stop on NaN)."""
    if not is_distributed():
        return flag
    packed = torch.tensor([0 if flag else 1], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return int(packed.item()) == 0


def shard(ids: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of ``ids`` this rank handles: ``ids[rank::world_size]`` (round-robin, disjoint, complete)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(ids[rank::world_size])


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Per-process batch for a *global* ``--batch_size``; raises WSSSError when it does not split evenly."""
    if batch_size < 1:
        raise WSSSError(f"--batch_size must be positive, got {batch_size}")
    if batch_size % world_size != 0:
        raise WSSSError(
            f"--batch_size {batch_size} is the global batch and must be divisible by the {world_size} processes: "
            f"use a multiple of {world_size}"
        )
    return batch_size // world_size


def build_sampler(
    dataset: Dataset, info: DistInfo, shuffle: bool, seed: int, drop_last: bool = False
) -> DistributedSampler:
    """A sampler whose order depends only on ``(seed, epoch)``: call ``set_epoch(epoch)`` before each epoch.

    Used in single-process runs too (``num_replicas=1``), so a resumed run replays the very same order.
    """
    return DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def has_trainable_params(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


def wrap_model(
    model: nn.Module, info: DistInfo, sync_bn: bool = False, find_unused_parameters: bool = False
) -> nn.Module:
    """Wrap a model (already on ``info.device``) in DDP when distributed and it has trainable parameters.

    Args:
        model: the network; returned unchanged in a single process or when fully frozen.
        info: from :func:`init_distributed`.
        sync_bn: convert BatchNorm layers to SyncBatchNorm first (only meaningful with trainable BN,
            i.e. ``--mode normal``; frozen-BN models are unaffected).
        find_unused_parameters: needed only when some trainable parameters get no gradient in a step.
    """
    if not info.distributed or not has_trainable_params(model):
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (the one whose state dict is saved)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
