"""Distributed set-up: the only module that initialises torch.distributed.

Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK (absent: one plain process). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rn50.system.device import choose_device
from rn50.system.store import attempt_store


_control_group = None  # a gloo group beside NCCL, set by init_distributed


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_request: str = "auto") -> DistEnv:
    """device_request: auto | cuda | cpu (rn50.system.device.choose_device)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = choose_device(device_request, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # under torchrun, a store of this attempt's own: a restarted group must not read the dead one's addresses
    store = attempt_store(rank, world_size) if not dist.is_initialized() else None
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                **({"store": store, "rank": rank, "world_size": world_size} if store else {}))
        global _control_group  # small host-side agreements (stop signals) without touching the GPU queue
        _control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistEnv(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in a single process); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BN running statistics). DDP broadcasts them before each training
    forward, but each rank then updates its own copy; syncing before validation makes every rank
    evaluate, and rank 0 checkpoint, the same model."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any. Runs over a gloo group on the CPU, so it never
    waits for the GPU queue to drain (a CUDA tensor's .item() would)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(value.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
