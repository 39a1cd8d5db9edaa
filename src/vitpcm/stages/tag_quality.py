"""The tag quality of a run: how well its pooled scores y_k tell an image's tags, kept in
``RUN/eval/SPLIT/tags.json`` (:meth:`vitpcm.runs.RunLayout.tag_quality`).

``vitpcm infer`` records it for every split whose tags are known; ``vitpcm predict`` takes
its default threshold from the val split's record (the threshold with the best mean F1),
when that record was made with the checkpoint in use; else ``infer.present_threshold``.
``vitpcm report`` shows the records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from vitpcm.atomic import write_json_atomic
from vitpcm.evaluation.tags import tag_quality
from vitpcm.runs import RunLayout

log = logging.getLogger(__name__)


def _checkpoint_id(ckpt_path: Path) -> list:
    st = ckpt_path.stat()
    return [str(ckpt_path.resolve()), st.st_size, st.st_mtime_ns]


def record_tag_quality(
    layout: RunLayout,
    split: str,
    ckpt_path: Path,
    scores: np.ndarray,
    truth: np.ndarray,
    classes: Sequence[str],
    threshold: float,
) -> Dict[str, Any]:
    """Measure (:func:`vitpcm.evaluation.tags.tag_quality`; ``scores`` / ``truth`` ``[N, C]``)
    and write ``RUN/eval/SPLIT/tags.json`` with the checkpoint it was measured with."""
    result = tag_quality(scores, truth, classes, threshold)
    result.update(split=split, checkpoint=_checkpoint_id(ckpt_path))
    write_json_atomic(layout.tag_quality(split), result)
    return result


def read_tag_quality(layout: RunLayout, split: str) -> Optional[Dict[str, Any]]:
    """The record of ``split`` (None when absent or unreadable)."""
    path = layout.tag_quality(split)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def default_threshold(layout: RunLayout, ckpt_path: Path, cfg: Any) -> Tuple[float, str]:
    """``(threshold, where it came from)`` for images without tags: the val split's best
    threshold when recorded with this checkpoint, else ``infer.present_threshold``."""
    split = str(cfg.data.get("val_split") or "val")
    record = read_tag_quality(layout, split)
    if record is not None and record.get("checkpoint") == _checkpoint_id(ckpt_path):
        best = record.get("best_threshold")
        if isinstance(best, (int, float)) and 0 < best < 1:
            return float(best), f"best mean F1 on {split} ({layout.tag_quality(split)})"
    fallback = float(cfg.infer.present_threshold)
    why = "absent" if record is None else "made with another checkpoint"
    log.info("no tag quality of split %s for this checkpoint (%s): threshold infer.present_threshold = %g;"
             " run `vitpcm infer %s --split %s` to choose one", split, why, fallback, layout.root, split)  # fmt: skip
    return fallback, "infer.present_threshold"
