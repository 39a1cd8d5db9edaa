"""Stage ``report``: one self-contained ``RUN/report.html`` a user opens offline.

It gathers what a run folder holds and what the user needs to judge the pseudo-masks::

    RUN/report.html            the report: every figure inlined as a base64 PNG, no
                               script, no external resource; links are relative
    RUN/figures/               the same figures as PNG files (training curves, and per
                               split: Fig. S2 mask triplets, Fig. S1 heat maps)
    RUN/eval/<split>/          per split with ground truth: metrics.json, per_class.csv,
                               per_class.md, confusion_<label>.npy / .png, iou_bars.png

Sections: results per split (BPM ``pseudo/<split>/masks`` and, when complete, CRF
``pseudo/<split>/crf`` against the ground truth, beside a published ViT-PCM row for the
VOC / COCO class lists), per-class IoU bars, confusion matrices, training curves from
``logs/metrics.jsonl``, sample figures, links to the files, the resolved config.

The figures are drawn by :mod:`vitpcm.viz.figures`, the page by
:mod:`vitpcm.viz.html`; the dataset (images, ground truth) is read through
``vitpcm.data``, imported inside the call.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vitpcm.errors import VitpcmError
from vitpcm.io import format_names, names_in, read_classes, read_mask_png, write_text_atomic
from vitpcm.runs import PseudoLayout, RunLayout

log = logging.getLogger(__name__)


def _pick_samples(names: Sequence[str], k: int, chosen: Optional[Sequence[str]], seed: int) -> List[str]:
    if chosen:
        unknown = [n for n in chosen if n not in set(names)]
        if unknown:
            raise VitpcmError(f"--names: {format_names(unknown)} not among the masks of this split")
        return list(chosen)
    return sorted(random.Random(seed).sample(sorted(names), min(k, len(names))))


def _split_section(
    run: RunLayout,
    split: str,
    cfg: Any,
    classes: List[str],
    samples: int,
    names: Optional[Sequence[str]],
    seed: int,
    compare: Optional[str],
    progress: bool,
) -> Dict[str, Any]:
    """Evaluate one split, draw its figures; returns {'html': str, 'evaluation': dict or None}."""
    from vitpcm.data import build_dataset
    from vitpcm.evaluation import evaluate_folders, published_row
    from vitpcm.images import load_rgb
    from vitpcm.postprocess.crf import load_probs
    from vitpcm.stages.evaluate import write_evaluation_files
    from vitpcm.viz import html as page
    from vitpcm.viz.figures import figure_heatmaps, figure_masks

    pseudo = PseudoLayout(run.pseudo(split))
    mask_names = names_in(pseudo.masks, ".png")
    notes: List[str] = []
    preds = {"bpm": pseudo.masks}
    crf_names = set(names_in(pseudo.crf, ".png")) if pseudo.crf.is_dir() else set()
    if crf_names and set(mask_names) <= crf_names:
        preds["crf"] = pseudo.crf
    elif crf_names:
        crf_rel = page.rel(pseudo.crf, run.root)
        notes.append(f"{crf_rel} holds {len(crf_names & set(mask_names))} of {len(mask_names)} masks"
                     " (an interrupted `vitpcm crf`? rerun it to finish): left out of the tables.")  # fmt: skip

    dataset = None
    try:
        dataset = build_dataset(cfg.data, split, require_masks=False)
    except VitpcmError as exc:
        notes.append(f"dataset not available ({exc}); pass data.root=PATH to include ground truth and images.")
    has_gt = dataset is not None and dataset.has_masks

    evaluation = None
    evaluation_html = ""
    if has_gt:
        cms = evaluate_folders(preds, dataset.read_mask, classes, names=mask_names, progress=progress)
        eval_dir = run.eval(split)
        evaluation = write_evaluation_files(cms, classes, eval_dir, published=published_row(classes, compare))
        evaluation_html = page.evaluation_html(split, evaluation, eval_dir, run.root)
    elif dataset is not None:
        notes.append(f"split {split} has no ground-truth masks: no metrics.")

    # sample figures (need the images)
    sample_rows: List[List[page.Figure]] = []
    title = ""
    if dataset is not None and samples > 0 and mask_names:
        fig_dir = run.figures / split
        chosen = _pick_samples(mask_names, samples, names, seed)
        title = f"Samples ({len(chosen)} of {len(mask_names)}; {'chosen' if names else f'random, seed {seed}'})"
        for name in chosen:
            image = load_rgb(dataset.image_path(name))
            masks = {label: read_mask_png(folder / f"{name}.png") for label, folder in preds.items()}
            gt = dataset.read_mask(name, image.shape[:2]) if has_gt else None
            row: List[page.Figure] = [(figure_masks(image, masks, classes, fig_dir / f"{name}_masks.png", gt=gt, title=name),
                                       f"{name}: image | ground truth | " + " | ".join(masks))]  # fmt: skip
            probs_file = pseudo.probs / f"{name}.npz"
            if probs_file.is_file():
                probs, cls = load_probs(probs_file)
                row.append((figure_heatmaps(image, probs, cls, classes, fig_dir / f"{name}_heatmaps.png", title=name),
                            f"{name}: heat map per present class"))  # fmt: skip
            sample_rows.append(row)

    outputs = [p for p in (pseudo.masks, pseudo.probs, pseudo.crf) if p.is_dir()]
    if pseudo.summary.is_file():
        outputs.append(pseudo.summary)
    html_text = page.split_section(split, run.root, evaluation=evaluation_html, samples_title=title, samples=sample_rows,
                                   outputs=outputs, notes=notes)  # fmt: skip
    return {"html": html_text, "evaluation": evaluation}


def _training_facts(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    if not rows:
        return []
    vals = [(r.get("val_miou"), r["epoch"]) for r in rows if r.get("val_miou") is not None]
    best = max(vals) if vals else None
    secs = sum(float(r.get("seconds", 0) or 0) for r in rows)
    return [["epochs", str(rows[-1]["epoch"])], ["last loss", f"{rows[-1].get('loss', float('nan')):.4f}"],
            ["best val mIoU", f"{100 * best[0]:.2f} (epoch {best[1]})" if best else "–"],
            ["training time", f"{secs / 60:.1f} min"]]  # fmt: skip


def report(
    run: str | Path,
    *,
    overrides: Sequence[str] = (),
    splits: Optional[Sequence[str]] = None,
    samples: int = 4,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    compare: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write ``RUN/report.html`` (and ``RUN/figures/``, ``RUN/eval/<split>/``).

    Args:
        run: a training run folder (holds ``config.yaml``).
        overrides: ``key=value`` config overrides (e.g. ``data.root=...`` when the data moved).
        splits: the ``pseudo/<split>`` folders to include; default all of them.
        samples: random sample figures per split (``names`` picks them instead).
        seed: for the random sample.
        compare: published row id for the tables (default: Table S1 / S2 for VOC / COCO; ``none``).

    Returns ``{"report": path, "evaluations": {split: what eval/<split>/metrics.json holds}}``.
    """
    from vitpcm import __version__
    from vitpcm.config import load_config
    from vitpcm.viz import html as page
    from vitpcm.viz.figures import plot_training_curves

    layout = RunLayout(run).require()
    cfg = load_config(layout.config, overrides)
    if layout.classes.is_file():
        classes = read_classes(layout.classes)
    else:
        from vitpcm.data.voc import resolve_classes

        classes = resolve_classes(Path(cfg.data.root or "."), cfg.data.classes)
    found = layout.pseudo_splits()
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise VitpcmError(f"no pseudo-masks for split(s) {missing} in {layout.pseudo_root}:"
                              f" run `vitpcm infer {layout.root} --split {missing[0]}` first")  # fmt: skip
        found = list(splits)

    sections: List[str] = []
    evaluations: Dict[str, Any] = {}
    for split in found:
        section = _split_section(layout, split, cfg, classes, samples, names, seed, compare, progress)
        sections.append(section["html"])
        if section["evaluation"] is not None:
            evaluations[split] = section["evaluation"]
    if not found:
        sections.append(page.no_pseudo_masks(layout.root))

    # training
    facts = curves = None
    if layout.metrics.is_file():
        rows = layout.read_metrics()
        curves = plot_training_curves(rows, layout.training_curves)
        facts = _training_facts(rows)
    training = page.training_section(layout.root, layout.metrics, facts, curves)

    files = [layout.config, layout.classes, layout.metrics, layout.checkpoint("best"), layout.checkpoint("last"),
             layout.logs, layout.figures, layout.eval_root, layout.pseudo_root]  # fmt: skip
    config_text = layout.config.read_text(encoding="utf-8")
    if overrides:
        config_text += "# report overrides: " + " ".join(overrides) + "\n"
    text = page.render_page(layout.root, version=__version__, backbone=str(cfg.model.backbone), num_classes=len(classes),
                            splits=found, sections=sections, training=training, files=files, config_text=config_text,
                            written=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))  # fmt: skip
    write_text_atomic(layout.report, text)
    return {"report": str(layout.report), "evaluations": evaluations}
