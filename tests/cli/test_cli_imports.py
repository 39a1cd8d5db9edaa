"""The CLI's light paths stay light: `--help` of every command, `vitpcm crf` and
`vitpcm evaluate` run without importing torch or timm (they run numpy and pydensecrf over
many images, often on CPU boxes, and torch alone takes seconds to import)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from vitpcm.atomic import save_npz_atomic
from vitpcm.io import save_mask_png

HEAVY = ("torch", "timm", "torchvision")

_PROBE = """
import json, sys
from vitpcm.cli import main
argv = json.loads(sys.argv[1])
try:
    code = main(argv)
except SystemExit as exc:  # argparse's --help exits 0
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in {heavy} if m in sys.modules)}))
"""


def _run_cli(argv, cwd: Path) -> dict:
    probe = _PROBE.replace("{heavy}", repr(HEAVY))
    out = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(argv)], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


COMMANDS = ["synth", "train", "check-data", "prepare", "infer", "predict", "crf", "evaluate", "report", "demo", "config", "import-keras",
            "segment", "segment train", "segment infer"]  # fmt: skip


def test_help_of_every_command_imports_no_torch(tmp_path):
    for argv in ([], ["--help"], *([*c.split(), "--help"] for c in COMMANDS)):
        result = _run_cli(argv, tmp_path)
        assert result["heavy"] == [], f"vitpcm {' '.join(argv)} imported {result['heavy']}"


def _folder(root: Path, n: int = 3, size=(24, 32)):
    rng = np.random.default_rng(0)
    images, probs, gt, pred = (root / d for d in ("images", "probs", "gt", "pred"))
    for d in (images, probs, gt, pred):
        d.mkdir(parents=True)
    h, w = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"im{i}.jpg")
        p = rng.random((2, h, w)).astype(np.float32)
        save_npz_atomic(probs / f"im{i}.npz", probs=p / p.sum(0), classes=np.array([0, 2]))
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 5:20] = 2
        save_mask_png(gt / f"im{i}.png", mask)
        save_mask_png(pred / f"im{i}.png", np.where(p[1] > p[0], 2, 0).astype(np.uint8))
    return images, probs, gt, pred


def test_crf_and_evaluate_run_without_torch(tmp_path):
    images, probs, gt, pred = _folder(tmp_path)
    crf = _run_cli(["crf", "--probs", str(probs), "--images", str(images), "--out", str(tmp_path / "crf"),
                    "--workers", "1", "-q", "crf.iterations=2"], tmp_path)  # fmt: skip
    assert crf == {"code": 0, "heavy": []}
    assert sorted(p.name for p in (tmp_path / "crf").glob("*.png")) == ["im0.png", "im1.png", "im2.png"]
    ev = _run_cli(["evaluate", "--pred", f"bpm={pred}", "--pred", f"crf={tmp_path / 'crf'}", "--gt", str(gt),
                   "--classes", "voc12", "--out", str(tmp_path / "eval"), "-q"], tmp_path)  # fmt: skip
    assert ev == {"code": 0, "heavy": []}
    assert (tmp_path / "eval" / "per_class.csv").is_file()
    assert (tmp_path / "eval" / "confusion_crf.png").is_file()


def test_import_vitpcm_is_lazy(tmp_path):
    code = "import sys, vitpcm; print(sorted(m for m in %r if m in sys.modules)); vitpcm.RunLayout" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
