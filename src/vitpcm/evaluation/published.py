"""The published rows shown beside ours: ViT-PCM's, and the paper's whole Tables S1 / S2.

Two data files, shipped in ``vitpcm/resources`` (``docs/published.md`` lists the rows and
their sources):

* ``published.json``: the ViT-PCM rows a table puts beside ours, by id (``--compare ID``):
  the DeepLabV2 "verification" rows of the paper's Tables S1 / S2 and the BPM rows of the
  authors' README (mIoU only). A row with ``table`` and ``method`` takes its per-class
  values from that table's row.
* ``published/table_s1_voc12.tsv`` (VOC 2012 val and test, 14 + 9 methods) and
  ``published/table_s2_coco14.tsv`` (COCO 2014 val, 3 methods): every per-class row of the
  paper's supplementary Tables S1 / S2, transcribed from the paper (the folder's README).
  ``vitpcm evaluate --compare all`` prints a whole table with ours inserted.

The VOC and COCO class lists get a default row (Table S1 / S2, val); other class lists
get none unless asked for.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vitpcm.classes import BUILTIN_CLASS_LISTS, class_list
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

_RESOURCES = Path(__file__).resolve().parents[1] / "resources"
_PUBLISHED = _RESOURCES / "published.json"
TABLES_DIR = _RESOURCES / "published"
TABLE_FILES = {"S1": "table_s1_voc12.tsv", "S2": "table_s2_coco14.tsv"}

# Table S2 prints COCO's names its own way; each differing name -> the coco14 list's name
# (resources/coco14_classes.txt). Names not listed here are spelled alike in both.
COCO_S2_NAMES = {
    "traffic-light": "traffic light",
    "fire-hydrant": "fire hydrant",
    "stop-sign": "stop sign",
    "parking-meter": "parking meter",
    "sports-ball": "sports ball",
    "baseball-bat": "baseball bat",
    "baseball-glove": "baseball glove",
    "tennis-racket": "tennis racket",
    "wine-glass": "wine glass",
    "hot-dog": "hot dog",
    "potted-plant": "potted plant",
    "dining-table": "dining table",
    "cellphone": "cell phone",
    "teddy-bear": "teddy bear",
    "hair-drier": "hair drier",
}

_META = ("table", "dataset", "split", "group", "method")  # the TSVs' first columns; "mIoU" is the last


def load_published() -> Dict[str, Any]:
    """The published ViT-PCM rows shipped with the package (``resources/published.json``).

    Rows that name a ``table`` and ``method`` get that table row's per-class values as
    ``iou`` ({class name of the package's list: IoU in percent}); the others keep theirs
    (empty: mIoU only).
    """
    data = json.loads(_PUBLISHED.read_text(encoding="utf-8"))
    for row in data["rows"]:
        if "table" in row:
            source = next((r for r in load_table(row["table"]) if r["split"] == row["split"]
                           and r["method"] == row["method"]), None)  # fmt: skip
            if source is None:  # a packaging mistake, not a user's: say which row
                raise VitpcmError(
                    f"published row {row['id']}: no {row['method']!r} {row['split']} row in Table {row['table']}"
                )
            row["iou"] = dict(source["iou"])
        row.setdefault("iou", {})
    return data


def _slug(text: str) -> str:
    # "MCT-Former*" (the paper's end-to-end variant) must not collide with "MCT-Former"
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("*", " star")).strip("-")


def table_class_name(table: str, printed: str) -> str:
    """The package's class name for a column head of Table ``table`` (``S1``, ``S2``)."""
    return COCO_S2_NAMES.get(printed, printed) if table == "S2" else printed


def load_table(table: str) -> List[Dict[str, Any]]:
    """Every row of the paper's Table ``S1`` (VOC12 val + test) or ``S2`` (COCO14 val), in the paper's order.

    Each row: ``{"id": "s1-val-mct-former", "table", "classes" (voc12 / coco14), "split",
    "group" (``boosted`` / ``end-to-end``; ``-`` in S2), "method" (as printed), "iou":
    {class name of the package's list: percent}, "miou": percent as printed, "source",
    "what"}``. A value printed without decimals (``29.``) is read as it stands.
    """
    if table not in TABLE_FILES:
        raise VitpcmError(f"no published table {table!r}: choose one of {', '.join(TABLE_FILES)}")
    path = TABLES_DIR / TABLE_FILES[table]
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        classes = [table_class_name(table, name) for name in header[len(_META) : -1]]
        rows = []
        for cells in reader:
            if not cells:
                continue
            meta = dict(zip(_META, cells))
            values = [float(v) for v in cells[len(_META) : -1]]
            rows.append({
                "id": f"{table.lower()}-{meta['split']}-{_slug(meta['method'])}",
                "table": table,
                "classes": meta["dataset"],
                "split": meta["split"],
                "group": meta["group"],
                "method": meta["method"],
                "iou": dict(zip(classes, values)),
                "miou": float(cells[-1]),
                "source": f"Table {table}",
                "what": f"{meta['method']}: DeepLab trained on its pseudo-masks, {meta['dataset'].upper()} {meta['split']}",
            })  # fmt: skip
    return rows


def builtin_list_name(class_names: Sequence[str]) -> Optional[str]:
    """``voc12`` / ``coco14`` when ``class_names`` is that built-in list, else None."""
    for name in BUILTIN_CLASS_LISTS:
        if list(class_names) == class_list(name):
            return name
    return None


def _table_of(list_name: Optional[str]) -> Optional[str]:
    return {"voc12": "S1", "coco14": "S2"}.get(list_name or "")


def published_row(
    class_names: Sequence[str], row_id: Optional[str] = None, split: Optional[str] = None
) -> Optional[Dict[str, Any]]:
    """The published row to show beside ours.

    ``row_id`` None: for a VOC / COCO class list, ViT-PCM's Table S1 / S2 row of ``split``
    (default: the val row), none for other lists; ``"none"``: no row; else the row with that
    id (its class list, and ``split`` when given, must match).
    """
    if row_id == "none":
        return None
    rows = load_published()["rows"]
    list_name = builtin_list_name(class_names)
    if row_id is None:
        if split is None:
            return next((r for r in rows if r["classes"] == list_name and r.get("default")), None)
        if list_name is None:
            return None
        row = next((r for r in rows if r["classes"] == list_name and "table" in r and r["split"] == split), None)
        if row is None:
            have = sorted({r["split"] for r in rows if r["classes"] == list_name and "table" in r})
            raise VitpcmError(
                f"the paper's table for {list_name} has no {split} split: choose one of {', '.join(have)}"
            )
        return row
    row = next((r for r in rows if r["id"] == row_id), None)
    if row is None:
        raise VitpcmError(f"no published row '{row_id}': choose one of {', '.join(r['id'] for r in rows)}, all or none")
    if row["classes"] != list_name:
        raise VitpcmError(
            f"published row '{row_id}' is for the {row['classes']} classes, but --classes is not that list"
        )
    if split is not None and row["split"] != split:
        raise VitpcmError(f"published row '{row_id}' is for the {row['split']} split, not {split}")
    return row


def published_table(class_names: Sequence[str], split: Optional[str] = None) -> Dict[str, Any]:
    """The paper's whole table for a VOC / COCO class list and split (``--compare all``).

    ``split`` default: the split of the list's default row (val). Returns ``{"table": "S1",
    "classes": "voc12", "split", "rows": rows of :func:`load_table` (paper order),
    "vitpcm": ViT-PCM's row (:func:`published_row`)}``.
    """
    list_name = builtin_list_name(class_names)
    table = _table_of(list_name)
    if table is None:
        raise VitpcmError("--compare all needs the voc12 or coco14 class list (the paper's Tables S1 / S2)")
    vitpcm_row = published_row(class_names, None, split)
    assert vitpcm_row is not None  # a VOC / COCO list always has a default row
    split = vitpcm_row["split"]
    rows = [r for r in load_table(table) if r["split"] == split]
    return {"table": table, "classes": list_name, "split": split, "rows": rows, "vitpcm": vitpcm_row}
