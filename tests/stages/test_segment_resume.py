"""Exact resume of the DeepLab stage (issue 12): `vitpcm segment train` killed with SIGKILL
mid-epoch and resumed ends with the weights and metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import TINY_SEGMENT

from vitpcm.config import load_config
from vitpcm.engine.checkpoint import read_checkpoint
from vitpcm.runs import RunLayout
from vitpcm.stages.segment import segment_train

REPO = Path(__file__).resolve().parents[2]
EXACT = ["train.deterministic=true", "train.checkpoint_every=1", "train.device=cpu", "train.threads=1"]


@pytest.fixture()
def pseudo(tmp_path, synth_root) -> Path:
    out = tmp_path / "pseudo"
    shutil.copytree(synth_root / "SegmentationClass", out)
    for p in out.glob("val_*.png"):
        p.unlink()
    return out


def _rows(run: Path) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in RunLayout(run).read_metrics()]


def test_segment_train_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, synth_root, pseudo):
    # 12 images, batches of 4: 3 steps per epoch; 6 iterations = 2 epochs; last.pt after every step
    overrides = [f"data.root={synth_root}", "data.num_workers=0", *TINY_SEGMENT, "segment.iterations=6",
                 "segment.val_every=1", *EXACT]  # fmt: skip
    segment_train(load_config("synthetic_segment", overrides), tmp_path / "full", pseudo, progress=False)

    run = tmp_path / "cut"
    last = RunLayout(run).checkpoint("last")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vitpcm.cli", "segment", "train", "synthetic_segment", *overrides,
           "--pseudo", str(pseudo), "--out", str(run), "-q"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.time() + 180
    while proc.poll() is None and not last.exists() and time.time() < end:
        time.sleep(0.002)
    proc.kill()  # right after the first checkpoint: in the middle of epoch 1
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-2000:]}"
    position = read_checkpoint(last)["position"]
    assert position["epoch"] == 0 and 1 <= position["batch"] < 3  # mid-epoch

    segment_train(load_config(run / "config.yaml"), run, resume=True, progress=False)
    a, b = read_checkpoint(RunLayout(tmp_path / "full").checkpoint("last")), read_checkpoint(last)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _rows(run) == _rows(tmp_path / "full") and len(_rows(run)) == 2
    resumes = [json.loads(line) for line in RunLayout(run).resumes.read_text().splitlines()]
    assert resumes[0]["changed"] == {}
