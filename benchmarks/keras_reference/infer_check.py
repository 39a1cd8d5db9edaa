"""Proof that ``vitpcm infer`` (the ``voc12`` preset) is the authors' ``main.py test``, end to end.

For each architecture (``tiny``: the CI fixture's; ``s``: ViT-PCM/S) this

1. builds a small VOC-layout folder from real photos of different sizes and aspect ratios
   (the sample images that matplotlib and scikit-image ship: JPEGs as they are, PNGs
   re-encoded as JPEG, a greyscale JPEG, an odd-sized crop, one image wider than 960), each
   with a plausible class-index mask (``SegmentationClass/NAME.png``, mode L: their
   ``SegmentationClassRaw``; a 255 band around objects, an image without background, a
   one-pixel sliver that the resize to 960 drops), ``ImageSets/Segmentation/val.txt``,
   ``classes.txt``;
2. runs ``keras_infer.py`` in a TensorFlow environment: the authors' own test path (their
   ``dataloader.py`` on a TFRecord of the folder, ``model.infer`` with the tag merge,
   ``preds2dict`` / ``dict2preds``, their ``resize``; ``--authors``, never copied here) with
   random weights saved as ``.h5``;
3. imports the ``.h5`` with the import stage (``vitpcm import-keras``, preset ``voc12``) and
   runs the inference stage itself (:func:`vitpcm.stages.infer.infer`, what ``vitpcm infer
   RUN --split val`` calls) with the preset's switches (``infer.scale=960``,
   ``input.align_corners=true``, tags from the mask resized to 960, background from the mask,
   ``model.pos_embed_resize=tf``);
4. compares, per image: the probabilities of ``probs/NAME.npz`` (the present classes at the
   original size) with the authors' ``resize(preds, (H, W))`` of those classes (max |dp|,
   target 1e-4), ``masks/NAME.png`` with their ``segs/`` mask (% equal pixels, target
   >= 99.99 %), and the same two numbers for the probabilities their ``--crf`` branch hands
   to the CRF (``dict2preds`` + ``resize``: scikit-image's resize of a numpy array, which
   is *not* the resize of the mask). Beside them, where a difference comes from: the decoded
   image, the 960 input, the tags, the merged patch grid on the authors' own input, and a
   candidate for the CRF input (:func:`vitpcm.models.predict.upsample_skimage`, the grid resized as scikit-image
   does).

Writes ``benchmarks/results/keras_infer.json`` (raw numbers per image and arch) and prints a
table. Run from the repository root in vitpcm's environment::

    /tmp/tfvenv/bin/pip install -r benchmarks/keras_reference/requirements.txt \\
        scikit-image scikit-learn matplotlib omegaconf pillow tqdm
    mkdir -p /tmp/authors && git clone https://github.com/deepplants/ViT-PCM /tmp/authors  # at 1fea66f
    .venv/bin/python benchmarks/keras_reference/infer_check.py --tf-python /tmp/tfvenv/bin/python \\
        --authors /tmp/authors --archs tiny s
    # the committed CI fixture (tests/fixtures/keras_infer_tiny.npz, on tests/fixtures/keras_tiny.h5):
    .venv/bin/python benchmarks/keras_reference/infer_check.py --tf-python /tmp/tfvenv/bin/python \\
        --authors /tmp/authors --archs tiny --fixture

``tests/stages/test_keras_infer.py`` imports :func:`write_folder`, :func:`run_vitpcm` and
:func:`compare_image` from this file (no TensorFlow needed there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROB_TOL = 1e-4
MASK_MIN_EQUAL = 0.9999

#: vitpcm overrides that build each architecture of keras_vitpcm.ARCHS on the voc12 preset (check.py's)
OVERRIDES = {
    "tiny": [
        "model.backbone=vit_small_patch16_384", "model.backbone_kwargs.embed_dim=32",
        "model.backbone_kwargs.depth=2", "model.backbone_kwargs.num_heads=2",
        "model.backbone_kwargs.mlp_ratio=2", "model.lstm_hidden=8",
    ],
    "s": ["model.backbone=vit_small_patch16_384"],
    "b": [],
}  # fmt: skip

# name: (source file, crop [y0, y1, x0, x1] or None, how: "bytes" = the file as it is, "rgb"/"grey" = re-encoded
# JPEG), mask recipe (foreground classes, background?, sliver class or None)
PHOTOS = {
    "grace_hopper": ("mpl:grace_hopper.jpg", None, "bytes", ([15], True, None)),  # 600 x 512, portrait
    "rocket": ("ski:rocket.jpg", None, "bytes", ([1, 7], True, None)),  # 427 x 640
    "hubble": ("ski:hubble_deep_field.jpg", None, "bytes", ([3], True, 7)),  # 872 x 1000: wider than 960
    "chelsea": ("ski:chelsea.png", None, "rgb", ([8], True, None)),  # 300 x 451
    "camera_grey": ("ski:camera.png", None, "grey", ([15], False, None)),  # 512 x 512 greyscale, no background
    "coffee_odd": ("ski:coffee.png", (37, 250, 101, 232), "rgb", ([5, 11], True, None)),  # 213 x 131
}
#: the CI fixture: three small crops (its probabilities must stay a few hundred KB)
FIXTURE_PHOTOS = {
    "chelsea_small": ("ski:chelsea.png", (40, 104, 150, 240), "rgb", ([8], True, None)),  # 64 x 90
    "camera_small": ("ski:camera.png", (60, 135, 200, 261), "grey", ([15], False, None)),  # 75 x 61
    "coffee_small": ("ski:coffee.png", (120, 190, 250, 351), "rgb", ([5, 11], True, None)),  # 70 x 101
}


# --- the photos and their masks ------------------------------------------------------------


def sample_dirs(tf_python: str) -> Dict[str, Path]:
    """Where matplotlib's and scikit-image's sample images are (in the TF environment, which has both)."""
    code = (
        "import os, matplotlib, skimage.data; print(os.path.join(matplotlib.get_data_path(), 'sample_data'));"
        " print(os.path.dirname(skimage.data.__file__))"
    )
    mpl, ski = subprocess.run([tf_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"mpl": Path(mpl), "ski": Path(ski)}


def sliver_column(width: int, size: int) -> int:
    """A column near the middle that the authors' nearest resize (align_corners) to ``size`` skips."""
    if width <= size:
        return width // 2
    kept = set(np.round(np.arange(size) * (width - 1) / (size - 1)).astype(int).tolist())
    return next(c for c in range(width // 2, width) if c not in kept)


def make_mask(h: int, w: int, classes: Sequence[int], background: bool, sliver: Optional[int], size: int) -> np.ndarray:
    """A plausible class-index mask: an ellipse of the first class, a rectangle of the second,
    a 3-pixel 255 band around the ellipse (VOC's border), optionally a one-pixel column of
    ``sliver``; no background pixel at all when ``background`` is false."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = ((yy - 0.55 * h) / (0.3 * h)) ** 2 + ((xx - 0.5 * w) / (0.28 * w)) ** 2
    mask = np.zeros((h, w), np.uint8) if background else np.full((h, w), classes[0], np.uint8)
    mask[r <= 1.0] = classes[0]
    band = (r > 1.0) & (np.sqrt(r) * min(0.3 * h, 0.28 * w) <= min(0.3 * h, 0.28 * w) + 3)
    if background:
        mask[band] = 255
    if len(classes) > 1:
        mask[int(0.05 * h) : int(0.3 * h), int(0.05 * w) : int(0.35 * w)] = classes[1]
    if sliver is not None:
        mask[int(0.1 * h) : int(0.9 * h), sliver_column(w, size)] = sliver
    return mask


def photo_files(photos: Dict[str, tuple], dirs: Dict[str, Path], size: int, jpeg: bool = True,
                lossless: bool = True) -> Dict[str, Dict[str, bytes]]:  # fmt: skip
    """``{name: {"jpg": bytes, "png": bytes}}``: the image file exactly as both sides read it, and
    its mask PNG. ``jpeg``: the JPEG itself (``NAME``); ``lossless``: its pixels (Pillow's decode)
    as PNG bytes behind the same ``.jpg`` name (``NAME_png``), which both sides decode to the
    same pixels (vitpcm reads the content; the authors' ``_decode_image`` takes ``decode_png``
    when ``is_jpeg`` is false), so that everything after the decoder is compared alone."""
    from PIL import Image

    files = {}
    for name, (source, crop, how, (classes, background, sliver)) in photos.items():
        where, filename = source.split(":")
        path = dirs[where] / filename
        if how == "bytes" and crop is None:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        else:
            with Image.open(path) as img:
                img = img.convert("L" if how == "grey" else "RGB")
                if crop is not None:
                    y0, y1, x0, x1 = crop
                    img = img.crop((x0, y0, x1, y1))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
                w, h = img.size
        buf = io.BytesIO()
        Image.fromarray(make_mask(h, w, classes, background, sliver, size), mode="L").save(buf, format="PNG")
        mask = buf.getvalue()
        if jpeg:
            files[name] = {"jpg": data, "png": mask}
        if lossless:
            with Image.open(io.BytesIO(data)) as img:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
            files[f"{name}_png"] = {"jpg": buf.getvalue(), "png": mask}
    return files


def write_folder(folder: Path, files: Dict[str, Dict[str, bytes]], split: str = "val") -> Path:
    """The VOC layout: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/SPLIT.txt, classes.txt."""
    from vitpcm.classes import VOC_CLASSES

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, f in files.items():
        (folder / "JPEGImages" / f"{name}.jpg").write_bytes(f["jpg"])
        (folder / "SegmentationClass" / f"{name}.png").write_bytes(f["png"])
    (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in files))
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in VOC_CLASSES))
    return folder


# --- the two sides -------------------------------------------------------------------------


def keras_side(tf_python: str, authors: str, arch: str, data: Path, out: Path, h5: Optional[Path],
               h5_in: Optional[Path], size: int, seed: int) -> Tuple[float, str]:  # fmt: skip
    start = time.time()
    cmd = [tf_python, str(HERE / "keras_infer.py"), "--authors", authors, "--arch", arch, "--data", str(data),
           "--out", str(out), "--size", str(size), "--seed", str(seed)]  # fmt: skip
    cmd += ["--h5-in", str(h5_in)] if h5_in else ["--h5", str(h5)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"Keras side failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.time() - start, done.stdout


def keras_results(npz: Path) -> Dict[str, Dict[str, np.ndarray]]:
    """``keras_infer.py``'s npz as ``{name: {key: array}}``."""
    raw = dict(np.load(npz))
    out = {}
    for i in range(int(raw["count"])):
        name = str(raw[f"name_{i}"])
        out[name] = {k[: -len(f"_{i}")]: v for k, v in raw.items() if k.endswith(f"_{i}") and not k.startswith("name_")}
    return out


def run_vitpcm(run: Path, data: Path, out: Path, extra: Sequence[str] = ()) -> Dict[str, Any]:
    """``vitpcm infer RUN --split val --out OUT data.root=DATA`` (the stage function the CLI calls)."""
    from vitpcm.stages.infer import infer

    overrides = [f"data.root={data}", "data.num_workers=0", *extra]
    return infer(run, "val", out=out, overrides=overrides, device="cpu", progress=False, overwrite=True)


# --- comparison ----------------------------------------------------------------------------


def pct_equal(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean() * 100.0)


def compare_image(ref: Dict[str, np.ndarray], npz: Dict[str, np.ndarray], mask: np.ndarray,
                  against: str = "crf_in") -> Dict[str, Any]:  # fmt: skip
    """vitpcm's ``probs/NAME.npz`` and ``masks/NAME.png`` against the authors' arrays of one image.

    ``against``: which of the authors' probabilities the npz should equal: ``crf_in`` (what
    their ``--crf`` branch hands to the CRF, ``dict2preds`` + scikit-image's resize; vitpcm's
    ``infer.probs_resize=skimage``, the voc12 preset) or ``probs`` (the probabilities their
    mask is the argmax of, TF's align_corners resize; ``infer.probs_resize=mask``)."""
    classes = npz["classes"].astype(np.int64)
    present = ref["present"].astype(np.int64)
    row: Dict[str, Any] = {
        "size": list(mask.shape),
        "classes_vitpcm": classes.tolist(),
        "classes_authors": present.tolist(),
        "probs_against": against,
    }
    row["same_classes"] = bool(np.array_equal(classes, present))
    probs = npz["probs"].astype(np.float32)
    if row["same_classes"] and probs.shape == ref[against].shape:
        row["probs_max_abs_diff"] = float(np.abs(probs - ref[against]).max())
        # what a CRF given each would label (argmax of its input)
        row["probs_argmax_equal_pct"] = pct_equal(classes[probs.argmax(0)], present[ref[against].argmax(0)])
    else:
        row["probs_max_abs_diff"] = float("inf")
    row["mask_equal_pct"] = pct_equal(mask, ref["seg"])
    row["pass"] = bool(row["probs_max_abs_diff"] <= PROB_TOL and row["mask_equal_pct"] >= MASK_MIN_EQUAL * 100)
    return row


def diagnose(run: Path, data: Path, ref: Dict[str, Dict[str, np.ndarray]], size: int) -> Dict[str, Dict[str, Any]]:
    """Where a difference starts: decode, 960 input, tags, merged grid (on the authors' input
    and on vitpcm's), and the skimage-like CRF input candidate."""
    import vitpcm
    from vitpcm.config import run_config
    from vitpcm.data.transforms import EvalTransform, TagRule
    from vitpcm.images import decode_image
    from vitpcm.io import read_mask_png
    from vitpcm.models.predict import upsample, upsample_skimage
    from vitpcm.models.vitpcm import merge_class_labels

    model, _ = vitpcm.load_run(run)
    cfg = run_config(run, [f"data.root={data}"])
    rule = TagRule.from_config(cfg)
    transform = EvalTransform(size, align_corners=bool(cfg.input.align_corners))
    out = {}
    for name, r in ref.items():
        image = decode_image(data / "JPEGImages" / f"{name}.jpg", str(cfg.data.jpeg_decoder))[0]  # as infer reads it
        mask = torch.from_numpy(read_mask_png(data / "SegmentationClass" / f"{name}.png").astype(np.int64))
        labels = torch.zeros(21)
        labels[[v for v in mask.unique().tolist() if v < 21]] = 1.0
        tags = rule(labels, mask, size)
        x = transform.prepare(torch.from_numpy(image).permute(2, 0, 1))
        x_ref = torch.from_numpy(r["input"]).permute(2, 0, 1)
        row: Dict[str, Any] = {
            "decode_max_abs_diff": int(np.abs(image.astype(int) - r["original"].astype(int)).max()),
            "decode_equal_pct": pct_equal(image, r["original"]),
            "input_max_abs_diff": float((x - x_ref).abs().max()),
            "same_tags": bool(np.array_equal(tags.numpy(), r["tags"].astype(np.float32))),
        }
        with torch.no_grad():
            for key, inp in (("grid_on_authors_input", x_ref), ("grid_on_vitpcm_input", x)):
                probs = merge_class_labels(model(inp[None])["probs"].float(), torch.from_numpy(r["tags"]).float()[None])
                row[f"{key}_max_abs_diff"] = float(np.abs(probs[0].permute(1, 2, 0).numpy() - r["grid"]).max())
        grid = torch.from_numpy(r["grid"]).permute(2, 0, 1)[torch.from_numpy(r["present"])]
        h, w = r["seg"].shape
        # the authors' own grid through the two resizes: vitpcm's upsample (align_corners) and the candidate
        row["authors_grid_upsampled_align_corners_vs_their_probs"] = float(
            np.abs(upsample(grid, (h, w), True).numpy() - r["probs"]).max())  # fmt: skip
        row["authors_grid_upsampled_skimage_like_vs_their_crf_in"] = float(
            np.abs(upsample_skimage(grid, (h, w)).numpy() - r["crf_in"]).max())  # fmt: skip
        row["their_probs_vs_their_crf_in"] = float(np.abs(r["probs"] - r["crf_in"]).max())
        row["their_crf_in_absent_channels_max"] = float(r["crf_absent_max"])
        out[name] = row
    return out


# --- main ----------------------------------------------------------------------------------


def check_arch(args, arch: str, photos: Dict[str, tuple], tmp: Path, h5_in: Optional[Path]) -> Dict[str, Any]:
    from PIL import Image

    from vitpcm.stages.import_keras import import_keras

    files = photo_files(photos, sample_dirs(args.tf_python), args.size, jpeg=not args.fixture)
    data = write_folder(tmp / f"voc_{arch}", files)
    h5, npz = tmp / f"{arch}.h5", tmp / f"keras_infer_{arch}.npz"
    keras_seconds, keras_log = keras_side(args.tf_python, args.authors, arch, data, npz, None if h5_in else h5, h5_in,
                                          args.size, args.seed)  # fmt: skip
    ref = keras_results(npz)
    run = tmp / f"run_{arch}"
    import_keras(h5_in or h5, "voc12", OVERRIDES[arch], run)
    start = time.time()
    summary = run_vitpcm(run, data, tmp / f"pseudo_{arch}")  # the voc12 preset: infer.probs_resize=skimage
    vitpcm_seconds = time.time() - start
    # the same with the stored probabilities resized as the mask is: against the authors' mask-path probabilities
    mask_path = Path(run_vitpcm(run, data, tmp / f"pseudo_{arch}_mask", ["infer.probs_resize=mask"])["out"])
    pseudo = Path(summary["out"])
    images = {}
    for name in files:
        npz_v = dict(np.load(pseudo / "probs" / f"{name}.npz"))
        mask = np.asarray(Image.open(pseudo / "masks" / f"{name}.png"))
        images[name] = compare_image(ref[name], npz_v, mask, "crf_in")
        npz_m = dict(np.load(mask_path / "probs" / f"{name}.npz"))
        mask_m = np.asarray(Image.open(mask_path / "masks" / f"{name}.png"))
        images[name]["probs_resize_mask"] = compare_image(ref[name], npz_m, mask_m, "probs")
    diag = diagnose(run, data, ref, args.size)
    for name in images:
        images[name]["diagnosis"] = diag[name]
    return {
        "overrides": OVERRIDES[arch],
        "weights": "tests/fixtures/keras_tiny.h5" if h5_in else "random (keras_vitpcm.randomise)",
        "keras_seconds": round(keras_seconds, 1),
        "vitpcm_infer_seconds": round(vitpcm_seconds, 1),
        "vitpcm_summary": {k: summary.get(k) for k in ("scale", "images", "merged_with_tags", "miou")},
        "images": images,
        # the photos as PNG (same pixels on both sides): everything after the decoder
        "pass": all(r["pass"] and r["probs_resize_mask"]["pass"] for n, r in images.items() if n.endswith("_png")),
        # the JPEGs as they are: the decoders differ (TensorFlow's INTEGER_FAST IDCT, Pillow's ISLOW)
        "pass_jpeg": all(
            r["pass"] and r["probs_resize_mask"]["pass"] for n, r in images.items() if not n.endswith("_png")
        ),
        "_ref": ref,
        "_files": files,
    }


def write_fixture(result: Dict[str, Any], path: Path) -> None:
    """The photos' bytes and the authors' probabilities / masks / tags, small enough for git."""
    keep: Dict[str, np.ndarray] = {
        "overrides": np.array(result["overrides"]),
        "names": np.array(list(result["_files"])),
    }
    for name, f in result["_files"].items():
        keep[f"jpg_{name}"] = np.frombuffer(f["jpg"], np.uint8)
        keep[f"png_{name}"] = np.frombuffer(f["png"], np.uint8)
        r = result["_ref"][name]
        for key in ("present", "probs", "crf_in", "seg", "tags"):
            keep[f"{key}_{name}"] = r[key]
    np.savez_compressed(path, **keep)


def main() -> None:
    p = argparse.ArgumentParser(description="vitpcm infer vs the authors' main.py test")
    p.add_argument("--tf-python", default=os.environ.get("VITPCM_TF_PYTHON", "/tmp/tfvenv/bin/python"))
    p.add_argument("--authors", default=os.environ.get("VITPCM_AUTHORS", "/tmp/authors"),
                   help="a checkout of deepplants/ViT-PCM (1fea66f)")  # fmt: skip
    p.add_argument("--archs", nargs="+", default=["tiny", "s"], choices=sorted(OVERRIDES))
    p.add_argument("--size", type=int, default=960, help="IMAGE.SIZE.TEST of their voc12.yaml; infer.scale of ours")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fixture", action="store_true", help="(with --archs tiny) write tests/fixtures/keras_infer_tiny.npz"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "keras_infer.json"))
    args = p.parse_args()
    if args.fixture and args.archs != ["tiny"]:
        sys.exit("--fixture writes the tiny model only: use --archs tiny")
    for need in (args.tf_python, Path(args.authors) / "main.py"):
        if not Path(need).exists():
            sys.exit(f"{need} not found (see this file's docstring)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    versions = subprocess.run([args.tf_python, "-c", "import tensorflow as tf, tf_keras, skimage; print(tf.__version__, tf_keras.__version__, skimage.__version__)"],
                              capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout.split()  # fmt: skip
    results: Dict[str, Any] = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "tolerance": {"probs_max_abs_diff": PROB_TOL, "mask_equal_pct_min": MASK_MIN_EQUAL * 100},
        "versions": dict(zip(("tensorflow", "tf_keras", "scikit_image"), versions), torch=torch.__version__),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "archs": {},
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="keras_infer_") as tmpdir:
        tmp = Path(tmpdir)
        for arch in args.archs:
            photos = FIXTURE_PHOTOS if args.fixture else PHOTOS
            h5_in = ROOT / "tests" / "fixtures" / "keras_tiny.h5" if args.fixture else None
            res = check_arch(args, arch, photos, tmp, h5_in)
            ok &= res["pass"]
            if args.fixture:
                path = ROOT / "tests" / "fixtures" / "keras_infer_tiny.npz"
                write_fixture(res, path)
                print(f"wrote {path} ({path.stat().st_size} bytes)")
            res.pop("_ref"), res.pop("_files")
            results["archs"][arch] = res
            print(f"\n{arch}: keras {res['keras_seconds']} s, vitpcm infer {res['vitpcm_infer_seconds']} s")
            # probs=mask: infer.probs_resize=mask against the authors' mask-path probabilities;
            # crf in: the preset (skimage) against what their --crf branch hands to the CRF
            print(f"{'image':<18}{'H x W':>11} {'tags':<12}{'probs=mask':>11}{'mask=%':>10}"
                  f"{'crf in':>10}{'crf argmax=%':>14}  {'grid(their in)':>14}{'input':>10}")  # fmt: skip
            for name, r in res["images"].items():
                d, m = r["diagnosis"], r["probs_resize_mask"]
                print(f"{name:<18}{r['size'][0]:>5} x {r['size'][1]:<4} {str(r['classes_authors']):<12}"
                      f"{m['probs_max_abs_diff']:>11.2e}{r['mask_equal_pct']:>10.4f}"
                      f"{r['probs_max_abs_diff']:>10.2e}{r.get('probs_argmax_equal_pct', float('nan')):>14.4f}"
                      f"  {d['grid_on_authors_input_max_abs_diff']:>14.2e}{d['input_max_abs_diff']:>10.2e}")  # fmt: skip
            print(
                f"{arch}: probabilities (both resizes), CRF input and masks {'PASS' if res['pass'] else 'FAIL'}"
                f" (lossless photos), {'PASS' if res['pass_jpeg'] else 'FAIL'} (JPEGs)"
            )
    results["pass"] = bool(ok)
    if not args.fixture:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
