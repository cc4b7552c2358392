"""Distributed training helpers for ``torchrun`` + DDP (and the single-process fallback).

Launch with ``torchrun --nproc_per_node N script.py ...``; the script calls
:func:`init_distributed`, wraps its model in ``DistributedDataParallel`` when
``ctx.world_size > 1``, lets only ``ctx.is_main`` write checkpoints / logs / plots, and calls
:func:`cleanup_distributed` at the end. Run without torchrun, the same script gets a
single-process context and none of the collectives do anything.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from invseg.utils import check_int
from torch import nn

__all__ = [
    "DistributedContext",
    "init_distributed",
    "cleanup_distributed",
    "barrier",
    "all_reduce_mean",
    "unwrap_model",
    "seed_everything",
]

_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the (possibly single-process) job.

    Attributes:
        rank: Global rank, ``0 .. world_size - 1``.
        world_size: Number of processes (1 without torchrun).
        local_rank: Rank on this node (selects the GPU).
        device: The device this process computes on.
        is_main: ``rank == 0``: the process that writes checkpoints, logs and plots.
    """

    rank: int  # global rank
    world_size: int  # number of processes in the job
    local_rank: int  # rank on this node, also the CUDA device index
    device: torch.device  # device this process computes on
    is_main: bool  # True on rank 0

    @property
    def distributed(self) -> bool:
        """Whether a process group with more than one process is running."""
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is required under torchrun but is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} needs GPU {local_rank} but only {count} GPU(s) are visible; "
            f"use at most {count} processes per node"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Set up the process group from torchrun's environment, or a single-process context.

    Under torchrun (``RANK`` and ``WORLD_SIZE`` set) it reads ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` (default: ``RANK``) and requires ``MASTER_ADDR``/``MASTER_PORT``; it picks the
    ``nccl`` backend on CUDA (after ``torch.cuda.set_device(local_rank)``) and ``gloo`` on CPU.
    Without those variables it returns rank 0 of 1 and starts no process group. If a process
    group is already initialized it is reused.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU; default), ``"cpu"`` or ``"cuda"``.

    Returns:
        The :class:`DistributedContext` of this process.

    Raises:
        ValueError: On an unknown ``device``, ``"cuda"`` without CUDA, more local ranks than GPUs,
            or malformed / missing torchrun variables.
    """
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {', '.join(_DEVICES)}, got {device!r}")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not (dist.is_available() and dist.is_initialized()):
        dev = _pick_device(device, 0)
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)

    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = _pick_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistributedContext(rank, world_size, local_rank, dev, rank == 0)

    rank = _env_int("RANK")
    world_size = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world_size}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is required under torchrun but is not set")
    if not dist.is_available():
        raise ValueError("torch.distributed is not available in this PyTorch build")
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # device_id binds the NCCL communicator to this GPU (barrier() then needs no device guess)
        dist.init_process_group(backend="nccl", init_method="env://", device_id=dev)
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return DistributedContext(rank, world_size, local_rank, dev, rank == 0)


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialized (safe to call in any case)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for all ranks; no-op without a multi-process group."""
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, as a new tensor (the input is not modified).

    Integer and bool tensors are averaged in the default float dtype. With NCCL the tensor must
    live on this rank's GPU. Without a multi-process group this returns a detached copy.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"all_reduce_mean expects a torch.Tensor, got {type(tensor).__name__}")
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.to(torch.get_default_dtype())
    if _active():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Save and load ``unwrap_model(model).state_dict()`` so checkpoints have no ``module.`` prefix.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy's global generator and torch (CPU and all CUDA devices).

    Each rank gets ``seed + rank`` so data augmentation differs across ranks; model
    initialization that must match across ranks is synchronized by DDP (it broadcasts rank 0's
    parameters when wrapping). Call it explicitly from scripts: importing invseg seeds nothing.

    Returns:
        The seed used, ``seed + rank``.

    Raises:
        ValueError: If ``seed`` or ``rank`` is not a non-negative int or ``seed + rank >= 2**32``.
    """
    for name, value in (("seed", seed), ("rank", rank)):
        check_int(value, name, 0)
    effective = seed + rank
    if effective >= 2**32:  # numpy's legacy seeding limit
        raise ValueError(f"seed + rank must be below 2**32, got {effective}")
    random.seed(effective)
    np.random.seed(effective)
    torch.manual_seed(effective)  # also seeds every CUDA device
    return effective
