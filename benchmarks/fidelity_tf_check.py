"""Check two fidelity switches against TensorFlow itself (docs/reproduce.md, rows 2 and 4).

1. ``augment.jitter_space=authors``: the authors' colour ops (TF ``adjust_brightness``,
   ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``) on float
   0-255 images with fixed factors, against vitpcm's ``color_jitter_authors`` steps on x / 255.
2. ``model.lstm_dropout``: which input mask Keras 2's ``LSTM(dropout=p)`` draws in the
   authors' configuration (its shape, whether it is constant over time, one per direction).

Two processes, as TensorFlow and vitpcm live in different environments::

    pip install -r benchmarks/keras_reference/requirements.txt     # tensorflow-cpu, tf-keras (own venv)
    /path/to/tf-venv/bin/python benchmarks/fidelity_tf_check.py --tf /tmp/tf_ref.npz
    python benchmarks/fidelity_tf_check.py --compare /tmp/tf_ref.npz  # vitpcm's venv

The second prints the largest difference per op and writes ``benchmarks/results/fidelity_tf_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

FACTORS = {"brightness": 0.15, "contrast": 1.7, "saturation": 1.3, "hue": 0.07}
ROOT = Path(__file__).resolve().parent.parent


def _images() -> np.ndarray:
    """[4, 16, 16, 3] float 0-255 (HWC), with contrast pushing some values out of range."""
    rs = np.random.RandomState(0)
    return (rs.rand(4, 16, 16, 3) * 255).astype(np.float32)


def run_tf(out: Path) -> None:
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras as keras

    x = tf.constant(_images())
    f = FACTORS
    steps = {}
    y = tf.image.adjust_brightness(x, f["brightness"])
    steps["brightness"] = y
    y = tf.image.adjust_contrast(y, f["contrast"])
    steps["contrast"] = y
    y = tf.image.adjust_saturation(y, f["saturation"])
    steps["saturation"] = y
    y = tf.image.adjust_hue(y, f["hue"])
    steps["hue"] = y
    steps["grayscale"] = tf.tile(tf.image.rgb_to_grayscale(y), (1, 1, 1, 3))
    arrays = {k: v.numpy() for k, v in steps.items()}

    seq = tf.constant(np.random.RandomState(1).randn(3, 6, 8).astype(np.float32))
    lstm = keras.layers.LSTM(4, dropout=0.5, return_sequences=True)
    lstm(seq, training=True)
    lstm.reset_dropout_mask()
    mask = lstm.get_dropout_mask_for_cell(seq, True, count=4)[0].numpy()
    bi = keras.layers.Bidirectional(keras.layers.LSTM(4, dropout=0.5, return_sequences=True))
    bi(seq, training=True)
    facts = {
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "lstm_cudnn_capable_path": bool(lstm._could_use_gpu_kernel),
        "lstm_mask_shape": list(mask.shape),
        "lstm_input_shape": list(seq.shape),
        "lstm_mask_constant_over_time": bool(all((mask[:, t] == mask[:, 0]).all() for t in range(mask.shape[1]))),
        "bidirectional_two_lstm_layers": bi.forward_layer is not bi.backward_layer,
    }
    np.savez(out, **arrays, facts=json.dumps(facts))
    print(json.dumps(facts, indent=1))


def compare(ref: Path) -> None:
    import torch

    from vitpcm.data.jitter import jitter_authors_with

    data = np.load(ref)
    facts = json.loads(str(data["facts"]))
    f = FACTORS
    x = torch.from_numpy(_images()).permute(0, 3, 1, 2) / 255.0  # [B, 3, H, W] in x / 255 units
    rows = {}
    order = ["brightness", "contrast", "saturation", "hue", "grayscale"]
    for b in range(x.shape[0]):
        for n, k in enumerate(order):  # vitpcm's function up to each step, as TF's chain
            kw = {key: f[key] for key in order[: n + 1] if key in f}
            ours = jitter_authors_with(x[b], **kw, grey=k == "grayscale")
            theirs = torch.from_numpy(data[k][b]).permute(2, 0, 1) / 255.0
            rows[k] = max(rows.get(k, 0.0), float((ours - theirs).abs().max()))
    out_of_range = float((torch.from_numpy(data["contrast"]) / 255.0).min())
    result = {
        "max_abs_diff_on_0_1_scale": rows,
        "min_value_after_contrast_on_0_1_scale": out_of_range,
        "factors": FACTORS,
        **facts,
    }
    for k, d in rows.items():
        print(f"{k:>11}: max |vitpcm - TF| = {d:.2e} (on the 0-1 scale)")
    print(json.dumps(facts, indent=1))
    path = ROOT / "benchmarks" / "results" / "fidelity_tf_check.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--tf", type=Path, help="run TensorFlow and write its outputs here (TF venv)")
    g.add_argument("--compare", type=Path, help="compare vitpcm with this file (vitpcm venv)")
    args = ap.parse_args()
    if args.tf:
        run_tf(args.tf)
    else:
        compare(args.compare)


if __name__ == "__main__":
    main()
