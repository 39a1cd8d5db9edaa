"""`vitpcm infer --crf` with crf.backend=torch: each batch refined right after the forward
(vitpcm.stages.crf_pass), the same files as the CRF stage, resumable, never a lost mask.
Run on the CPU: the code is the CUDA path's (crf.backend=auto picks it on a GPU)."""

from __future__ import annotations

import numpy as np
import torch
from tests.postprocess.test_crf import _scene

import vitpcm.stages.crf_pass as crf_pass_mod
from vitpcm.config import load_config
from vitpcm.io import read_mask_png
from vitpcm.postprocess.crf import CRFParams, crf_labels
from vitpcm.stages.crf import crf_folders
from vitpcm.stages.crf_pass import DeviceCRF
from vitpcm.stages.infer import infer
from vitpcm.utils.stamps import read_stamp


def test_the_pass_writes_the_crf_stages_masks(run, tmp_path, synth_root):
    out = tmp_path / "o"
    first = infer(run, "val", out=out, crf=True, overrides=["crf.backend=torch"], progress=False)
    assert first["crf_pass"] == {"on_device": 6, "left_to_the_stage": 0, "on_cpu_after_oom": 0}
    assert (first["crf"]["computed"], first["crf"]["skipped"]) == (0, 6)  # the stage found them finished
    # the same masks and stamps as the CRF stage computes from the npz files
    files = crf_folders(out / "probs", synth_root / "JPEGImages", tmp_path / "stage",
                        params=CRFParams(backend="torch"), workers=1, progress=False)  # fmt: skip
    assert files["computed"] == 6 and files["backend"] == "torch"
    for png in sorted((out / "crf").glob("*.png")):
        np.testing.assert_array_equal(read_mask_png(png), read_mask_png(tmp_path / "stage" / png.name))
        assert read_stamp(png)["key"] == read_stamp(tmp_path / "stage" / png.name)["key"]
    again = infer(run, "val", out=out, crf=True, overrides=["crf.backend=torch"], progress=False)
    assert (again["computed"], again["crf"]["computed"], again["crf"]["skipped"]) == (0, 0, 6)
    assert again["crf_miou"] == first["crf_miou"]
    # pydensecrf's masks carry another key: switching the backend recomputes them
    other = infer(run, "val", out=out, crf=True, overrides=["crf.backend=pydensecrf", "crf.workers=1"],
                  progress=False)  # fmt: skip
    assert "crf_pass" not in other and other["crf"]["computed"] == 6


def test_images_stored_smaller_are_left_to_the_stage(run, tmp_path):
    s = infer(run, "val", out=tmp_path / "o", crf=True, overrides=["crf.backend=torch", "infer.max_side=64"],
              progress=False)  # fmt: skip
    assert s["crf_pass"]["left_to_the_stage"] + s["crf_pass"]["on_device"] == 6
    assert s["crf_pass"]["left_to_the_stage"] > 0
    assert s["crf"]["computed"] == s["crf_pass"]["left_to_the_stage"]
    assert len(list((tmp_path / "o" / "crf").glob("*.png"))) == 6


def test_out_of_memory_halves_the_batch_then_goes_to_the_cpu(tmp_path, monkeypatch):
    """A device whose memory nothing fits: the batch is halved down to single images, each
    refined on the CPU; the masks are those of the plain CPU CRF."""
    real = crf_pass_mod.dense_crf_batch
    calls = []

    def tight(images, probs, params, device):
        calls.append((len(images), torch.device(device).type))
        if torch.device(device).type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(images, probs, params, device=device)

    monkeypatch.setattr(crf_pass_mod, "dense_crf_batch", tight)
    scenes = {f"im{i}": _scene(i, h=20 + i, w=24) for i in range(3)}
    for name, (image, _, _, _) in scenes.items():
        from PIL import Image

        Image.fromarray(image).save(tmp_path / f"{name}.png")
    crf = DeviceCRF(load_config("synthetic", ["crf.backend=torch"]).crf, torch.device("meta"), tmp_path / "crf",
                    lambda n: tmp_path / f"{n}.png")  # fmt: skip
    items = [(n, torch.from_numpy(p), c, p.shape[1:]) for n, (_, p, c, _) in scenes.items()]
    masks = crf.masks(items)
    assert crf.summary() == {"on_device": 3, "left_to_the_stage": 0, "on_cpu_after_oom": 3}
    assert calls[0] == (3, "meta") and [c for c in calls if c[1] == "cpu"] == [(1, "cpu")] * 3
    for name, (image, probs, classes, _) in scenes.items():
        np.testing.assert_array_equal(masks[name], crf_labels(image, probs, classes, CRFParams(backend="torch")))
