"""``vitpcm report RUN``: one self-contained ``RUN/report.html`` a user opens offline.

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
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


from vitpcm.errors import VitpcmError
from vitpcm.io import format_names, names_in, read_classes, read_mask_png, write_text_atomic

log = logging.getLogger(__name__)


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _img(path: Optional[Path], run: Path, alt: str) -> str:
    """An inline PNG (base64 data URI) with a link to the file beside the report."""
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    rel = html.escape(_rel(path, run))
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f'<figcaption>{html.escape(alt)} · <a href="{rel}">{rel}</a></figcaption></figure>')  # fmt: skip


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _link(path: Path, run: Path, text: Optional[str] = None) -> str:
    rel = _rel(path, run) + ("/" if path.is_dir() else "")
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def _pick_samples(names: Sequence[str], k: int, chosen: Optional[Sequence[str]], seed: int) -> List[str]:
    if chosen:
        unknown = [n for n in chosen if n not in set(names)]
        if unknown:
            raise VitpcmError(f"--names: {format_names(unknown)} not among the masks of this split")
        return list(chosen)
    return sorted(random.Random(seed).sample(sorted(names), min(k, len(names))))


def _split_section(
    run: Path,
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
    from vitpcm.data.images import load_rgb
    from vitpcm.metrics import comparison_tables, evaluate_folders, published_row, write_evaluation
    from vitpcm.postprocess.crf import load_probs
    from vitpcm.viz import figure_heatmaps, figure_masks

    pseudo = run / "pseudo" / split
    masks_dir, probs_dir, crf_dir = pseudo / "masks", pseudo / "probs", pseudo / "crf"
    mask_names = names_in(masks_dir, ".png")
    parts: List[str] = [f'<h2 id="split-{html.escape(split)}">Split {html.escape(split)}</h2>']
    notes: List[str] = []
    preds = {"bpm": masks_dir}
    crf_names = set(names_in(crf_dir, ".png")) if crf_dir.is_dir() else set()
    if crf_names and set(mask_names) <= crf_names:
        preds["crf"] = crf_dir
    elif crf_names:
        notes.append(f"pseudo/{split}/crf holds {len(crf_names & set(mask_names))} of {len(mask_names)} masks"
                     " (an interrupted `vitpcm crf`? rerun it to finish): left out of the tables.")  # fmt: skip

    dataset = None
    try:
        dataset = build_dataset(cfg.data, split, require_masks=False)
    except VitpcmError as exc:
        notes.append(f"dataset not available ({exc}); pass data.root=PATH to include ground truth and images.")
    has_gt = dataset is not None and dataset.has_masks

    evaluation = None
    if has_gt:
        cms = evaluate_folders(preds, dataset.read_mask, classes, names=mask_names, progress=progress)
        published = published_row(classes, compare)
        evaluation = write_evaluation(cms, classes, run / "eval" / split, published=published)
        tables, note = comparison_tables(evaluation["results"], classes, published)
        parts.append("<h3>Metrics (percent)</h3>")
        parts.append(_table(*tables[-1], cls="overall"))
        parts.append("<h3>Per-class IoU (percent)</h3>")
        parts.append('<div class="scroll">' + _table(*tables[0], cls="perclass") + "</div>")
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append("<p class=note>– : class not in the ground truth of this split (not counted in the mIoU), or no published value.</p>")
        ev = run / "eval" / split
        parts.append(_img(ev / "iou_bars.png", run, f"{split}: per-class IoU"))
        parts.append('<div class="row">' + "".join(
            _img(ev / files["png"], run, f"{split}: confusion matrix, {label}")
            for label, files in evaluation["files"]["confusion"].items() if "png" in files) + "</div>")  # fmt: skip
        parts.append("<p>Files: " + ", ".join(_link(ev / f, run) for f in ("metrics.json", "per_class.csv", "per_class.md"))
                     + ", " + ", ".join(_link(ev / c["npy"], run) for c in evaluation["files"]["confusion"].values()) + "</p>")  # fmt: skip
    elif dataset is not None:
        notes.append(f"split {split} has no ground-truth masks: no metrics.")

    # sample figures (need the images)
    if dataset is not None and samples > 0 and mask_names:
        fig_dir = run / "figures" / split
        chosen = _pick_samples(mask_names, samples, names, seed)
        parts.append(f"<h3>Samples ({len(chosen)} of {len(mask_names)}; "
                     f"{'chosen' if names else f'random, seed {seed}'})</h3>")  # fmt: skip
        for name in chosen:
            image = load_rgb(dataset.image_path(name))
            masks = {label: read_mask_png(folder / f"{name}.png") for label, folder in preds.items()}
            gt = dataset.read_mask(name, image.shape[:2]) if has_gt else None
            row = [_img(figure_masks(image, masks, classes, fig_dir / f"{name}_masks.png", gt=gt, title=name), run,
                        f"{name}: image | ground truth | " + " | ".join(masks))]  # fmt: skip
            if (probs_dir / f"{name}.npz").is_file():
                probs, cls = load_probs(probs_dir / f"{name}.npz")
                row.append(_img(figure_heatmaps(image, probs, cls, classes, fig_dir / f"{name}_heatmaps.png", title=name),
                                run, f"{name}: heat map per present class"))  # fmt: skip
            parts.append('<div class="sample">' + "".join(row) + "</div>")

    links = [_link(p, run) for p in (masks_dir, probs_dir, crf_dir) if p.is_dir()]
    if (pseudo / "summary.json").is_file():
        links.append(_link(pseudo / "summary.json", run))
    parts.append("<p>Outputs: " + ", ".join(links) + "</p>")
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    return {"html": "\n".join(parts), "evaluation": evaluation}


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow-x:auto}.note{color:#666;font-size:13px}.meta{color:#555;font-size:13px}
figure{margin:8px 0;display:inline-block;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}.row figure{max-width:48%;margin-right:1%}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow-x:auto}nav a{margin-right:12px}
"""


def write_report(
    run: str | Path,
    splits: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    samples: int = 4,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    compare: Optional[str] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Write ``RUN/report.html`` (and ``RUN/figures/``, ``RUN/eval/<split>/``).

    Args:
        run: a training run folder (holds ``config.yaml``).
        splits: the ``pseudo/<split>`` folders to include; default all of them.
        overrides: ``key=value`` config overrides (e.g. ``data.root=...`` when the data moved).
        samples: random sample figures per split (``names`` picks them instead).
        seed: for the random sample.
        compare: published row id for the tables (default: Table S1 / S2 for VOC / COCO; ``none``).

    Returns ``{"report": path, "evaluations": {split: what eval/<split>/metrics.json holds}}``.
    """
    from vitpcm import __version__
    from vitpcm.config import load_config
    from vitpcm.viz import plot_training_curves, read_metrics_jsonl

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise VitpcmError(f"{run} is not a run folder (no config.yaml): give the --out folder of `vitpcm train`")
    cfg = load_config(run / "config.yaml", overrides)
    classes = read_classes(run / "classes.txt") if (run / "classes.txt").is_file() else None
    if classes is None:
        from vitpcm.data.voc import resolve_classes

        classes = resolve_classes(Path(cfg.data.root or "."), cfg.data.classes)
    found = sorted(p.parent.name for p in (run / "pseudo").glob("*/masks") if p.is_dir())
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise VitpcmError(f"no pseudo-masks for split(s) {missing} in {run / 'pseudo'}: run `vitpcm infer {run} --split {missing[0]}` first")
        found = list(splits)

    body: List[str] = []
    evaluations: Dict[str, Any] = {}
    for split in found:
        section = _split_section(run, split, cfg, classes, samples, names, seed, compare, progress)
        body.append(section["html"])
        if section["evaluation"] is not None:
            evaluations[split] = section["evaluation"]
    if not found:
        body.append(f'<p class="note">No pseudo-masks yet: run <code>vitpcm infer {html.escape(str(run))} --split val</code>'
                    " (add --crf for the CRF masks), then this command again.</p>")  # fmt: skip

    # training
    train_html: List[str] = ['<h2 id="training">Training</h2>']
    metrics_path = run / "logs" / "metrics.jsonl"
    if metrics_path.is_file():
        rows = read_metrics_jsonl(metrics_path)
        curves = plot_training_curves(metrics_path, run / "figures" / "training_curves.png")
        if rows:
            vals = [(r.get("val_miou"), r["epoch"]) for r in rows if r.get("val_miou") is not None]
            best = max(vals) if vals else None
            secs = sum(float(r.get("seconds", 0) or 0) for r in rows)
            facts = [["epochs", str(rows[-1]["epoch"])], ["last loss", f"{rows[-1].get('loss', float('nan')):.4f}"],
                     ["best val mIoU", f"{100 * best[0]:.2f} (epoch {best[1]})" if best else "–"],
                     ["training time", f"{secs / 60:.1f} min"]]  # fmt: skip
            train_html.append(_table(["", "value"], facts, cls="overall"))
        train_html.append(_img(curves, run, "training curves (logs/metrics.jsonl)"))
    else:
        train_html.append('<p class="note">no logs/metrics.jsonl in this run.</p>')

    files = [run / "config.yaml", run / "classes.txt", metrics_path, run / "checkpoints" / "best.pt",
             run / "checkpoints" / "last.pt", run / "logs", run / "figures", run / "eval", run / "pseudo"]  # fmt: skip
    file_links = "".join(f"<li>{_link(p, run)}</li>" for p in files if p.exists())
    config_text = (run / "config.yaml").read_text(encoding="utf-8")
    if overrides:
        config_text += "# report overrides: " + " ".join(overrides) + "\n"

    nav = " ".join(f'<a href="#split-{html.escape(s)}">{html.escape(s)}</a>' for s in found)
    nav += ' <a href="#training">training</a> <a href="#files">files</a> <a href="#config">config</a>'
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitpcm report: {html.escape(run.resolve().name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>vitpcm report: {html.escape(run.resolve().name)}</h1>
<p class="meta">run {html.escape(str(run.resolve()))} · written {now} by vitpcm {__version__} ·
backbone {html.escape(str(cfg.model.backbone))} · {len(classes)} classes</p>
<nav>{nav}</nav>
{''.join(body)}
{''.join(train_html)}
<h2 id="files">Files</h2><ul>{file_links}</ul>
<h2 id="config">Config (resolved)</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
    out = run / "report.html"
    write_text_atomic(out, page)
    return {"report": str(out), "evaluations": evaluations}
