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
VOC / COCO class lists), per-class IoU bars, confusion matrices, each image's own mIoU
(``eval/<split>/per_image.csv``), the worst 24 images (image | ground truth | BPM), the
most confused class pairs with an example each, the tag quality of the pooled scores
(``eval/<split>/tags.json``, written by ``vitpcm infer``), training curves from
``logs/metrics.jsonl``, sample figures, links to the files, the resolved config; and a
gallery of ``vitpcm predict``'s overlays when ``RUN/predict/overlays`` exists (images
without ground truth).

With ``segment=SEGRUN`` (a DeepLab run trained on the pseudo-masks: ``SEGRUN/pseudo/<split>/
masks`` and, after its dense CRF, ``.../crf``) a verification section per split follows:
BPM vs CRF vs DeepLab per class in one table beside the paper's ViT-PCM DeepLabV2 row
(``RUN/eval/<split>/verification/``), Fig. S2 rows (image | ground truth | BPM | CRF |
DeepLab) and a Fig. S3 grid of the best images (highest per-image mIoU of the DeepLab masks).

The figures are drawn by :mod:`vitpcm.viz.figures`, the page by
:mod:`vitpcm.viz.html`; the dataset (images, ground truth) is read through
``vitpcm.data``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import random
from html import escape as html_escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitpcm import __version__
from vitpcm.atomic import write_text_atomic
from vitpcm.classes import read_classes
from vitpcm.config import load_config
from vitpcm.data import build_dataset
from vitpcm.data.voc import resolve_classes
from vitpcm.errors import VitpcmError
from vitpcm.evaluation import (
    builtin_list_name,
    confused_pairs,
    evaluate_folders,
    full_tables,
    published_row,
    published_table,
)
from vitpcm.images import load_rgb
from vitpcm.io import format_names, names_in, read_mask_png
from vitpcm.postprocess.crf import load_probs
from vitpcm.runs import PredictLayout, PseudoLayout, RunLayout
from vitpcm.stages.evaluate import write_evaluation_files
from vitpcm.stages.tag_quality import read_tag_quality
from vitpcm.viz import html as page
from vitpcm.viz.figures import (
    figure_best_grid,
    figure_heatmaps,
    figure_masks,
    figure_triplet_grid,
    plot_training_curves,
)
from vitpcm.viz.overlay import thumbnail_jpeg

log = logging.getLogger(__name__)


def _pick_samples(names: Sequence[str], k: int, chosen: Optional[Sequence[str]], seed: int) -> List[str]:
    if chosen:
        unknown = [n for n in chosen if n not in set(names)]
        if unknown:
            raise VitpcmError(f"--names: {format_names(unknown)} not among the masks of this split")
        return list(chosen)
    return sorted(random.Random(seed).sample(sorted(names), min(k, len(names))))


def _dataset(cfg: Any, split: str, cache: Dict[str, Tuple[Any, Optional[str]]]) -> Tuple[Any, Optional[str]]:
    """The split's dataset (None when it cannot be built) and why not; built once per report
    (COCO reads its annotation file)."""
    if split not in cache:
        try:
            cache[split] = (build_dataset(cfg.data, split, require_masks=False), None)
        except VitpcmError as exc:
            cache[split] = (
                None,
                f"dataset not available ({exc}); pass data.root=PATH to include ground truth and images.",
            )
    return cache[split]


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
    datasets: Dict[str, Tuple[Any, Optional[str]]],
    worst: int = 24,
) -> Dict[str, Any]:
    """Evaluate one split, draw its figures; returns {'html': str, 'evaluation': dict or None,
    'cms': {label: ConfusionMatrix} or None, 'names': the names scored}."""
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

    dataset, why = _dataset(cfg, split, datasets)
    if why:
        notes.append(why)
    has_gt = dataset is not None and dataset.has_masks

    cms = None
    evaluation = None
    evaluation_html = ""
    if has_gt:
        scores: Dict[str, Dict[str, Dict[str, Any]]] = {}
        cms = evaluate_folders(preds, dataset.read_mask, classes, names=mask_names, progress=progress,
                               image_scores=scores)  # fmt: skip
        eval_dir = run.eval(split)
        evaluation = write_evaluation_files(cms, classes, eval_dir, published=published_row(classes, compare))
        evaluation_html = page.evaluation_html(split, evaluation, eval_dir, run.root)
        evaluation_html += _per_image_html(run, split, scores, preds, dataset, classes, worst)
        evaluation_html += _confused_pairs_html(run, split, cms["bpm"], pseudo.masks, dataset, classes, mask_names)
    elif dataset is not None:
        notes.append(f"split {split} has no ground-truth masks: no metrics.")
    tags = read_tag_quality(run, split)
    if tags is not None:
        evaluation_html += page.tag_quality_html(split, tags, run.tag_quality(split), run.root)

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
    return {"html": html_text, "evaluation": evaluation, "cms": cms, "names": mask_names}


def _percent(value: float) -> str:
    return "" if value != value else f"{100 * value:.2f}"  # NaN: the image's ground truth is all ignore


def _per_image_html(run: RunLayout, split: str, scores: Dict[str, Dict[str, Dict[str, Any]]], preds: Dict[str, Path],
                    dataset: Any, classes: List[str], worst: int, csv_path: Optional[Path] = None) -> str:  # fmt: skip
    """Every image's own mIoU per mask folder (``csv_path``, default ``eval/SPLIT/per_image.csv``;
    worst first by the first folder's) and the ``worst`` images as image | ground truth |
    that folder's mask (``figures/SPLIT/worst.png``; 0: none)."""
    labels = [label for label in preds if label in scores]
    if not labels:
        return ""
    bpm = scores[labels[0]]

    def key(name: str) -> Tuple[float, str]:
        m = bpm[name]["miou"]
        return (m if m == m else float("inf"), name)  # NaN (all ignore) last

    names = sorted(bpm, key=key)
    rows = [[n, *(_percent(scores[label][n]["miou"]) for label in labels)] for n in names]
    csv_path = csv_path or run.per_image(split)
    write_text_atomic(csv_path, "name," + ",".join(f"{label}_miou" for label in labels) + "\n"
                      + "".join(",".join(r) + "\n" for r in rows))  # fmt: skip
    text = page.per_image_html(split, rows, ["image", *(f"{label} mIoU" for label in labels)], csv_path, run.root)
    # the worst images that show an object (an all-background image tells little)
    picked = [n for n in names if any(c > 0 for c in bpm[n]["gt_classes"]) and bpm[n]["miou"] == bpm[n]["miou"]]
    picked = picked[:worst]
    if picked and worst > 0:
        items = []
        for name in picked:
            image = load_rgb(dataset.image_path(name))
            items.append((f"{name} · {100 * bpm[name]['miou']:.1f}", image, dataset.read_mask(name, image.shape[:2]),
                          read_mask_png(preds[labels[0]] / f"{name}.png")))  # fmt: skip
        title = f"Worst {len(items)} of {len(names)} images by per-image mIoU ({labels[0]}): image | ground truth | {labels[0]}"
        path = figure_triplet_grid(items, classes, run.figures / split / "worst.png", title=title)
        text += f"<h3>{html_escape(title)}</h3>" + page.inline_image(path, run.root, title)
    return text


def _confused_pairs_html(run: RunLayout, split: str, cm: Any, masks: Path, dataset: Any, classes: List[str],
                         names: Sequence[str], k: int = 5) -> str:  # fmt: skip
    """The ``k`` most confused class pairs of the BPM confusion matrix, each with the image
    that has the most pixels of that confusion (a second pass over the masks)."""
    pairs = confused_pairs(cm.matrix, k)
    if not pairs:
        return ""
    best: Dict[Tuple[int, int], Tuple[int, str]] = {}
    for name in names:
        pred = read_mask_png(masks / f"{name}.png")
        gt = dataset.read_mask(name, pred.shape)
        for g, p, _, _ in pairs:
            count = int(np.count_nonzero((gt == g) & (pred == p)))
            if count > best.get((g, p), (0, ""))[0]:
                best[(g, p)] = (count, name)
    rows, examples = [], []
    for g, p, share, _ in pairs:
        count, name = best.get((g, p), (0, ""))
        rows.append([classes[g], classes[p], f"{100 * share:.1f}", f"{name} ({count} px)" if name else "–"])
        if name:
            image = load_rgb(dataset.image_path(name))
            pred = read_mask_png(masks / f"{name}.png")
            title = f"{name}: {classes[g]} predicted as {classes[p]}"
            path = figure_masks(image, {"bpm": pred}, classes,
                                run.figures / split / f"confused_{g}_{p}.png",
                                gt=dataset.read_mask(name, image.shape[:2]), title=title)  # fmt: skip
            examples.append((path, title))
    return page.confused_pairs_html(rows, examples, run.root)


def _predict_gallery(
    layout: RunLayout, folder: Optional[Path] = None, shown: int = 24
) -> Optional[Tuple[str, str, str]]:
    """``vitpcm predict``'s overlays in ``folder`` (default ``RUN/predict``; no ground truth):
    thumbnails of the first ``shown``, captioned with their predicted classes. None when
    there are none."""
    target = PredictLayout(folder if folder is not None else layout.predict)
    overlays = names_in(target.overlays, ".jpg") if target.overlays.is_dir() else []
    if not overlays:
        return None
    tags: Dict[str, List[str]] = {}
    if target.records.is_file():
        for line in target.records.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                tags[r["name"]] = r.get("tags", [])
            except (ValueError, KeyError, TypeError):
                continue
    order = [n for n in tags if n in set(overlays)] + [n for n in overlays if n not in tags]
    thumbs = []
    for name in order[:shown]:
        path = target.overlays / f"{name}.jpg"
        caption = f"{name}: {', '.join(tags.get(name, [])) or 'background only'}"
        thumbs.append((thumbnail_jpeg(path), path, caption))
    records = target.records if target.records.is_file() else None
    return "predict", "predict", page.gallery_section(target.root, layout.root, thumbs, len(overlays), records)


DEEPLAB = "deeplab"  # the labels of the DeepLab masks in the verification tables
DEEPLAB_CRF = "deeplab+crf"


def _complete(folder: Path, names: Sequence[str]) -> bool:
    return folder.is_dir() and all((folder / f"{n}.png").is_file() for n in names)


def _best_images(scores: Dict[str, Dict[str, Any]], k: int) -> List[Tuple[str, float]]:
    """The ``k`` names with the highest per-image mIoU among the images whose ground truth
    has an object (class > 0): an all-background image is trivially perfect."""
    with_object = {n: s for n, s in scores.items() if any(c > 0 for c in s["gt_classes"]) and s["miou"] == s["miou"]}
    pool = with_object or {n: s for n, s in scores.items() if s["miou"] == s["miou"]}
    ranked = sorted(pool.items(), key=lambda item: (-item[1]["miou"], item[0]))
    return [(n, s["miou"]) for n, s in ranked[:k]]


def _verification_section(
    run: RunLayout,
    seg: RunLayout,
    split: str,
    cfg: Any,
    classes: List[str],
    samples: int,
    names: Optional[Sequence[str]],
    seed: int,
    compare: Optional[str],
    best: int,
    progress: bool,
    datasets: Dict[str, Tuple[Any, Optional[str]]],
    evaluated: Optional[Dict[str, Any]],
) -> Dict[str, Any]:
    """BPM vs CRF vs DeepLab on one split; returns {'html': str, 'evaluation': dict or None}.

    ``evaluated``: the split section's result (its BPM / CRF confusion matrices are reused
    when it scored the same images)."""
    seg_pseudo = PseudoLayout(seg.pseudo(split))
    dl_names = names_in(seg_pseudo.masks, ".png")
    notes: List[str] = []
    preds: Dict[str, Path] = {}
    pseudo = PseudoLayout(run.pseudo(split))
    if not pseudo.masks.is_dir():
        notes.append(f"no BPM masks of split {split} in this run: run `vitpcm infer {run.root} --split {split} --crf`"
                     " to see them beside DeepLab.")  # fmt: skip
    elif not _complete(pseudo.masks, dl_names):
        notes.append(f"{page.rel(pseudo.masks, run.root)} lacks some of the {len(dl_names)} images of the DeepLab"
                     " masks: BPM left out of the table.")  # fmt: skip
    else:
        preds["bpm"] = pseudo.masks
        if _complete(pseudo.crf, dl_names):
            preds["crf"] = pseudo.crf
    ours = {DEEPLAB: seg_pseudo.masks}
    if _complete(seg_pseudo.crf, dl_names):
        ours[DEEPLAB_CRF] = seg_pseudo.crf
    elif seg_pseudo.crf.is_dir():
        notes.append(f"{page.rel(seg_pseudo.crf, run.root)} is incomplete (an interrupted CRF?): left out.")
    final = DEEPLAB_CRF if DEEPLAB_CRF in ours else DEEPLAB
    preds.update(ours)

    dataset, why = _dataset(cfg, split, datasets)
    if why:
        notes.append(why)
    has_gt = dataset is not None and dataset.has_masks
    if dataset is not None and not has_gt:
        notes.append(f"split {split} has no ground-truth masks: no metrics, no best images.")

    published = None
    if compare is not None:
        published = published_row(classes, compare)
    elif builtin_list_name(classes):
        try:
            published = published_row(classes, None, split)
        except VitpcmError:
            notes.append(f"the paper gives no DeepLab row for split {split}.")

    evaluation = whole = None
    per_image = ""
    scores: Dict[str, Dict[str, Dict[str, Any]]] = {}
    eval_dir = run.verification(split)
    if has_gt:
        reuse = evaluated and evaluated.get("cms") and set(evaluated["names"]) == set(dl_names)
        todo = {label: folder for label, folder in preds.items() if not (reuse and label in evaluated["cms"])}
        cms = evaluate_folders(todo, dataset.read_mask, classes, names=dl_names, progress=progress, image_scores=scores)
        if reuse:
            cms = {label: (evaluated["cms"][label] if label not in cms else cms[label]) for label in preds}
        evaluation = write_evaluation_files(cms, classes, eval_dir, published=published)
        final_first = {final: preds[final], **{label: preds[label] for label in preds if label != final}}
        per_image = _per_image_html(run, split, scores, final_first, dataset, classes, 0, eval_dir / "per_image.csv")
        if published is not None and "table" in published and compare in (None, "all"):
            table = published_table(classes, split)
            whole = full_tables({lab: evaluation["results"][lab] for lab in ours}, classes, table)

    # Fig. S2 rows: image | ground truth | BPM | CRF | DeepLab
    fig_dir = run.figures / split
    rows: List[List[page.Figure]] = []
    samples_title = ""
    if dataset is not None and samples > 0 and dl_names:
        chosen = _pick_samples(dl_names, samples, names, seed)
        samples_title = (f"Samples, image | ground truth | {' | '.join(preds)} ({len(chosen)} of {len(dl_names)};"
                         f" {'chosen' if names else f'random, seed {seed}'})")  # fmt: skip
        for name in chosen:
            image = load_rgb(dataset.image_path(name))
            masks = {label: read_mask_png(folder / f"{name}.png") for label, folder in preds.items()}
            gt = dataset.read_mask(name, image.shape[:2]) if has_gt else None
            path = figure_masks(image, masks, classes, fig_dir / f"{name}_verification.png", gt=gt, title=name)
            rows.append([(path, f"{name}: image | ground truth | " + " | ".join(masks))])

    # Fig. S3: the best images of the DeepLab masks
    best_path = None
    best_title = best_caption = ""
    if dataset is not None and has_gt and best > 0 and scores.get(final):
        picked = _best_images(scores[final], best)
        items = []
        for name, miou in picked:
            image = load_rgb(dataset.image_path(name))
            items.append((f"{name} · {100 * miou:.1f}", image, read_mask_png(preds[final] / f"{name}.png")))
        best_title = f"Best {len(items)} of {len(dl_names)} images by per-image mIoU of the {final} masks"
        best_path = figure_best_grid(items, classes, fig_dir / "verification_best.png", title=best_title)
        best_caption = "image | mask, per-image mIoU: " + ", ".join(f"{n} {100 * m:.1f}" for n, m in picked)

    outputs = [p for p in (seg_pseudo.masks, seg_pseudo.crf) if p.is_dir()]
    html_text = page.verification_section(split, run.root, segment=seg.root, evaluation=evaluation, eval_dir=eval_dir,
                                          whole=whole, samples_title=samples_title, samples=rows,
                                          best_title=best_title, best=best_path, best_caption=best_caption, outputs=outputs, notes=notes,
                                          per_image=per_image)  # fmt: skip
    return {"html": html_text, "evaluation": evaluation}


def _training_facts(rows: Sequence[Dict[str, Any]]) -> List[List[str]]:
    if not rows:
        return []
    vals = [(r.get("val_miou"), r["epoch"]) for r in rows if r.get("val_miou") is not None]
    best = max(vals) if vals else None
    secs = sum(float(r.get("seconds", 0) or 0) for r in rows)
    facts = [["epochs", str(rows[-1]["epoch"])], ["last loss", f"{rows[-1].get('loss', float('nan')):.4f}"],
            ["best val mIoU", f"{100 * best[0]:.2f} (epoch {best[1]})" if best else "–"],
            ["training time", f"{secs / 60:.1f} min"]]  # fmt: skip
    if rows[-1].get("val_tag_f1") is not None:  # the pooled scores as tag classifiers (last epoch)
        facts.append(["last val tag mean F1 / mAP", f"{100 * rows[-1]['val_tag_f1']:.1f} / "
                      + (f"{100 * rows[-1]['val_tag_map']:.1f}" if rows[-1].get("val_tag_map") is not None else "–")])  # fmt: skip
    return facts


def report(
    run: str | Path,
    *,
    overrides: Sequence[str] = (),
    splits: Optional[Sequence[str]] = None,
    samples: int = 4,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    compare: Optional[str] = None,
    segment: Optional[str | Path] = None,
    best: int = 9,
    predict: Optional[str | Path] = None,
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
        segment: a DeepLab run folder trained on this run's pseudo-masks (its masks in
            ``SEGRUN/pseudo/<split>/masks``, after CRF ``.../crf``): adds a verification
            section per split it has (``splits`` limits them too), scored with this run's
            dataset; its ViT-PCM row is the paper's DeepLabV2 row of that split.
        best: images in the Fig. S3 grid of the verification (highest per-image mIoU).
        predict: a ``vitpcm predict --out`` folder whose overlays get a gallery (default
            ``RUN/predict`` when it has overlays).

    Returns ``{"report": path, "evaluations": {split: what eval/<split>/metrics.json holds},
    "verification": {split: what eval/<split>/verification/metrics.json holds}}``
    (``verification`` is empty without ``segment``).
    """
    layout = RunLayout(run).require()
    cfg = load_config(layout.config, overrides)
    if layout.classes.is_file():
        classes = read_classes(layout.classes)
    else:
        classes = resolve_classes(Path(cfg.data.root or "."), cfg.data.classes)
    found = layout.pseudo_splits()
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise VitpcmError(f"no pseudo-masks for split(s) {missing} in {layout.pseudo_root}:"
                              f" run `vitpcm infer {layout.root} --split {missing[0]}` first")  # fmt: skip
        found = list(splits)
    seg = seg_splits = None
    if segment is not None:
        seg = RunLayout(segment)
        if not seg.root.is_dir():
            raise VitpcmError(
                f"--segment {seg.root}: folder not found (give the --out folder of `vitpcm segment train`)"
            )
        seg_splits = [s for s in seg.pseudo_splits() if not splits or s in splits]
        if not seg_splits:
            raise VitpcmError(f"--segment {seg.root}: no DeepLab masks{' of split ' + ', '.join(splits) if splits else ''}"
                              f" in {seg.pseudo_root}: run `vitpcm segment infer {seg.root} --split val --crf` first")  # fmt: skip
        if seg.classes.is_file() and read_classes(seg.classes) != classes:
            raise VitpcmError(f"--segment {seg.root}: its classes.txt differs from this run's class list")

    sections: List[str] = []
    evaluations: Dict[str, Any] = {}
    verification: Dict[str, Any] = {}
    datasets: Dict[str, Tuple[Any, Optional[str]]] = {}
    split_results: Dict[str, Dict[str, Any]] = {}
    for split in found:
        section = _split_section(layout, split, cfg, classes, samples, names, seed, compare, progress, datasets)
        sections.append(section["html"])
        split_results[split] = section
        if section["evaluation"] is not None:
            evaluations[split] = section["evaluation"]
    if not found:
        sections.append(page.no_pseudo_masks(layout.root))
    for split in seg_splits or ():
        section = _verification_section(layout, seg, split, cfg, classes, samples, names, seed, compare, best,
                                        progress, datasets, split_results.get(split))  # fmt: skip
        sections.append(section["html"])
        if section["evaluation"] is not None:
            verification[split] = section["evaluation"]

    if predict is not None and not (Path(predict) / "overlays").is_dir():
        raise VitpcmError(f"--predict {predict}: no overlays/ there; run `vitpcm predict {layout.root} ... --out"
                          f" {predict} --overlay` first")  # fmt: skip
    gallery = _predict_gallery(layout, Path(predict) if predict is not None else None)

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
                            written=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                            verification=seg_splits or (), extra_sections=[gallery] if gallery else ())  # fmt: skip
    write_text_atomic(layout.report, text)
    return {"report": str(layout.report), "evaluations": evaluations, "verification": verification}
