"""Proof that ``vitpcm import-keras`` reproduces the authors' Keras model, without their files.

For each architecture (ViT-PCM/S, /B; ``tiny`` is the committed test fixture) this

1. runs ``keras_vitpcm.py`` in a TensorFlow environment: the authors' network built in
   Keras with their layer names, random weights, ``save_weights`` to ``.h5``, and the
   Keras per-patch probabilities on fixed normalised inputs at 384 and a larger size;
2. converts the ``.h5`` into a run folder with the import stage
   (:func:`vitpcm.stages.import_keras.import_keras`, what ``vitpcm import-keras`` calls);
3. loads the run like any other (``vitpcm.load_run``), resamples position embeddings the TF way
   (:func:`vitpcm.models.tf_resize.use_tf_pos_embed_resize`, unless the run already does)
   and compares the per-patch probabilities: max abs difference <= 1e-4 passes. The same
   comparison with timm's PyTorch bicubic resize is reported beside it.

Writes ``benchmarks/results/keras_import.json``. Run from the repository root, in vitpcm's
environment, with a TensorFlow environment beside it::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install -r benchmarks/keras_reference/requirements.txt
    .venv/bin/python benchmarks/keras_reference/check.py --tf-python /tmp/tfvenv/bin/python
    # the committed CI fixture (tests/fixtures/keras_tiny.h5 + keras_tiny_expected.npz):
    .venv/bin/python benchmarks/keras_reference/check.py --tf-python /tmp/tfvenv/bin/python --archs tiny --fixture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TOLERANCE = 1e-4

#: vitpcm overrides that build each architecture of keras_vitpcm.ARCHS on the voc12 preset
OVERRIDES = {
    "tiny": [
        "model.backbone=vit_small_patch16_384", "model.backbone_kwargs.embed_dim=32",
        "model.backbone_kwargs.depth=2", "model.backbone_kwargs.num_heads=2",
        "model.backbone_kwargs.mlp_ratio=2", "model.lstm_hidden=8",
    ],
    "s": ["model.backbone=vit_small_patch16_384"],
    "b": [],  # the voc12 preset is ViT-B/16
}  # fmt: skip


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> ``[B, 3, H, W]`` float32 (x - 127.5) / 127.5, the authors' input."""
    x = (images.astype(np.float32) - 127.5) / 127.5
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def keras_side(tf_python: str, arch: str, h5: Path, npz: Path, sizes: List[int], batch: int, seed: int) -> float:
    start = time.time()
    cmd = [tf_python, str(HERE / "keras_vitpcm.py"), "--arch", arch, "--h5", str(h5), "--npz", str(npz),
           "--sizes", *map(str, sizes), "--batch", str(batch), "--seed", str(seed)]  # fmt: skip
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"Keras side failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return time.time() - start


def compare(run: Path, ref: Dict[str, np.ndarray], sizes: List[int]) -> Dict[str, Any]:
    """Per-patch probabilities of the imported run vs Keras, with the TF and the timm resize."""
    import vitpcm
    from vitpcm.models.tf_resize import use_tf_pos_embed_resize, uses_tf_pos_embed_resize

    model, _ = vitpcm.load_run(run)  # eval mode, as for a trained run
    wired = uses_tf_pos_embed_resize(model.backbone)  # the run's own option, once the lead wires it
    out: Dict[str, Any] = {"run_uses_tf_resize": wired}
    for size in sizes:
        x = normalise(ref[f"images_{size}"])
        want = ref[f"preds_{size}"]  # [B, h, w, C]
        row: Dict[str, Any] = {"grid": list(want.shape[1:3]), "batch": int(want.shape[0])}
        for resize in ("tf", "timm"):
            use_tf_pos_embed_resize(model.backbone, resize == "tf")
            start = time.time()
            with torch.no_grad():
                got = model(x)
            probs = got["probs"].permute(0, 2, 3, 1).numpy()
            row[resize] = {
                "max_abs_diff_probs": float(np.abs(probs - want).max()),
                "max_abs_diff_pooled": float(np.abs(got["pooled"].numpy() - ref[f"pooled_preds_{size}"]).max()),
                "argmax_flips": float((probs.argmax(-1) != want.argmax(-1)).mean()),
                "torch_seconds": round(time.time() - start, 2),
            }
        use_tf_pos_embed_resize(model.backbone, True)
        row["pass"] = row["tf"]["max_abs_diff_probs"] <= TOLERANCE
        out[str(size)] = row
    return out


def mismatch_message(h5: Path, tmp: Path) -> str:
    """What a /S file says when imported with the /B preset (must be one clear line)."""
    from vitpcm.errors import VitpcmError
    from vitpcm.stages.import_keras import import_keras

    try:
        import_keras(h5, "voc12", [], tmp / "wrong")
    except VitpcmError as exc:
        return str(exc)
    return "(no error)"


def main() -> None:
    p = argparse.ArgumentParser(description="Keras -> vitpcm import check")
    p.add_argument("--tf-python", default=os.environ.get("VITPCM_TF_PYTHON", "/tmp/tfvenv/bin/python"),
                   help="python of an environment with requirements.txt installed")  # fmt: skip
    p.add_argument("--archs", nargs="+", default=["s", "b"], choices=sorted(OVERRIDES))
    p.add_argument("--large", type=int, default=960, help="the larger side (the paper infers at 960)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixture", action="store_true", help="(with --archs tiny) write tests/fixtures/keras_tiny.*")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "keras_import.json"))
    args = p.parse_args()
    if args.fixture and args.archs != ["tiny"]:
        sys.exit("--fixture writes the tiny model only: use --archs tiny")
    if not Path(args.tf_python).exists():
        sys.exit(f"{args.tf_python} not found: create the TensorFlow environment (see this file's docstring)")

    from vitpcm.stages.import_keras import import_keras

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    versions = subprocess.run([args.tf_python, "-c", "import tensorflow as tf, tf_keras, h5py; print(tf.__version__, tf_keras.__version__, h5py.__version__)"],
                              capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout.split()  # fmt: skip
    import timm

    results: Dict[str, Any] = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "tolerance": TOLERANCE,
        "versions": {
            "tensorflow": versions[0] if versions else None,
            "tf_keras": versions[1] if len(versions) > 1 else None,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "archs": {},
    }
    ok = True
    with tempfile.TemporaryDirectory(prefix="keras_ref_") as tmpdir:
        tmp = Path(tmpdir)
        for arch in args.archs:
            sizes = [384, 480] if arch == "tiny" else [384, args.large]
            batch = 1 if args.fixture else args.batch
            h5, npz = tmp / f"{arch}.h5", tmp / f"{arch}_ref.npz"
            keras_seconds = keras_side(args.tf_python, arch, h5, npz, sizes, batch, args.seed)
            ref = dict(np.load(npz))
            start = time.time()
            summary = import_keras(h5, "voc12", OVERRIDES[arch], tmp / f"run_{arch}")
            row: Dict[str, Any] = {
                "overrides": OVERRIDES[arch],
                "h5_bytes": h5.stat().st_size,
                "keras_tensors": summary["tensors"],
                "parameters": summary["parameters"],
                "spec": summary["spec"],
                "keras_seconds_build_save_and_predict": round(keras_seconds, 1),
                "import_seconds": round(time.time() - start, 2),
            }
            row.update(compare(tmp / f"run_{arch}", ref, sizes))
            if arch == "s":
                row["s_weights_with_b_preset"] = mismatch_message(h5, tmp)
            results["archs"][arch] = row
            for size in sizes:
                r = row[str(size)]
                ok &= r["pass"]
                print(f"{arch} @{size}: max |p_vitpcm - p_keras| = {r['tf']['max_abs_diff_probs']:.2e} (TF resize)"
                      f" / {r['timm']['max_abs_diff_probs']:.2e} (timm resize, argmax flips {r['timm']['argmax_flips']:.2%})"
                      f" {'PASS' if r['pass'] else 'FAIL'}")  # fmt: skip
            if args.fixture:
                fixtures = ROOT / "tests" / "fixtures"
                fixtures.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(h5, fixtures / "keras_tiny.h5")
                keep = {k: v for k, v in ref.items() if k != "weight_names"}
                keep["overrides"] = np.array(OVERRIDES[arch])
                np.savez_compressed(fixtures / "keras_tiny_expected.npz", **keep)
                print(f"wrote {fixtures / 'keras_tiny.h5'} ({h5.stat().st_size} bytes) and keras_tiny_expected.npz")
    results["pass"] = bool(ok)
    if not args.fixture:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
