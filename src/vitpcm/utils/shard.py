"""Which images this process handles when a stage runs under ``torchrun`` (or any launcher
that sets ``RANK`` / ``WORLD_SIZE``), and how rank 0 learns that the others are done.

Each rank takes ``names[rank::world]`` of the same ordered list: disjoint, together
complete, the same on every rerun. The files each image gets do not depend on the rank, so
a sharded run writes exactly the files of a one-process run.

Stages with torch (``infer``) synchronise through ``torch.distributed``. ``vitpcm crf``
imports no torch, so its ranks meet through files: each rank writes
``OUT/.done-RANK.json`` (its counts, or its error) when its shard is finished, and rank 0
waits for every other rank's marker before it writes the summary. A marker carries the
launch's id (torchrun's ``TORCHELASTIC_RUN_ID`` and restart count), so a marker left by an
earlier launch is never taken for one of this launch. Standard library only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TypeVar

from vitpcm.atomic import write_json_atomic
from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise VitpcmError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes working on one stage."""

    rank: int = 0
    world: int = 1
    local_world: int = 1  # processes of the launch on this machine (they share its CPUs and memory)
    run_id: str = ""  # the launch's id; "" when the launcher gave none

    @classmethod
    def from_env(cls) -> "Shard":
        """``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` (torchrun sets them; absent: one process)."""
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise VitpcmError(f"RANK={rank} and WORLD_SIZE={world} do not fit: want 0 <= RANK < WORLD_SIZE")
        local = _env_int("LOCAL_WORLD_SIZE", world)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if run_id:
            run_id += f"/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        elif os.environ.get("MASTER_PORT"):
            run_id = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ['MASTER_PORT']}"
        return cls(rank, world, max(1, min(local, world)), run_id)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def take(self, items: Sequence[T]) -> List[T]:
        """This rank's items: ``items[rank::world]``."""
        return list(items[self.rank :: self.world])

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}" if self.enabled else "one process"


def done_marker(folder: str | Path, rank: int) -> Path:
    """``FOLDER/.done-RANK.json`` (hidden: folder listings of masks skip it)."""
    return Path(folder) / f".done-{rank}.json"


def clear_done(folder: str | Path, shard: Shard) -> None:
    """Remove this rank's marker of an earlier launch (at the start of a sharded stage)."""
    done_marker(folder, shard.rank).unlink(missing_ok=True)


def write_done(folder: str | Path, shard: Shard, info: Optional[Dict[str, Any]] = None, error: str = "") -> None:
    """Tell rank 0 that this rank's shard is finished (``info``: its counts) or failed (``error``)."""
    record = {"rank": shard.rank, "world": shard.world, "run_id": shard.run_id, "error": error, "info": info or {}}
    write_json_atomic(done_marker(folder, shard.rank), record)


def wait_for_ranks(
    folder: str | Path, shard: Shard, timeout: Optional[float] = None, poll: float = 0.2
) -> List[Dict[str, Any]]:
    """On rank 0: wait until every other rank's marker of this launch is in ``folder``;
    return their ``info`` dicts (rank order) and remove the markers. A rank that reported an
    error raises it here (one line, naming the rank); ``timeout`` seconds (None = no limit)
    without all markers raise too."""
    others = list(range(1, shard.world))
    found: Dict[int, Dict[str, Any]] = {}
    start = time.monotonic()
    last_note = start
    while True:
        for r in others:
            if r in found:
                continue
            record = _read_marker(done_marker(folder, r))
            if record is None or (shard.run_id and record.get("run_id") != shard.run_id):
                continue  # not there yet, or left by an earlier launch
            if record.get("error"):
                raise VitpcmError(f"rank {r} failed: {record['error']}")
            found[r] = record.get("info") or {}
        missing = [r for r in others if r not in found]
        if not missing:
            break
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            raise VitpcmError(f"ranks {missing} did not finish within {timeout:.0f} s (no marker in {folder})")
        if now - last_note > 60:
            log.info("waiting for ranks %s to finish (%s)", missing, folder)
            last_note = now
        time.sleep(poll)
    for r in others:
        done_marker(folder, r).unlink(missing_ok=True)
    return [found[r] for r in others]


def _read_marker(path: Path) -> Optional[Dict[str, Any]]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
