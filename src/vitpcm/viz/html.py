"""The report page: one self-contained HTML file a user opens offline.

Every figure is inlined as a base64 PNG (with a relative link to its file beside the
report), there is no script and no external resource, and every link is relative to the
run folder, so the page works wherever the run is copied. This module only renders: the
stage :func:`vitpcm.stages.report.report` evaluates, draws and gathers what is shown.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from vitpcm.evaluation import Table, comparison_tables

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:0}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}
th:first-child,td:first-child{text-align:left}thead th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow-x:auto}.gallery figure{max-width:24%;margin-right:1%}.note{color:#666;font-size:13px}.meta{color:#555;font-size:13px}
figure{margin:8px 0;display:inline-block;vertical-align:top}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}.row figure{max-width:48%;margin-right:1%}
pre{background:#f6f6f6;padding:10px;font-size:12px;overflow-x:auto}nav a{margin-right:12px}
"""

Figure = Tuple[Optional[Path], str]  # a PNG (None: left out) and its caption


def rel(path: Path, base: Path) -> str:
    """``path`` relative to the report's folder ``base``, with forward slashes (``../``
    for a path beside it, e.g. a DeepLab run next to the ViT-PCM run)."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()


def inline_image(path: Optional[Path], base: Path, alt: str) -> str:
    """An inline PNG (base64 data URI) with a link to the file beside the report; "" if absent."""
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    href = html.escape(rel(path, base))
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f'<figcaption>{html.escape(alt)} · <a href="{href}">{href}</a></figcaption></figure>')  # fmt: skip


def inline_jpeg(data: bytes, href: str, caption: str) -> str:
    """An inline JPEG (base64 data URI, e.g. a thumbnail) with a relative link to the full file."""
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="data:image/jpeg;base64,{b64}" alt="{html.escape(caption)}">'
            f'<figcaption>{html.escape(caption)} · <a href="{html.escape(href)}">{html.escape(href)}</a></figcaption>'
            "</figure>")  # fmt: skip


def _pct(value: Any) -> str:
    return "–" if value is None or value != value else f"{100 * float(value):.1f}"


def tag_quality_html(split: str, record: Mapping[str, Any], path: Path, base: Path) -> str:
    """How well the pooled scores tell the tags of ``split`` (``RUN/eval/SPLIT/tags.json``,
    :func:`vitpcm.evaluation.tags.tag_quality`): the means, then per class."""
    head = [["images", str(record.get("images", "–"))],
            ["threshold (infer.present_threshold)", f"{record.get('threshold', float('nan')):g}"],
            ["mean F1 at the threshold (percent)", _pct(record.get("mean_f1"))],
            ["mAP (percent)", _pct(record.get("map"))],
            ["threshold with the best mean F1", f"{record.get('best_threshold', float('nan')):g}"],
            ["best mean F1 (percent)", _pct(record.get("best_mean_f1"))]]  # fmt: skip
    rows = [[name, _pct(c.get("precision")), _pct(c.get("recall")), _pct(c.get("f1")), _pct(c.get("ap")),
             str(c.get("support", 0))] for name, c in record.get("per_class", {}).items()]  # fmt: skip
    return "\n".join([
        "<h3>Tags from the pooled scores</h3>",
        "<p class=note>An image's class k is predicted present when its max-pooled score y_k reaches the threshold"
        " (what <code>vitpcm predict</code> does for untagged images; it takes the best threshold as its default)."
        " Measured against the split's known tags.</p>",
        html_table(["", "value"], head, cls="overall"),
        '<details><summary>Per class (percent)</summary><div class="scroll">'
        + html_table(["class", "precision", "recall", "F1", "AP", "images"], rows, cls="perclass")
        + "</div></details>",
        f"<p>File: {link(path, base)}</p>",
    ])  # fmt: skip


def per_image_html(split: str, rows: Sequence[Sequence[str]], header: Sequence[str], csv_path: Path, base: Path) -> str:
    """Every image's own mIoU per evaluated mask folder (worst first), folded away."""
    return (f"<details><summary>Per-image mIoU of split {html.escape(split)} ({len(rows)} images, worst first)"
            f'</summary><div class="scroll">{html_table(header, rows, cls="perclass")}</div></details>'
            f"<p>File: {link(csv_path, base)}</p>")  # fmt: skip


def confused_pairs_html(rows: Sequence[Sequence[str]], examples: Sequence[Figure], base: Path) -> str:
    """The most confused class pairs (ground truth -> prediction) and an example image of each."""
    parts = ["<h3>Most confused class pairs (BPM)</h3>",
             "<p class=note>Share of the ground-truth class's pixels predicted as the other class; the example is"
             " the image with the most such pixels.</p>",
             html_table(["ground truth", "predicted as", "share of its pixels (percent)", "example"], rows)]  # fmt: skip
    if examples:
        parts.append('<div class="sample">' + "".join(inline_image(p, base, alt) for p, alt in examples) + "</div>")
    return "\n".join(parts)


def gallery_section(folder: Path, base: Path, thumbs: Sequence[Tuple[bytes, Path, str]], total: int,
                    records: Optional[Path]) -> str:  # fmt: skip
    """``vitpcm predict`` outputs without ground truth: overlay thumbnails ``(jpeg bytes, file,
    caption)``, ``total`` overlays in all, a link to ``predictions.jsonl``."""
    parts = ['<h2 id="predict">Predictions on new images (<code>vitpcm predict</code>)</h2>',
             f'<p class="meta">{link(folder, base)}: {len(thumbs)} of {total} overlays shown'
             + (f", per-image classes and scores in {link(records, base)}" if records is not None else "") + "</p>",
             '<div class="gallery">' + "".join(inline_jpeg(data, rel(path, base), caption) for data, path, caption in thumbs)
             + "</div>"]  # fmt: skip
    return "\n".join(parts)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table of escaped cell texts."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def link(path: Path, base: Path, text: Optional[str] = None) -> str:
    """A relative link (folders end in ``/``)."""
    target = rel(path, base) + ("/" if path.is_dir() else "")
    return f'<a href="{html.escape(target)}">{html.escape(text or target)}</a>'


def evaluation_html(split: str, evaluation: Mapping[str, Any], eval_dir: Path, base: Path) -> str:
    """Metrics, per-class IoU, IoU bars, confusion matrices and file links of one split.

    ``evaluation``: what ``eval_dir/metrics.json`` holds (:func:`vitpcm.evaluation.write_evaluation`).
    """
    tables, note = comparison_tables(evaluation["results"], evaluation["classes"], evaluation["published"])
    files = evaluation["files"]
    parts: List[str] = ["<h3>Metrics (percent)</h3>", html_table(*tables[-1], cls="overall"),
                        "<h3>Per-class IoU (percent)</h3>",
                        '<div class="scroll">' + html_table(*tables[0], cls="perclass") + "</div>"]  # fmt: skip
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append(
        "<p class=note>– : class not in the ground truth of this split (not counted in the mIoU), or no published value.</p>"
    )
    bars = eval_dir / files["iou_bars"] if files.get("iou_bars") else None
    parts.append(inline_image(bars, base, f"{split}: per-class IoU"))
    parts.append('<div class="row">' + "".join(
        inline_image(eval_dir / f["png"], base, f"{split}: confusion matrix, {label}")
        for label, f in files["confusion"].items() if "png" in f) + "</div>")  # fmt: skip
    parts.append("<p>Files: " + ", ".join(link(eval_dir / f, base) for f in ("metrics.json", files["csv"], files["markdown"]))
                 + ", " + ", ".join(link(eval_dir / c["npy"], base) for c in files["confusion"].values()) + "</p>")  # fmt: skip
    return "\n".join(parts)


def split_section(
    split: str,
    base: Path,
    *,
    evaluation: str = "",
    samples_title: str = "",
    samples: Sequence[Sequence[Figure]] = (),
    outputs: Sequence[Path] = (),
    notes: Sequence[str] = (),
) -> str:
    """The section of one split: ``evaluation`` (:func:`evaluation_html`, "" without ground
    truth), sample figure rows (one row of figures per image), links to ``outputs``, notes."""
    parts: List[str] = [f'<h2 id="split-{html.escape(split)}">Split {html.escape(split)}</h2>']
    if evaluation:
        parts.append(evaluation)
    if samples:
        parts.append(f"<h3>{html.escape(samples_title)}</h3>")
        for row in samples:
            parts.append('<div class="sample">' + "".join(inline_image(p, base, alt) for p, alt in row) + "</div>")
    parts.append("<p>Outputs: " + ", ".join(link(p, base) for p in outputs) + "</p>")
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    return "\n".join(parts)


def verification_section(
    split: str,
    base: Path,
    *,
    segment: Path,
    evaluation: Optional[Mapping[str, Any]] = None,
    eval_dir: Optional[Path] = None,
    whole: Optional[Tuple[Sequence[Table], str]] = None,
    samples_title: str = "",
    samples: Sequence[Sequence[Figure]] = (),
    best_title: str = "",
    best: Optional[Path] = None,
    best_caption: str = "",
    outputs: Sequence[Path] = (),
    notes: Sequence[str] = (),
    per_image: str = "",
) -> str:
    """The verification section of one split: BPM vs CRF vs DeepLab (a run of ``segment``).

    ``evaluation``: what ``eval_dir/metrics.json`` holds (all labels, the published
    DeepLabV2 row); ``whole``: the paper's whole table with our DeepLab rows
    (:func:`vitpcm.evaluation.full_tables`); ``samples``: Fig. S2 rows (image | ground truth
    | BPM | CRF | DeepLab); ``best``: the Fig. S3 grid of the best images (``best_caption``
    under it: which images, their scores).
    """
    parts: List[str] = [
        f'<h2 id="verification-{html.escape(split)}">Verification: DeepLab, split {html.escape(split)}</h2>',
        f'<p class="meta">The paper\'s verification step: a segmentation network trained on the pseudo-masks'
        f" (DeepLab run {link(segment, base)}), scored beside the BPM and CRF masks it learnt from.</p>",
    ]
    if evaluation is not None and eval_dir is not None:
        tables, note = comparison_tables(evaluation["results"], evaluation["classes"], evaluation["published"])
        files = evaluation["files"]
        parts += ["<h3>Metrics (percent)</h3>", html_table(*tables[-1], cls="overall"),
                  "<h3>Per-class IoU: BPM, CRF, DeepLab (percent)</h3>",
                  '<div class="scroll">' + html_table(*tables[0], cls="perclass") + "</div>"]  # fmt: skip
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        bars = eval_dir / files["iou_bars"] if files.get("iou_bars") else None
        parts.append(inline_image(bars, base, f"{split}: per-class IoU, BPM / CRF / DeepLab"))
        parts.append("<p>Files: " + ", ".join(link(eval_dir / f, base) for f in ("metrics.json", files["csv"], files["markdown"]))
                     + ", " + ", ".join(link(eval_dir / c["png"], base) for c in files["confusion"].values() if "png" in c)
                     + "</p>")  # fmt: skip
    parts.append(per_image)  # per_image_html: each image's own mIoU, DeepLab first
    if whole is not None:
        tables, note = whole
        parts.append("<details><summary>The paper's whole table with our DeepLab rows</summary>"
                     f'<div class="scroll">{html_table(*tables[0], cls="perclass")}</div>'
                     f'<p class="note">{html.escape(note)}</p></details>')  # fmt: skip
    if samples:
        parts.append(f"<h3>{html.escape(samples_title)}</h3>")
        for row in samples:
            parts.append('<div class="sample">' + "".join(inline_image(p, base, alt) for p, alt in row) + "</div>")
    if best is not None:
        parts.append(f"<h3>{html.escape(best_title)}</h3>")
        parts.append(inline_image(best, base, best_caption or best_title))
    parts.append("<p>Outputs: " + ", ".join(link(p, base) for p in outputs) + "</p>")
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    return "\n".join(parts)


def no_pseudo_masks(run: Path) -> str:
    """The note shown when the run has no pseudo-masks yet."""
    return (f'<p class="note">No pseudo-masks yet: run <code>vitpcm infer {html.escape(str(run))} --split val</code>'
            " (add --crf for the CRF masks), then this command again.</p>")  # fmt: skip


def training_section(
    base: Path, metrics_file: Path, facts: Optional[Sequence[Sequence[str]]], curves: Optional[Path]
) -> str:
    """Training facts (``[label, value]`` rows; None: no metrics file) and the curves figure."""
    name = rel(metrics_file, base)
    parts = ['<h2 id="training">Training</h2>']
    if facts is None:
        parts.append(f'<p class="note">no {html.escape(name)} in this run.</p>')
    else:
        if facts:
            parts.append(html_table(["", "value"], facts, cls="overall"))
        parts.append(inline_image(curves, base, f"training curves ({name})"))
    return "".join(parts)


def render_page(
    base: Path,
    *,
    version: str,
    backbone: str,
    num_classes: int,
    splits: Sequence[str],
    sections: Sequence[str],
    training: str,
    files: Sequence[Path],
    config_text: str,
    written: str,
    verification: Sequence[str] = (),
    extra_sections: Sequence[Tuple[str, str, str]] = (),
) -> str:
    """The whole page. ``base``: the run folder (links are relative to it); ``files``:
    what the file list links (those that exist); ``written``: the date line's time;
    ``verification``: the splits with a verification section (after the split sections);
    ``extra_sections``: ``(anchor id, nav label, html)`` after those (e.g. predict's gallery)."""
    nav = " ".join(f'<a href="#split-{html.escape(s)}">{html.escape(s)}</a>' for s in splits)
    nav += "".join(f' <a href="#verification-{html.escape(s)}">DeepLab {html.escape(s)}</a>' for s in verification)
    nav += "".join(f' <a href="#{html.escape(a)}">{html.escape(label)}</a>' for a, label, _ in extra_sections)
    nav += ' <a href="#training">training</a> <a href="#files">files</a> <a href="#config">config</a>'
    file_links = "".join(f"<li>{link(p, base)}</li>" for p in files if p.exists())
    name = html.escape(base.resolve().name)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vitpcm report: {name}</title>
<style>{CSS}</style></head>
<body>
<h1>vitpcm report: {name}</h1>
<p class="meta">run {html.escape(str(base.resolve()))} · written {written} by vitpcm {version} ·
backbone {html.escape(str(backbone))} · {num_classes} classes</p>
<nav>{nav}</nav>
{"".join(sections)}
{"".join(text for _, _, text in extra_sections)}
{training}
<h2 id="files">Files</h2><ul>{file_links}</ul>
<h2 id="config">Config (resolved)</h2><pre>{html.escape(config_text)}</pre>
</body></html>
"""
