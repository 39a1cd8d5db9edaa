"""Device choice and ``torchrun`` process groups (nothing home-made: env:// rendezvous)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist

from vitpcm.errors import VitpcmError
from vitpcm.utils.shard import Shard


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise VitpcmError(f"train.device={spec} but CUDA is not available here: use train.device=cpu or auto")
        if spec == "cuda":
            return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise VitpcmError(f"train.device={spec} is not a device: use auto, cpu, cuda or cuda:N") from None


def init_distributed(device_spec: str, timeout: Optional[timedelta] = None) -> tuple[Dist, torch.device]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPUs,
    nccl on GPUs; ``timeout`` for collectives whose ranks may arrive far apart (default torch's).
    RANK / WORLD_SIZE are read and checked once, in :class:`vitpcm.utils.shard.Shard`."""
    shard = Shard.from_env()
    if not shard.enabled:
        return Dist(), resolve_device(device_spec)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))
    return Dist(rank=shard.rank, world=shard.world, local_rank=local_rank), device


# stages' ranks meet after their shards (screening, inference, the CRF), which may end far apart
STAGE_TIMEOUT = timedelta(hours=6)


@contextlib.contextmanager
def stage_group(device_spec: str) -> Iterator[tuple[Dist, torch.device]]:
    """For a stage that may run under torchrun (``infer``, ``segment infer``): ``(Dist,
    device)``, in the process group when WORLD_SIZE > 1 (joined with :data:`STAGE_TIMEOUT`);
    a group this call created is ended on leaving (an API caller's own group is kept)."""
    created = Shard.from_env().enabled and not dist.is_initialized()
    info, device = init_distributed(device_spec, timeout=STAGE_TIMEOUT)
    try:
        yield info, device
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: Dist) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any, info: Dist) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (``flag`` itself in one process)."""
    if not info.enabled:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t, info).item() > 0)


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
