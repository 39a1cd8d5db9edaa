"""The published ViT-PCM rows shown beside ours (``vitpcm/resources/published.json``).

See ``docs/published.md`` for where each row comes from. The VOC and COCO class lists get
a default row (the paper's Table S1 / S2); other class lists get none unless asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from vitpcm.errors import VitpcmError

VOC_SHORT = {
    "background": "bkg",
    "aeroplane": "aero",
    "bicycle": "bike",
    "diningtable": "table",
    "motorbike": "mbike",
    "pottedplant": "plant",
    "tvmonitor": "tv",
}  # fmt: skip  (the column heads of the paper's Table S1)

_PUBLISHED = Path(__file__).resolve().parents[1] / "resources" / "published.json"


def load_published() -> Dict[str, Any]:
    """The published ViT-PCM rows shipped with the package (``resources/published.json``)."""
    return json.loads(_PUBLISHED.read_text(encoding="utf-8"))


def builtin_list_name(class_names: Sequence[str]) -> Optional[str]:
    """``voc12`` / ``coco14`` when ``class_names`` is that built-in list, else None."""
    from vitpcm.io import BUILTIN_CLASS_LISTS, class_list

    for name in BUILTIN_CLASS_LISTS:
        if list(class_names) == class_list(name):
            return name
    return None


def published_row(class_names: Sequence[str], row_id: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The published row to show beside ours.

    ``row_id`` None: the default row for a VOC / COCO class list (Table S1 / S2), none for
    other lists; ``"none"``: no row; else the row with that id (its class list must match).
    """
    if row_id == "none":
        return None
    rows = load_published()["rows"]
    list_name = builtin_list_name(class_names)
    if row_id is None:
        return next((r for r in rows if r["classes"] == list_name and r.get("default")), None)
    row = next((r for r in rows if r["id"] == row_id), None)
    if row is None:
        raise VitpcmError(f"no published row '{row_id}': choose one of {', '.join(r['id'] for r in rows)} or none")
    if row["classes"] != list_name:
        raise VitpcmError(
            f"published row '{row_id}' is for the {row['classes']} classes, but --classes is not that list"
        )
    return row
