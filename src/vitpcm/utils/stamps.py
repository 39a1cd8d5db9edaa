"""What made an output file, written into the file itself, so a rerun can tell a finished
output from a stale one.

A mask PNG carries a small JSON record in a text chunk (``vitpcm``): the stage that wrote
it and a digest of everything besides its inputs that decides its pixels (checkpoint,
scale, TTA, CRF parameters, ...). A rerun with the same settings keeps the file; a rerun
with other settings recomputes it, even when the file is newer than its inputs. The record
travels with the file (no side file to get out of step, no race between ranks), costs
~0.1 ms to read (the PNG header only) and is ignored by every image reader.
Standard library only (and :mod:`vitpcm.io`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from vitpcm.io import read_png_text

TEXT_KEY = "vitpcm"


def digest(settings: Any) -> str:
    """A short stable digest of a JSON-able object (keys sorted)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def stamp(stage: str, key: str, **extra: Any) -> Dict[str, str]:
    """The PNG text chunks (``save_mask_png(..., text=...)``) of an output of ``stage``
    made with settings ``key``; ``extra``: more JSON-able facts (e.g. ``probs=True``)."""
    return {TEXT_KEY: json.dumps({"stage": stage, "key": key, **extra}, sort_keys=True)}


def read_stamp(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The record :func:`stamp` put in a PNG; None when the file is missing, unreadable or
    carries none (e.g. written by an older vitpcm)."""
    text = read_png_text(path)
    if not text or TEXT_KEY not in text:
        return None
    try:
        record = json.loads(text[TEXT_KEY])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def finished(
    png: Union[str, Path],
    stage: str,
    key: str,
    *,
    newer_than_ns: int = 0,
    companions: Sequence[Union[str, Path]] = (),
    **facts: Any,
) -> bool:
    """Whether the output ``png`` is finished: stamped by ``stage`` with settings ``key``
    (and the ``facts`` given, e.g. ``probs=True``), its mtime at least ``newer_than_ns``
    (e.g. the checkpoint's: a retrained model makes it stale) and every file of
    ``companions`` there (e.g. its npz, written before it). False when anything is missing."""
    record = read_stamp(png)
    if record is None or record.get("stage") != stage or record.get("key") != key:
        return False
    if any(record.get(k) != v for k, v in facts.items()):
        return False
    if not all(Path(c).is_file() for c in companions):
        return False
    try:
        return Path(png).stat().st_mtime_ns >= newer_than_ns
    except FileNotFoundError:
        return False
