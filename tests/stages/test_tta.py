"""Test-time augmentation (``vitpcm infer --tta``) and ``vitpcm infer --crf``."""

import json

import numpy as np
import pytest
import torch

from vitpcm.cli import main
from vitpcm.engine.checkpoint import find_run_checkpoint
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.models.predict import predict_tta
from vitpcm.stages.infer import run_inference, tta_sizes
from vitpcm.stages.load import load_model


def test_tta_sizes_snap_to_the_patch_grid():
    assert tta_sizes(960, [0.75, 1.0, 1.25], 16) == [720, 960, 1200]
    assert tta_sizes(128, [0.75, 1.0, 1.25], 8) == [96, 128, 160]
    assert tta_sizes(32, [0.1, 1.0, 1.01], 8) == [8, 32]  # at least one patch; duplicates merged


def test_flip_average_is_mirror_symmetric(tiny_run):
    model, _ = load_model(find_run_checkpoint(tiny_run, "best"))
    model.eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    probs, pooled = predict_tta(
        model, [x, torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear")], flip=True
    )
    assert probs.shape == (2, 6, 4, 4)  # the finest grid (32 / 8)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 4, 4))
    torch.testing.assert_close(pooled, probs.amax(dim=(2, 3)))
    mirrored, _ = predict_tta(
        model, [x.flip(-1), torch.nn.functional.interpolate(x.flip(-1), size=(24, 24), mode="bilinear")], flip=True
    )
    torch.testing.assert_close(mirrored.flip(-1), probs, atol=1e-5, rtol=1e-4)


def test_tta_with_one_scale_and_no_flip_is_plain_inference(tiny_run, tmp_path):
    plain = run_inference(tiny_run, "val", out=tmp_path / "a", progress=False)
    same = run_inference(tiny_run, "val", out=tmp_path / "b", tta=True,
                         overrides=["infer.tta_scales=[1.0]", "infer.tta_flip=false"], progress=False)  # fmt: skip
    assert same["tta"] == {"sizes": [32], "flip": False} and plain["tta"] is None
    assert same["miou"] == pytest.approx(plain["miou"], abs=1e-4)
    for path in (tmp_path / "a/probs").glob("*.npz"):
        a, b = np.load(path), np.load(tmp_path / "b/probs" / path.name)
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-6)


def test_cli_infer_tta_and_crf(tiny_run, tmp_path, capsys):
    out = tmp_path / "p"
    assert (
        main(["infer", str(tiny_run), "--out", str(out), "--tta", "--crf", "crf.workers=2", "crf.iterations=3", "-q"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "CRF masks to" in printed and printed.count("mIoU") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] == {"sizes": [24, 32, 40], "flip": True}
    assert 0 <= summary["crf_miou"] <= 1 and summary["crf"]["workers"] == 2
    for mask in (out / "masks").glob("*.png"):
        crf = read_mask_png(out / "crf" / mask.name)
        assert crf.shape == read_mask_png(mask).shape
        classes = np.load(out / "probs" / f"{mask.stem}.npz")["classes"]
        assert set(np.unique(crf).tolist()) <= set(classes.tolist())  # the CRF picks among present classes
    with pytest.raises(VitpcmError, match="--crf needs the probabilities"):
        run_inference(tiny_run, "val", out=tmp_path / "q", save_probs=False, crf=True, progress=False)
    with pytest.raises(VitpcmError, match="infer.tta_scales must be"):
        run_inference(tiny_run, "val", out=tmp_path / "q", overrides=["infer.tta_scales=[]"], progress=False)
