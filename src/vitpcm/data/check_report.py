"""The result of ``vitpcm check-data``: per-split and whole-config reports, and the text it prints."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm.data.base import ItemReport, Problem


@dataclass
class SplitReport:
    """The result of checking one split. ``error`` is set when the split could not be
    opened at all (then ``items`` is empty)."""

    split: str
    role: str  # "train", "val" or "extra": how the config uses it
    format: str = ""
    root: str = ""
    classes: List[str] = field(default_factory=list)
    has_masks: bool = False
    items: List[ItemReport] = field(default_factory=list)
    info: List[str] = field(default_factory=list)
    error: Optional[str] = None
    from_cache: int = 0  # items whose result came from the screening cache (no file read)

    @property
    def problems(self) -> List[Problem]:
        return [p for item in self.items for p in item.problems]

    @property
    def broken(self) -> List[str]:
        return [item.name for item in self.items if item.problems]

    def class_counts(self) -> List[int]:
        """Images per class (background counts every image with tags)."""
        counts = [0] * len(self.classes)
        for item in self.items:
            if item.tags is not None and not item.problems:
                counts[0] += 1
                for c in item.tags:
                    counts[c] += 1
        return counts

    def to_dict(self) -> Dict[str, Any]:
        ok = [i for i in self.items if not i.problems]
        sizes = [i.size for i in ok if i.size]
        return {
            "split": self.split,
            "role": self.role,
            "format": self.format,
            "root": self.root,
            "error": self.error,
            "listed": len(self.items),
            "ok": len(ok),
            "broken": len(self.items) - len(ok),
            "has_masks": self.has_masks,
            "images_per_class": dict(zip(self.classes, self.class_counts())),
            "background_only": sum(i.background_only for i in ok),
            "sizes": _size_stats(sizes),
            "conversions": dict(Counter(n for i in self.items for n in i.notes)),
            "warnings": {i.name: i.warnings for i in self.items if i.warnings},
            "info": self.info,
            "problems": [{"name": p.name, "kind": p.kind, "path": p.path, "message": p.message} for p in self.problems],
        }


@dataclass
class DataReport:
    """All checked splits of one config, plus what concerns several splits."""

    splits: List[SplitReport]
    cross: List[str] = field(default_factory=list)  # e.g. names shared by train and val

    @property
    def ok(self) -> bool:
        return all(s.error is None and not s.problems for s in self.splits)

    def problem_lines(self) -> List[str]:
        lines = []
        for s in self.splits:
            if s.error:
                lines.append(f"[{s.split}] {s.error}")
            lines.extend(p.line(s.split) for p in s.problems)
        return lines

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "splits": [s.to_dict() for s in self.splits], "cross_split": self.cross}

    def format(self) -> str:
        return format_report(self)


def _size_stats(sizes: Sequence[Tuple[int, int]]) -> Dict[str, Any]:
    if not sizes:
        return {}
    arr = np.asarray(sizes)
    common = Counter(f"{w}x{h}" for h, w in sizes).most_common(5)
    return {
        "height": {"min": int(arr[:, 0].min()), "median": float(np.median(arr[:, 0])), "max": int(arr[:, 0].max())},
        "width": {"min": int(arr[:, 1].min()), "median": float(np.median(arr[:, 1])), "max": int(arr[:, 1].max())},
        "most_common_wxh": dict(common),
    }


def format_report(report: DataReport) -> str:
    """The human-readable report ``vitpcm check-data`` prints."""
    out: List[str] = []
    first = next((s for s in report.splits if s.error is None), report.splits[0] if report.splits else None)
    if first is not None:
        out.append(f"dataset: {first.format} at {first.root}, {len(first.classes)} classes")
    out.append("")
    out.append(f"{'split':<12} {'role':<6} {'listed':>7} {'ok':>7} {'broken':>7}  masks")
    for s in report.splits:
        if s.error:
            out.append(f"{s.split:<12} {s.role:<6} {'-':>7} {'-':>7} {'-':>7}  cannot be opened")
            continue
        n_ok = sum(1 for i in s.items if not i.problems)
        masks = "yes" if s.has_masks else "no"
        out.append(f"{s.split:<12} {s.role:<6} {len(s.items):>7} {n_ok:>7} {len(s.items) - n_ok:>7}  {masks}")
    opened = [s for s in report.splits if s.error is None]
    if opened and any(any(i.tags is not None for i in s.items) for s in opened):
        classes = opened[0].classes
        width = max(len("class"), *(len(c) for c in classes))
        out += ["", "images per class (items without problems):"]
        out.append(f"  {'class':<{width}} " + " ".join(f"{s.split:>10}" for s in opened))
        # a split without tags (VOC test) shows "-", not zeros
        counts = [s.class_counts() if len(s.classes) == len(classes) and any(i.tags is not None for i in s.items)
                  else None for s in opened]  # fmt: skip
        for c, name in enumerate(classes):
            row = [cs[c] if cs is not None else None for cs in counts]
            flag = "   <- no image" if c > 0 and not any(row) else ""
            out.append(f"  {name:<{width}} " + " ".join(f"{'-' if v is None else v:>10}" for v in row) + flag)
    out += ["", "image sizes (as displayed):"]
    for s in opened:
        st = _size_stats([i.size for i in s.items if i.size and not i.problems])
        if not st:
            out.append(f"  {s.split}: no readable image")
            continue
        h, w = st["height"], st["width"]
        common = ", ".join(f"{k} ({v})" for k, v in st["most_common_wxh"].items())
        out.append(
            f"  {s.split}: height {h['min']}..{h['max']} (median {h['median']:g}), width {w['min']}..{w['max']}"
            f" (median {w['median']:g}); most common WxH: {common}"
        )
    notes: List[str] = []
    for s in opened:
        conv = Counter(n for i in s.items for n in i.notes)
        if conv:
            notes.append(
                f"{s.split}: converted on reading (fine): " + ", ".join(f"{k} {v}" for k, v in sorted(conv.items()))
            )
        bg = sum(1 for i in s.items if i.background_only and not i.problems)
        if bg:
            notes.append(f"{s.split}: {bg} masks hold only background (kept)")
        warned = [i for i in s.items if i.warnings]
        if warned:
            example = f"{warned[0].name}: {warned[0].warnings[0]}"
            notes.append(f"{s.split}: {len(warned)} items look odd but are usable, e.g. {example}")
        notes += [f"{s.split}: {line}" for line in s.info]
    notes += report.cross
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    lines = report.problem_lines()
    out.append("")
    if lines:
        out.append(f"problems ({len(lines)}):")
        out += [f"  {line}" for line in lines]
        n_items = sum(len(s.broken) for s in opened)
        unopened = [s.split for s in report.splits if s.error]
        parts = []
        if n_items:
            parts.append(f"{n_items} item(s) cannot be used: fix them, or train with --skip-bad to leave them out")
        if unopened:
            parts.append(f"split(s) {', '.join(unopened)} cannot be opened: fix that first")
        out += ["", "BROKEN: " + "; ".join(parts)]
    else:
        out.append("OK: no problems")
    return "\n".join(out)
