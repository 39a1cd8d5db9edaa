"""`vitpcm crf` and `vitpcm evaluate` run numpy and pydensecrf only: their stages, and the
evaluation / CRF packages, must not import torch, timm or matplotlib (checked in a fresh
interpreter, where nothing else has imported them yet)."""

import json
import subprocess
import sys

import numpy as np

from vitpcm.atomic import save_npz_atomic
from vitpcm.io import save_mask_png

HEAVY = ("torch", "timm", "matplotlib")


def _loaded_after(code: str) -> list:
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_light_stages_import_no_torch_timm_matplotlib():
    code = "import vitpcm.stages.evaluate, vitpcm.stages.crf, vitpcm.evaluation, vitpcm.postprocess.crf, vitpcm.postprocess.crf_runner, vitpcm.postprocess.probs_file, vitpcm.viz.figures"
    assert _loaded_after(code) == []


def test_evaluating_and_refining_folders_import_no_torch(tmp_path):
    """Not just the imports: a whole evaluation (tables only) and a CRF run stay light."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        save_mask_png(tmp_path / "gt" / f"im{i}.png", rng.integers(0, 2, (8, 10)).astype(np.uint8))
        save_mask_png(tmp_path / "pred" / f"im{i}.png", rng.integers(0, 2, (8, 10)).astype(np.uint8))
        probs = rng.dirichlet([1, 1], size=(8, 10)).transpose(2, 0, 1).astype(np.float32)
        save_npz_atomic(tmp_path / "probs" / f"im{i}.npz", probs=probs, classes=np.array([0, 1]))
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"im{i}.png")
    code = f"""
from pathlib import Path
from vitpcm.stages.evaluate import evaluate
from vitpcm.stages.crf import crf_folders
root = Path({str(tmp_path)!r})
evaluate([str(root / "pred")], root / "gt", ["bg", "a"], json_path=root / "e.json", progress=False)
crf_folders(root / "probs", root / "images", root / "crf", workers=1, progress=False)
assert len(list((root / "crf").glob("*.png"))) == 2
"""
    assert _loaded_after(code) == []


def test_refining_folders_without_overrides_reads_no_config_and_draws_no_bar(tmp_path):
    """`vitpcm crf -q` with no crf.* overrides starts as fast as it can: no omegaconf / yaml
    (the config is read only when there is one to read) and no tqdm (no bar is drawn)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        probs = rng.dirichlet([1, 1], size=(8, 10)).transpose(2, 0, 1).astype(np.float32)
        save_npz_atomic(tmp_path / "probs" / f"im{i}.npz", probs=probs, classes=np.array([0, 1]))
        Image.fromarray(rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"im{i}.png")
    code = f"""
from pathlib import Path
from vitpcm.stages.crf import crf_folders
root = Path({str(tmp_path)!r})
crf_folders(root / "probs", root / "images", root / "crf", workers=1, progress=False)
assert len(list((root / "crf").glob("*.png"))) == 2
"""
    probe = (
        code + "\nimport json, sys\nprint(json.dumps([m for m in ('omegaconf', 'yaml', 'tqdm') if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
