"""Figures: per-image (the paper's Fig. S1 / S2 style) and per-run (curves, IoU bars, confusion).

Every function writes one PNG atomically and returns its path. matplotlib is used through
its object API with the Agg canvas (no pyplot, no display, no global backend switch), so
figures can be drawn in workers, on servers and inside a user's notebook alike. It is
imported inside the functions: importing this module costs nothing.

* :func:`figure_heatmaps` (Fig. S1): the image and one heat map per present class.
* :func:`figure_masks` (Fig. S2): image | ground truth | one or more masks (BPM, CRF, ...).
* :func:`figure_best_grid` (Fig. S3): a grid of images and their masks (the best ones).
* :func:`plot_training_curves`: losses, val mIoU and learning rate from ``logs/metrics.jsonl``.
* :func:`plot_iou_bars`: per-class IoU of one or more prediction folders (and a published row).
* :func:`plot_confusion`: row-normalised confusion matrix heat map.
* :func:`write_evaluation_figures`: the figures of an evaluation folder (confusion heat
  maps and IoU bars beside :func:`vitpcm.evaluation.write_evaluation`'s files).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from vitpcm.atomic import atomic_path
from vitpcm.classes import IGNORE_INDEX, pascal_palette
from vitpcm.evaluation import ConfusionMatrix, confusion_stem
from vitpcm.runs import read_metrics_file

DPI = 80  # small files: the report inlines them


def _figure(width: float, height: float):
    # matplotlib lazy here and below (~0.3 s): `vitpcm evaluate` without figures never needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def colorize(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` class indices -> ``[H, W, 3]`` uint8 with the PASCAL palette (255 = cream)."""
    return pascal_palette()[np.asarray(mask, dtype=np.uint8)]


def _legend_handles(values: Sequence[int], class_names: Sequence[str]) -> List[Any]:
    from matplotlib.patches import Patch  # lazy: see _figure

    pal = pascal_palette() / 255.0
    handles = []
    for v in values:
        name = "ignore" if v == IGNORE_INDEX else (class_names[v] if v < len(class_names) else str(v))
        handles.append(Patch(facecolor=pal[v], edgecolor="black", linewidth=0.3, label=name))
    return handles


def figure_heatmaps(
    image: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[int],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    panel: float = 2.2,
) -> Path:
    """Fig. S1 style: the image, then one heat map per present class.

    Args:
        image: ``[H, W, 3]`` uint8.
        probs: ``[P, H, W]`` probabilities of the present classes (``probs/NAME.npz``).
        classes: ``[P]`` their class indices.
    """
    n = 1 + len(classes)
    aspect = image.shape[0] / max(image.shape[1], 1)
    fig = _figure(panel * n, panel * aspect + 0.5)
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    grey = image.mean(axis=2) / 255.0
    for ax, channel, cls in zip(axes[1:], probs, classes):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
        ax.imshow(channel, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.55)
        name = class_names[int(cls)] if int(cls) < len(class_names) else str(cls)
        ax.set_title(f"{name} (max {float(channel.max()):.2f})", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    # fixed margins: tight_layout measures every text and is the slow part of a figure
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.80, wspace=0.05)
    return save_figure(fig, path)


def figure_masks(
    image: np.ndarray,
    masks: Mapping[str, np.ndarray],
    class_names: Sequence[str],
    path: str | Path,
    gt: Optional[np.ndarray] = None,
    title: str = "",
    panel: float = 2.2,
) -> Path:
    """Fig. S2 style: image | ground truth (when given) | each mask in ``masks`` {label: [H, W]}."""
    panels: List[tuple[str, np.ndarray]] = [("image", image)]
    if gt is not None:
        panels.append(("ground truth", colorize(gt)))
    panels += [(label, colorize(mask)) for label, mask in masks.items()]
    aspect = image.shape[0] / max(image.shape[1], 1)
    fig = _figure(panel * len(panels), panel * aspect + 0.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, arr) in zip(axes, panels):
        ax.imshow(arr, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    values = set()
    for arr in ([gt] if gt is not None else []) + list(masks.values()):
        values |= set(np.unique(arr).tolist())
    fig.legend(handles=_legend_handles(sorted(values), class_names), loc="lower center",
               ncol=min(len(values), 8), fontsize=7, frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.16, top=0.82, wspace=0.05)
    return save_figure(fig, path)


def figure_best_grid(
    items: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    columns: int = 3,
    title: str = "",
    panel: float = 1.9,
) -> Path:
    """Fig. S3 style: a grid of ``(caption, image [H, W, 3] uint8, mask [H, W])`` items, each
    shown as image | mask, ``columns`` items per row; one legend for every class shown."""
    if not items:
        raise ValueError("figure_best_grid needs at least one item")
    return _image_mask_grid([(c, im, (m,)) for c, im, m in items], class_names, path, columns, title, panel)


def figure_triplet_grid(
    items: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    columns: int = 2,
    title: str = "",
    panel: float = 1.6,
) -> Path:
    """A grid of ``(caption, image [H, W, 3] uint8, ground truth [H, W], prediction [H, W])``
    items, each shown as image | ground truth | prediction, ``columns`` items per row; one
    legend for every class shown (the report's worst images)."""
    if not items:
        raise ValueError("figure_triplet_grid needs at least one item")
    return _image_mask_grid([(c, im, (gt, pred)) for c, im, gt, pred in items], class_names, path, columns, title,
                            panel)  # fmt: skip


def _image_mask_grid(
    items: Sequence[tuple[str, np.ndarray, Sequence[np.ndarray]]],
    class_names: Sequence[str],
    path: str | Path,
    columns: int,
    title: str,
    panel: float,
) -> Path:
    """``(caption, image, masks)`` items as image | mask | ... panels, ``columns`` items per
    row, the caption over the image; one legend for the classes shown (255 left out)."""
    per = 1 + len(items[0][2])
    columns = max(1, min(columns, len(items)))
    nrows = math.ceil(len(items) / columns)
    aspect = max(im.shape[0] / max(im.shape[1], 1) for _, im, _ in items)
    height = nrows * (panel * aspect + 0.35) + 0.9
    fig = _figure(panel * per * columns, height)
    axes = fig.subplots(nrows, per * columns, squeeze=False)
    values: set = set()
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        item, side = divmod(i % (per * columns), per)
        k = (i // (per * columns)) * columns + item
        if k >= len(items):
            continue
        caption, image, masks = items[k]
        if side == 0:
            ax.imshow(image)
            ax.set_title(caption, fontsize=7, loc="left")
        else:
            ax.imshow(colorize(masks[side - 1]), interpolation="nearest")
            values |= set(np.unique(masks[side - 1]).tolist()) - {255}
    fig.legend(handles=_legend_handles(sorted(values), class_names), loc="lower center",
               ncol=min(max(len(values), 1), 8), fontsize=7, frameon=False)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.5 / height, top=1 - 0.45 / height, wspace=0.04, hspace=0.25)
    return save_figure(fig, path)


def plot_training_curves(metrics: Union[str, Path, Sequence[Mapping[str, Any]]], path: str | Path) -> Optional[Path]:
    """Losses, val mIoU and learning rate per epoch; None if there are no rows.

    ``metrics``: the rows of ``logs/metrics.jsonl`` (``RunLayout(run).read_metrics()``),
    or the path of such a file.
    """
    rows = read_metrics_file(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig = _figure(11, 3.0)
    ax_loss, ax_miou, ax_lr = fig.subplots(1, 3)
    for key, style in (("loss", "-"), ("mce", "--"), ("et", "--"), ("reg", ":")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, [np.nan if v is None else v for v in values], style, marker=".", label=key)
    ax_loss.set_title("training loss", fontsize=9)
    ax_loss.legend(fontsize=7)
    miou = [r.get("val_miou") for r in rows]
    if any(v is not None for v in miou):
        ax_miou.plot(epochs, [np.nan if v is None else 100 * v for v in miou], marker=".", color="tab:green")
        best = max((v for v in miou if v is not None), default=None)
        if best is not None:
            ax_miou.axhline(100 * best, color="grey", lw=0.6, ls=":")
            ax_miou.set_title(f"val mIoU % (best {100 * best:.2f})", fontsize=9)
    else:
        ax_miou.set_title("val mIoU % (no validation)", fontsize=9)
    lrs = [r.get("lr") for r in rows]
    if any(v is not None for v in lrs):
        ax_lr.plot(epochs, [np.nan if v is None else v for v in lrs], marker=".", color="tab:purple")
        known = [v for v in lrs if v is not None]
        if min(known) > 0 and max(known) / min(known) > 20:  # log only when it spans decades
            ax_lr.set_yscale("log")
        else:
            ax_lr.set_ylim(0, 1.25 * max(known) if max(known) > 0 else 1)
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2), useOffset=False)
    ax_lr.set_title("learning rate", fontsize=9)
    phases = [r.get("phase") for r in rows]
    from matplotlib.ticker import MaxNLocator  # lazy: see _figure

    for ax in (ax_loss, ax_miou, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:  # warm-up -> fine-tune
                ax.axvline(epochs[i] - 0.5, color="grey", lw=0.6, ls="--")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.9, wspace=0.25)
    return save_figure(fig, path)


def plot_iou_bars(
    summaries: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | Path,
    published: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Grouped bars of per-class IoU (%) for each label; a published row's values where it has them."""
    series: Dict[str, List[float]] = {}
    for label, s in summaries.items():
        series[label] = [
            100 * s["iou"][n] if s["iou"].get(n) is not None and s.get("in_ground_truth", {}).get(n, True) else np.nan
            for n in class_names
        ]
    if published and any(published.get("iou", {}).get(n) is not None for n in class_names):
        values = [published["iou"].get(n) for n in class_names]
        series[f"published ({published['id']})"] = [np.nan if v is None else float(v) for v in values]
    k, n = len(series), len(class_names)
    horizontal = n > 25
    width = 0.8 / max(k, 1)
    if horizontal:
        fig = _figure(7, max(3.0, 0.16 * n * max(1, k / 2)))
    else:
        fig = _figure(max(5.0, 0.45 * n * max(1, k / 2)), 3.2)
    ax = fig.subplots()
    pos = np.arange(n)
    for i, (label, values) in enumerate(series.items()):
        offset = pos - 0.4 + width * (i + 0.5)
        miou = summaries[label]["miou"] if label in summaries else None
        name = f"{label} (mIoU {100 * miou:.1f})" if miou is not None and not math.isnan(miou) else label
        if horizontal:
            ax.barh(offset, values, height=width, label=name)
        else:
            ax.bar(offset, values, width=width, label=name)
    if horizontal:
        ax.set_yticks(pos, list(class_names), fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("IoU %", fontsize=8)
    else:
        ax.set_xticks(pos, list(class_names), rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 118)  # headroom for the legend above 100 %
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("IoU %", fontsize=8)
    ax.legend(fontsize=7, loc="upper center", ncol=min(k, 3), frameon=False)
    ax.set_title("per-class IoU", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "confusion") -> Path:
    """Row-normalised heat map (rows = ground truth, columns = prediction); numbers for <= 12 classes."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(rows > 0, m / rows, 0.0)
    n = len(class_names)
    side = min(14.0, max(3.5, 0.3 * n + 1.5))
    fig = _figure(side + 0.8, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fs = 7 if n <= 25 else 4
    ax.set_xticks(range(n), list(class_names), rotation=90, fontsize=fs)
    ax.set_yticks(range(n), list(class_names), fontsize=fs)
    ax.set_xlabel("prediction", fontsize=8)
    ax.set_ylabel("ground truth", fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_evaluation_figures(
    cms: Mapping[str, ConfusionMatrix],
    class_names: Sequence[str],
    out_dir: str | Path,
    published: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The figures of an evaluation folder: ``confusion_<label>.png`` per label and ``iou_bars.png``.

    Returns the file names as :func:`vitpcm.evaluation.write_evaluation` takes them
    (``figures=``) to list them in ``metrics.json``: ``{"confusion": {label: name},
    "iou_bars": name}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion: Dict[str, str] = {}
    for label, cm in cms.items():
        name = f"{confusion_stem(label)}.png"
        plot_confusion(cm.matrix, class_names, out_dir / name, title=f"{label}: confusion (row-normalised)")
        confusion[label] = name
    summaries = {label: cm.summary(class_names) for label, cm in cms.items()}
    plot_iou_bars(summaries, class_names, out_dir / "iou_bars.png", published=published)
    return {"confusion": confusion, "iou_bars": "iou_bars.png"}
