"""``vitpcm`` command line: a thin layer over the Python API.

Every sub-command parses its arguments, calls one API function and prints what it returned.
Each command's parser (``_add_<command>``) stands next to its handler (``_cmd_<command>``);
:func:`build_parser` lists them in the order ``vitpcm --help`` shows. User errors
(:class:`vitpcm.errors.VitpcmError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from vitpcm.errors import VitpcmError

log = logging.getLogger("vitpcm")

OVERRIDES_HELP = "config overrides as dotted key=value, e.g. train.epochs=3 data.root=/data/VOC2012"


# ---------------------------------------------------------------------------- shared helpers
def _split_config(config: Optional[str], overrides: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``CONFIG key=value...`` with the config left out (``train --resume --out RUN key=value``,
    ``segment train --demo-run DIR key=value``): a first token with ``=`` that is not a file
    on disk is an override, not a preset."""
    if config is not None and "=" in config and not Path(config).exists():
        return None, [config, *overrides]
    return config, list(overrides)


def _default_run_folder(config: str) -> str:
    """``runs/<config>-<time>``: where a training writes when ``--out`` is not given."""
    return str(Path("runs") / f"{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _speaks() -> bool:
    """Whether this process prints the result: under torchrun, rank 0 speaks for all ranks."""
    return os.environ.get("RANK", "0") == "0"


def _add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """A sub-command with ``help_text`` as its help and description, and ``-q/--quiet``."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "synth", "write the built-in synthetic dataset (VOC layout)")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--train", type=int, default=300, help="train images (default 300)")
    p.add_argument("--val", type=int, default=100, help="val images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="fixes every image (default 0)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from vitpcm.stages.data import synth

    r = synth(args.out, n_train=args.train, n_val=args.val, seed=args.seed, workers=args.workers,
              overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    print(f"wrote {r['train']} train + {r['val']} val images to {r['root']} (VOC layout, classes in {r['classes']})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "train", "train ViT-PCM from a config preset or YAML file")
    p.add_argument("config", nargs="?", help="preset name (synthetic, voc12, coco14) or YAML path (not with --resume)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoints/last.pt with its own config.yaml; key=value may"
                        " change only keys that leave the model and the data alone (docs/reliability.md)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true",
                   help="leave broken data items out (listed in RUN/skipped.txt) instead of refusing to start")  # fmt: skip
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from vitpcm.stages.train import train

    config, overrides = _split_config(args.config, args.overrides)
    if args.resume and not args.out:
        raise VitpcmError("--resume needs --out RUN: the run folder to continue")
    if config is None and not args.resume:
        raise VitpcmError("give a config: a preset name (synthetic, voc12, coco14) or a YAML file")
    out = args.out or _default_run_folder(config)
    # the config is loaded once, by the stage (config None: the run's own config)
    result = train(config, out, resume=args.resume, overrides=overrides, progress=not args.quiet,
                   skip_bad=args.skip_bad)  # fmt: skip
    if not _speaks():
        return 0
    best = result["best_miou"]
    print(f"run: {result['run']}" + (f"  best val mIoU: {100 * best:.2f}" if best is not None else ""))
    return 0


def _add_check_data(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "check-data", "read every item of a config's dataset once; report counts, sizes and every problem"
    )
    p.add_argument("config", help="preset name (synthetic, voc12, coco14) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--split", action="append",
                   help="check this split too (repeatable; always: data.train_split and data.val_split)")  # fmt: skip
    p.add_argument("--workers", type=int, default=0, help="reader threads (default: one per CPU)")
    p.add_argument("--json", help="also write the full report as JSON here")
    p.set_defaults(func=_cmd_check_data)


def _cmd_check_data(args: argparse.Namespace) -> int:
    from vitpcm.config import load_config
    from vitpcm.stages.data import check_data

    r = check_data(load_config(args.config, args.overrides), splits=args.split, workers=args.workers,
                   json_path=args.json, progress=not args.quiet)  # fmt: skip
    print(r["text"])
    if args.json:
        print(f"wrote {args.json}")
    return 0 if r["ok"] else 1


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "prepare", "convert a dataset once so training reads it fast (coco: rasterise the masks to PNG)"
    )
    p.add_argument("format", choices=["coco"], help="dataset format (coco)")
    p.add_argument("--root", required=True, help="COCO folder that holds annotations/ and train2014/, val2014/")
    p.add_argument("--out", help="mask folder (default ROOT/masks; then set data.masks=OUT if elsewhere)")
    p.add_argument("--split", action="append", help="split to prepare (repeatable; default train and val)")
    p.add_argument("--classes", help="class list (default: the annotation file's categories, = coco14)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    p.add_argument("--gt", choices=["vitpcm", "authors"], default="vitpcm",
                   help="ground truth: vitpcm (crowd = ignore, small over large) or authors (as data.coco_gt;"
                        " the coco14 preset uses authors)")  # fmt: skip
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from vitpcm.stages.data import prepare

    result = prepare(args.format, args.root, out=args.out, splits=args.split or ("train", "val"), classes=args.classes,
                     workers=args.workers, progress=not args.quiet, gt=args.gt)  # fmt: skip
    for split, r in result.items():
        dropped = f", {r['dropped']} single-valued left out" if "dropped" in r else ""
        print(f"{split}: {r['written']} masks written, {r['kept']} already there, {r['failed']} failed,"
              f" {r['problems']} items with problems not prepared{dropped}")  # fmt: skip
    return 0 if all(r["failed"] == 0 for r in result.values()) else 1


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "infer", "write pseudo-masks and class probabilities for one split of a trained run")
    p.add_argument("run", help="run folder of `vitpcm train` (or a checkpoint .pt)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + " (e.g. data.root=...)")
    p.add_argument("--split", default="val", help="split name (default val)")
    p.add_argument("--out", help="output folder (default RUN/pseudo/SPLIT)")
    p.add_argument("--scale", type=int, help="input side, a multiple of the patch size (default infer.scale)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-probs", action="store_true", help="write masks only, no probs/*.npz")
    p.add_argument(
        "--crf", action="store_true", help="then refine the masks with the dense CRF into OUT/crf/ (crf.* keys)"
    )
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over infer.tta_scales and horizontal flips (infer.tta_flip)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true",
                   help="leave broken items out (listed in OUT/skipped.txt) instead of stopping")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every image (default: a rerun keeps the finished ones)")  # fmt: skip
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from vitpcm.stages.infer import infer

    s = infer(args.run, args.split, out=args.out, scale=args.scale, overrides=args.overrides, device=args.device,
              save_probs=not args.no_probs, progress=not args.quiet, tta=True if args.tta else None, crf=args.crf,
              skip_bad=args.skip_bad, overwrite=args.overwrite)  # fmt: skip
    if not _speaks():
        return 0
    out = Path(s["out"])
    resumed = f" ({s['resumed']} already done)" if s.get("resumed") else ""
    score = f"  mIoU {100 * s['miou']:.2f}" if "miou" in s else ""
    print(f"wrote {s['images']} masks to {out / 'masks'}{resumed}{score}")
    if s.get("skipped"):
        print(f"skipped {s['skipped']} broken item(s): listed in {out / 'skipped.txt'}")
    if args.crf:
        _print_crf(s)
    return 0


def _print_crf(s: dict) -> None:
    """The CRF line of ``infer --crf`` and ``segment infer --crf``."""
    line = f"wrote {s['images']} CRF masks to {s['crf']['out']} ({s['crf']['seconds']:.1f}s)"
    print(line + (f"  mIoU {100 * s['crf_miou']:.2f}" if "crf_miou" in s else ""))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "predict", "masks for new images (files, folders, globs) with a trained run; no tags needed")
    p.add_argument("run", help="run folder of `vitpcm train` (or a checkpoint .pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (searched recursively) or globs such as 'photos/*.jpg' (quote them);"
                        " key=value config overrides may follow, e.g. infer.batch_size=8")  # fmt: skip
    p.add_argument("--out", help="output folder (default RUN/predict)")
    p.add_argument("--tags", help='classes of every image, e.g. "cat,person" (default: predicted per image)')
    p.add_argument("--tags-file", help="CSV or JSON tag file (NAME.jpg,cat;person) for some images; the others:"
                                       " predicted")  # fmt: skip
    p.add_argument("--threshold", type=float,
                   help="pooled-score threshold in (0, 1) for predicted tags (default: the best mean F1 on the"
                        " run's val split, recorded by `vitpcm infer`; else infer.present_threshold)")  # fmt: skip
    p.add_argument("--crf", action="store_true", help="also the dense CRF into OUT/crf/ (crf.* keys)")
    p.add_argument("--overlay", action="store_true",
                   help="also OUT/overlays/NAME.jpg: the image blended with the class colours, and a legend")  # fmt: skip
    p.add_argument("--scale", type=int, help="input side, a multiple of the patch size (default infer.scale)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (as `vitpcm infer --tta`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable images out (listed in OUT/skipped.txt) instead of stopping")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="recompute every image (default: a rerun keeps the finished ones)")  # fmt: skip
    p.set_defaults(func=_cmd_predict, overrides=[])


def _split_inputs(tokens: Sequence[str]) -> tuple:
    """``vitpcm predict RUN INPUT... key=value...``: a token with ``=`` that is not a path on
    disk is a config override; the rest are inputs."""
    inputs, overrides = [], []
    for t in tokens:
        key = t.split("=", 1)[0]
        if "=" in t and not Path(t).exists() and key.replace(".", "").replace("_", "").isalnum():
            overrides.append(t)
        else:
            inputs.append(t)
    return inputs, overrides


def _cmd_predict(args: argparse.Namespace) -> int:
    from vitpcm.stages.predict import predict_images

    inputs, overrides = _split_inputs(args.inputs)
    s = predict_images(args.run, inputs, out=args.out, tags=args.tags, tags_file=args.tags_file,
                       threshold=args.threshold, crf=args.crf, overlay=args.overlay, scale=args.scale,
                       tta=True if args.tta else None, device=args.device, overrides=[*overrides, *args.overrides],
                       skip_bad=args.skip_bad, overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    if not _speaks():
        return 0
    out = Path(s["out"])
    resumed = f" ({s['resumed']} already done)" if s.get("resumed") else ""
    speed = f", {s['images_per_second']:.2f} images/s" if s.get("images_per_second") else ""
    print(f"wrote {s['images']} masks to {out / 'masks'}{resumed}{speed}; threshold {s['threshold']:g}"
          f" ({s['threshold_from']})")  # fmt: skip
    if s.get("skipped"):
        print(f"skipped {s['skipped']} unreadable image(s): listed in {out / 'skipped.txt'}")
    if "crf" in s:
        print(f"wrote CRF masks to {s['crf']['out']}")
    if "overlays" in s:
        print(f"wrote overlays to {s['overlays']}")
    print(f"per-image classes, scores and pixel shares: {out / 'predictions.jsonl'}")
    return 0


def _add_crf(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "crf", "refine pseudo-masks with the dense CRF (the paper's parameters; crf.* overrides)")
    p.add_argument("overrides", nargs="*", metavar="crf.key=value",
                   help="CRF parameters, e.g. crf.iterations=5 crf.bilateral_srgb=5 (see `vitpcm config synthetic`)")  # fmt: skip
    p.add_argument("--probs", required=True, help="the probs/ folder of `vitpcm infer` (NAME.npz)")
    p.add_argument("--images", required=True, help="folder of the original images (NAME.jpg / .png)")
    p.add_argument("--out", required=True, help="output folder for the refined masks (NAME.png)")
    p.add_argument("--workers", type=int, help="processes (default crf.workers: 0 = one per CPU)")
    p.add_argument("--backend", choices=("auto", "pydensecrf", "torch"),
                   help="the CRF's implementation (default crf.backend: auto = torch on a CUDA --device, else pydensecrf)")  # fmt: skip
    p.add_argument("--device", help="where the torch backend computes: cpu (default), cuda, cuda:1")
    p.add_argument("--split-file", help="refine only the names in this list (default: every NAME.npz)")
    p.add_argument("--overwrite", action="store_true", help="recompute masks that are already done")
    p.set_defaults(func=_cmd_crf)


def _cmd_crf(args: argparse.Namespace) -> int:
    from vitpcm.stages.refine import refine_folders

    overrides = list(args.overrides) + ([f"crf.backend={args.backend}"] if args.backend else [])
    s = refine_folders(args.probs, args.images, args.out, overrides=overrides, workers=args.workers,
                       split_file=args.split_file, overwrite=args.overwrite, progress=not args.quiet,
                       device=args.device)  # fmt: skip
    if not _speaks():
        return 0
    print(f"wrote {s['computed']} CRF masks to {s['out']} ({s['skipped']} already done;"
          f" {s['seconds']:.1f}s with {s['workers']} worker(s), {s['backend']})")  # fmt: skip
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "evaluate", "per-class IoU, mIoU, accuracies and confusion of one or more folders of masks")
    p.add_argument("--pred", required=True, action="append", metavar="[LABEL=]DIR",
                   help="folder of predicted PNG masks (NAME.png); repeat to compare folders in one table,"
                        " e.g. --pred bpm=RUN/pseudo/val/masks --pred crf=RUN/pseudo/val/crf")  # fmt: skip
    p.add_argument("--gt", required=True, help="folder of ground-truth PNG masks (255 = ignore)")
    p.add_argument("--classes", required=True, help="class list file (background first), or voc12 / coco14")
    p.add_argument("--split-file", help="evaluate only the names in this list (default: every prediction)")
    p.add_argument("--out", help="write metrics.json, per_class.csv/.md, confusion_*.npy/.png, iou_bars.png here")
    p.add_argument("--json", help="also write the result as JSON here")
    p.add_argument("--compare", metavar="ID",
                   help="published row beside ours (default: ViT-PCM's Table S1 / S2 row for voc12 / coco14 classes;"
                        " none = no row; all = the paper's whole table, in its order, with ours added)")  # fmt: skip
    p.add_argument("--split-name", choices=("val", "test"),
                   help="split of the paper's table to compare with (default val; test: VOC only)")  # fmt: skip
    p.add_argument("--layout", choices=("auto", "wide", "long"), default="auto",
                   help="wide: a row per method (Table S1); long: a row per class (auto: wide up to 25 classes)")  # fmt: skip
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vitpcm.stages.evaluate import evaluate

    r = evaluate(args.pred, args.gt, args.classes, split_file=args.split_file, out=args.out, json_path=args.json,
                 compare=args.compare, split_name=args.split_name, layout=args.layout, progress=not args.quiet)  # fmt: skip
    print(r["table"])
    if args.out:
        print(f"wrote {args.out}/ (metrics.json, per_class.csv, per_class.md, confusion_*.npy/.png, iou_bars.png)")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "report", "write RUN/report.html: metrics, per-class tables, curves, figures, links (offline)"
    )
    p.add_argument("run", help="run folder of `vitpcm train`")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=PATH when the dataset moved")
    p.add_argument("--split", action="append", help="pseudo/SPLIT to include (repeatable; default all)")
    p.add_argument("--samples", type=int, default=4, help="random sample figures per split (default 4)")
    p.add_argument("--names", nargs="+", help="these images for the sample figures instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    p.add_argument("--compare", metavar="ID", help="published row beside ours (see vitpcm evaluate)")
    p.add_argument("--segment", metavar="SEGRUN",
                   help="a DeepLab run trained on these pseudo-masks (`vitpcm segment train`): adds the verification"
                        " section (BPM vs CRF vs DeepLab per class, Fig. S2 rows, Fig. S3 best images)")  # fmt: skip
    p.add_argument("--predict", metavar="DIR",
                   help="a `vitpcm predict --overlay` output folder: a gallery of its overlays (default RUN/predict)")  # fmt: skip
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from vitpcm.stages.report import report

    result = report(args.run, splits=args.split, overrides=args.overrides, samples=args.samples, names=args.names,
                    seed=args.seed, compare=args.compare, segment=args.segment, predict=args.predict,
                    progress=not args.quiet)  # fmt: skip
    for split, ev in result["evaluations"].items():
        scores = "  ".join(f"{label} mIoU {100 * s['miou']:.2f}" for label, s in ev["results"].items())
        print(f"{split}: {scores}")
    for split, ev in result.get("verification", {}).items():
        scores = "  ".join(f"{label} mIoU {100 * s['miou']:.2f}" for label, s in ev["results"].items())
        print(f"{split} verification: {scores}")
    print(f"wrote {result['report']}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "demo", "the whole pipeline on the built-in synthetic set, on a CPU, in minutes")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--out", default="vitpcm-demo", help="output folder (default ./vitpcm-demo; replaced on rerun)")
    p.add_argument("--train", type=int, default=300, help="synthetic train images (default 300)")
    p.add_argument("--val", type=int, default=100, help="synthetic val images (default 100)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from vitpcm.stages.demo import demo

    s = demo(args.out, n_train=args.train, n_val=args.val, seed=args.seed, overrides=args.overrides,
             progress=not args.quiet)  # fmt: skip
    print(s["table"])
    print(f"mIoU on the synthetic val set: BPM {100 * s['bpm_miou']:.2f}, BPM + CRF {100 * s['crf_miou']:.2f},"
          f" DeepLab + CRF {100 * s['segment_miou']:.2f}  ({s['total_seconds']:.0f}s in all)")  # fmt: skip
    print(f"report: {s['paths']['report']}")
    print(f"summary: {s['paths']['summary']}")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "segment", "verification: train a DeepLab on pseudo-masks (train), then its masks per split (infer)"
    )
    seg = p.add_subparsers(dest="segment_command", metavar="{train,infer}", required=True)
    _add_segment_train(seg)
    _add_segment_infer(seg)


def _add_segment_train(seg: argparse._SubParsersAction) -> None:
    q = seg.add_parser("train", help="train DeepLabV2 (or V3+) on a folder of PNG pseudo-masks",
                       description="train DeepLabV2 (or V3+) on a folder of PNG pseudo-masks (kazuto1011's recipe)")  # fmt: skip
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.add_argument("config", nargs="?", help="preset (voc12_segment, coco14_segment, synthetic_segment) or YAML path")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. segment.iterations=1000 data.root=/data/VOC2012")  # fmt: skip
    q.add_argument("--pseudo", metavar="DIR",
                   help="PNG masks of data.train_split named after the images, e.g. RUN/pseudo/trainaug/crf")  # fmt: skip
    q.add_argument("--out", help="run folder (default runs/<config>-<time>; with --demo-run DIR/segment)")
    q.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    q.add_argument("--demo-run", metavar="DIR",
                   help="reuse a `vitpcm demo` folder: its data and the CRF masks of its train split (preset synthetic_segment)")  # fmt: skip
    q.set_defaults(func=_cmd_segment_train)


def _cmd_segment_train(args: argparse.Namespace) -> int:
    from vitpcm.stages.segment import segment_train, segment_train_demo

    config, overrides = _split_config(args.config, args.overrides)
    if args.demo_run:
        r = segment_train_demo(args.demo_run, args.out, overrides=overrides, config=config, resume=args.resume,
                               progress=not args.quiet)  # fmt: skip
    else:
        from vitpcm.config import load_config

        if config is None:
            raise VitpcmError(
                "give a CONFIG (voc12_segment, coco14_segment, synthetic_segment or a YAML file) or --demo-run DIR"
            )
        cfg = load_config(config, overrides)
        r = segment_train(cfg, args.out or _default_run_folder(config), args.pseudo, resume=args.resume,
                          progress=not args.quiet)  # fmt: skip
    if not _speaks():
        return 0
    best = r["best_miou"]
    print(f"pseudo-masks: {r['images']} images from {r['pseudo']} ({r['missing']} images of the split without a mask,"
          f" left out); {r['epochs']} epochs = {r['iterations']} steps")  # fmt: skip
    print(f"run: {r['run']}" + (f"  best val mIoU: {100 * best:.2f}" if best is not None else ""))
    return 0


def _add_segment_infer(seg: argparse._SubParsersAction) -> None:
    q = seg.add_parser("infer", help="DeepLab's masks for one split: multi-scale, flip, dense CRF",
                       description="DeepLab's masks for one split (RUN/pseudo/SPLIT/{masks,probs,crf}), then"
                                   " `vitpcm evaluate` as for any folder")  # fmt: skip
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.add_argument("run", help="run folder of `vitpcm segment train` (or a checkpoint .pt)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=PATH, crf.iterations=5")
    q.add_argument("--split", default="val", help="split name (default val)")
    q.add_argument("--scales", metavar="S1,S2,...",
                   help="input scales whose softmax is averaged, e.g. 0.5,0.75,1.0,1.25,1.5 (default segment.test_scales)")  # fmt: skip
    q.add_argument("--flip", action="store_true", help="also average horizontal mirrors (default segment.test_flip)")
    q.add_argument("--crf", action="store_true", help="then the dense CRF into OUT/crf/ (crf.* keys)")
    q.add_argument("--out", help="output folder (default RUN/pseudo/SPLIT)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    q.add_argument("--overwrite", action="store_true", help="recompute masks that are already done")
    q.set_defaults(func=_cmd_segment_infer)


def _parse_scales(text: Optional[str]) -> Optional[list]:
    if not text:
        return None
    try:
        scales = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise VitpcmError(f"--scales {text}: give comma-separated factors, e.g. 0.5,0.75,1.0,1.25,1.5") from None
    if not scales or min(scales) <= 0:
        raise VitpcmError(f"--scales {text}: give positive factors, e.g. 0.5,0.75,1.0,1.25,1.5")
    return scales


def _cmd_segment_infer(args: argparse.Namespace) -> int:
    from vitpcm.stages.segment import segment_infer

    s = segment_infer(args.run, args.split, scales=_parse_scales(args.scales), flip=True if args.flip else None,
                      crf=args.crf, out=args.out, overrides=args.overrides, device=args.device,
                      progress=not args.quiet, overwrite=args.overwrite)  # fmt: skip
    if not _speaks():
        return 0
    out = Path(s["out"])
    how = f"scales {s['scales']}{' + flips' if s['flip'] else ''}"
    resumed = f"; {s['resumed']} already done" if s.get("resumed") else ""
    miou = f"  mIoU {100 * s['miou']:.2f}" if "miou" in s else ""
    print(f"wrote {s['images']} DeepLab masks to {out / 'masks'} ({how}{resumed}){miou}")
    if args.crf:
        _print_crf(s)
    return 0


def _add_import_keras(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "import-keras", "convert the authors' released Keras .h5 weights into a run folder (then infer, report)"
    )
    p.add_argument("weights", metavar="WEIGHTS.h5", help="the authors' ViT-PCM/S or /B weights (ModelCheckpoint .h5)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.backbone=vit_small_patch16_384 for the /S file")  # fmt: skip
    p.add_argument(
        "--config", default="voc12", help="preset or YAML of the dataset the weights were trained on (default voc12)"
    )
    p.add_argument("--out", required=True, help="run folder to write (config.yaml, classes.txt, checkpoints/)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints of an existing run folder")
    p.set_defaults(func=_cmd_import_keras)


def _cmd_import_keras(args: argparse.Namespace) -> int:
    from vitpcm.stages.import_keras import import_keras

    s = import_keras(args.weights, args.config, args.overrides, args.out, overwrite=args.overwrite)
    print(f"wrote {s['run']} ({s['backbone']}, {s['classes']} classes, {s['tensors']} Keras tensors,"
          f" {s['parameters']:,} parameters) in {s['seconds']:.0f} s")  # fmt: skip
    if s.get("published"):
        pub = s["published"]
        print(
            f"the authors' BPM mIoU for this file (their README): train {pub.get('train') or '-'} / val {pub.get('val') or '-'}"
        )
    print(f"next: vitpcm infer {s['run']} --split val data.root=...; vitpcm report {s['run']}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _add_command(
        sub, "bench", "measure inference, a training step, the CRF and start-up beside their floors (docs/scaling.md)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP + " (e.g. train.compile=true)")
    p.add_argument("--preset", default="voc12", help="config preset or YAML whose model and sizes are measured")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N) (default cpu)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny shapes in seconds (checks the bench, not the speed)")
    p.add_argument("--section", action="append", choices=("infer", "train", "crf", "cli"),
                   help="only this part (repeatable; default all)")  # fmt: skip
    p.add_argument("--images", type=int, help="images per inference run (default 3 on a CPU, 20 on a GPU)")
    p.add_argument("--repeats", type=int, help="inference runs of each side (default 3 on a CPU, 5 on a GPU)")
    p.add_argument("--steps", type=int, help="measured training steps (default 4 on a CPU, 20 on a GPU)")
    p.add_argument("--batch", type=int, help="training batch (default 4 on a CPU, the preset's on a GPU)")
    p.add_argument("--crf-images", type=int, help="VOC-sized images of the CRF comparison (default 50)")
    p.add_argument("--crf-repeats", type=int, default=1, help="runs of each CRF command, interleaved (default 1)")
    p.add_argument("--authors-jobs", type=int,
                   help="processes of the authors' joblib CRF baseline (default one per CPU, as their main.py)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default torch's; 1 on a machine shared with other jobs)"
    )
    p.add_argument("--note", help="free text stored with the results, e.g. 'machine shared with other jobs'")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vitpcm.stages.bench import bench, format_bench

    r = bench(args.preset, device=args.device, quick=args.quick, overrides=args.overrides, json_path=args.json,
              sections=args.section or ("infer", "train", "crf", "cli"), infer_images=args.images,
              repeats=args.repeats, train_steps=args.steps, batch_size=args.batch, crf_images=args.crf_images,
              crf_repeats=args.crf_repeats, authors_jobs=args.authors_jobs, threads=args.threads, note=args.note,
              progress=not args.quiet)  # fmt: skip
    print(format_bench(r))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = _add_command(sub, "config", "print a resolved config (preset + overrides) as YAML")
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from vitpcm.config import to_yaml
    from vitpcm.stages.config import resolved_config

    print(to_yaml(resolved_config(args.config, args.overrides)), end="")
    return 0


# ---------------------------------------------------------------------------- the parser and main
#: every sub-command, in the order ``vitpcm --help`` lists them
_COMMANDS = (_add_synth, _add_train, _add_check_data, _add_prepare, _add_infer, _add_predict, _add_crf,
             _add_evaluate, _add_report, _add_demo, _add_segment, _add_import_keras, _add_bench, _add_config)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpcm",
        description="ViT-PCM weakly supervised semantic segmentation: image tags in, pixel masks out.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def _version() -> str:
    from vitpcm import __version__

    return __version__


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere (also after options such as --out), which a
    # nargs='*' positional alone does not allow: collect the stragglers here.
    args, extras = parser.parse_known_args(argv)
    if extras:
        stray = [e for e in extras if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides) + extras
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except VitpcmError as exc:  # TrainingStopped: label "stopped", exit 128 + signal
        print(f"vitpcm {args.command}: {getattr(exc, 'label', 'error')}: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print(f"vitpcm {args.command}: interrupted (finished files are complete; rerun to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
