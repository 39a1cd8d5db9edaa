"""What makes a resumed run continue exactly where it stopped: the epoch's sample order
from any position, per-item random draws, and the random generators' states.

* :class:`EpochSampler` yields the permutation that ``RandomSampler`` (one process) or
  ``DistributedSampler`` (torchrun) would yield for ``seed + epoch`` (the same order, so a
  run is unchanged by it), starting at any position: a run resumed mid-epoch sees the
  remaining samples of that epoch, no sample twice.
* :class:`SeededItems` (``train.deterministic``) reads item ``i`` of epoch ``e`` under
  generators seeded by ``(seed, e, i)``: its augmentation no longer depends on which
  process read it, in which order, or on what ran before (loader workers, a resume, a
  changed ``data.num_workers``).
* :func:`epoch_loader`: the epoch's ``DataLoader`` from any batch on, over both;
  :func:`batches_per_epoch` counts its batches.
* :func:`rng_state` / :func:`set_rng_state`: Python's, numpy's and torch's (CPU and CUDA)
  global generators, stored in checkpoints so dropout and any task draw continue the same.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitpcm.engine.signals import ignore_sigint


class EpochSampler(Sampler):
    """The indices of one epoch, from sample ``start`` on (of this process's share).

    ``world == 1``: ``torch.randperm(n)`` under a generator seeded ``seed + epoch``, as
    ``RandomSampler(generator=...)`` draws it. ``world > 1``: ``DistributedSampler``'s
    order (padded to a multiple of ``world``, every ``world``-th index from ``rank``).
    ``tagged``: yield ``(epoch, index)`` pairs for :class:`SeededItems`.
    """

    def __init__(
        self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0, tagged: bool = False
    ) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), int(epoch)
        self.rank, self.world, self.start, self.tagged = int(rank), int(world), int(start), bool(tagged)

    def indices(self) -> List[int]:
        """Every index of this process's share of the epoch (``start`` ignored)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        if self.world == 1:
            return order
        total = math.ceil(self.n / self.world) * self.world  # DistributedSampler, drop_last=False
        pad = total - len(order)
        if pad <= len(order):
            order += order[:pad]
        else:
            order += (order * math.ceil(pad / len(order)))[:pad]
        return order[self.rank : total : self.world]

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        for index in self.indices()[self.start :]:
            yield (self.epoch, index) if self.tagged else index

    def __len__(self) -> int:
        share = math.ceil(self.n / self.world) if self.world > 1 else self.n
        return max(share - self.start, 0)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` (numpy's SeedSequence mixes the three)."""
    words = np.random.SeedSequence([int(seed) % 2**63, int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class SeededItems(Dataset):
    """``data[i]`` read under Python, numpy and torch generators seeded by ``(seed, epoch, i)``;
    the caller's generators are left as they were. Keys are ``(epoch, index)`` pairs
    (:class:`EpochSampler` with ``tagged=True``)."""

    def __init__(self, data: Any, seed: int) -> None:
        self.data = data
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        seed = item_seed(self.seed, epoch, index)
        with preserved_rng():
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return self.data[index]


def drops_last(n: int, batch_size: int, world: int = 1) -> bool:
    """Whether an epoch of ``n`` items drops its last incomplete batch: only when each of the
    ``world`` processes has at least two full batches (a tiny set keeps every image)."""
    return math.ceil(n / world) >= 2 * batch_size


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """The batches each process reads in an epoch of ``n`` items (:func:`epoch_loader`)."""
    share = math.ceil(n / world)
    return share // batch_size if drops_last(n, batch_size, world) else math.ceil(share / batch_size)


def epoch_loader(
    data: Any,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    rank: int = 0,
    world: int = 1,
    skip: int = 0,
    deterministic: bool = False,
    num_workers: int = 0,
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Epoch ``epoch``'s loader of this process (:class:`EpochSampler`) from batch ``skip`` on.
    ``deterministic``: items read through :class:`SeededItems`, and the workers' seeds drawn
    from the epoch instead of the global generator."""
    sampler = EpochSampler(len(data), seed, epoch, rank, world, start=skip * batch_size, tagged=deterministic)
    generator = None
    if deterministic:
        data = SeededItems(data, seed)
        generator = torch.Generator()
        generator.manual_seed(seed * 1009 + epoch)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      drop_last=drops_last(len(data), batch_size, world), pin_memory=pin_memory,
                      persistent_workers=False, worker_init_fn=_seed_worker, generator=generator)  # fmt: skip


def _seed_worker(worker_id: int) -> None:
    """A loader worker: Python's and numpy's generators from torch's seed of the worker."""
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)
    ignore_sigint()


@contextlib.contextmanager
def preserved_rng(cuda: bool = False):
    """Run a block without moving the global generators (Python, numpy, torch CPU, and the
    CUDA ones with ``cuda``): their states are put back afterwards."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    gpu = torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state_all(gpu)


def rng_state() -> Dict[str, Any]:
    """The global generators' states: ``python``, ``numpy``, ``torch`` and ``cuda`` (a list, or
    None when CUDA is not in use)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned (the CUDA part when it fits this machine)."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8) for s in cuda])


def _as_python_state(state: Sequence[Any]) -> tuple:
    """``random.setstate`` wants tuples; a round trip through some formats gives lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
