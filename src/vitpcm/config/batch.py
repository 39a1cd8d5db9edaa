"""Training arithmetic: images per optimizer step as a per-process batch and accumulation steps."""

from __future__ import annotations

from typing import Tuple

from vitpcm.errors import VitpcmError


def batch_plan(global_batch: int, world: int, max_batch: int) -> Tuple[int, int]:
    """``(per-process batch, accumulation steps)`` for ``global_batch`` images per optimizer step.

    Each of ``world`` processes takes ``global_batch / world`` images per step, split into the
    fewest equal batches of at most ``max_batch``: global = batch x world x accumulate, e.g.
    64 on 1 process with a cap of 16 -> (16, 4); on 4 processes -> (16, 1); on 2 with a cap of
    12 -> (8, 4). ``global_batch`` 0 means no plan: ``(max_batch, 1)``.
    Raises :class:`VitpcmError` when ``global_batch`` is not a multiple of ``world``.
    """
    if global_batch <= 0:
        return int(max_batch), 1
    if global_batch % world:
        raise VitpcmError(
            f"train.global_batch={global_batch} is not a multiple of the {world} processes: use"
            f" {global_batch // world * world or world} or {(global_batch // world + 1) * world}"
        )
    share = global_batch // world
    accumulate = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max(1, int(max_batch)))
    return share // accumulate, accumulate
