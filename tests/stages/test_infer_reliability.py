"""`vitpcm infer` under faults (issue 12): resume after a kill, bad items found up front,
--skip-bad, no empty folders, full disk / read-only folder, big images; and under torchrun
(issue 11): two CPU ranks write the files of one process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitpcm.stages.mask_writer as mask_writer_mod
from torchrun_pair import one_and_two_ranks
from vitpcm.cli import main
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.postprocess.probs_file import load_probs, read_probs
from vitpcm.stages.infer import infer

VAL = [f"val_{i:05d}" for i in range(6)]


def _names(folder: Path, suffix: str) -> list:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def test_rerun_skips_finished_images_and_redoes_stale_ones(run, tmp_path):
    out = tmp_path / "o"
    first = infer(run, "val", out=out, progress=False)
    assert (first["computed"], first["resumed"], first["images"]) == (6, 0, 6)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}

    again = infer(run, "val", out=out, progress=False)
    assert (again["computed"], again["resumed"]) == (0, 6)
    assert again["miou"] == first["miou"]  # the score counts the finished images too
    assert {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == stamps  # untouched

    (out / "probs" / "val_00002.npz").unlink()  # a lost npz: that image again
    assert infer(run, "val", out=out, progress=False)["computed"] == 1
    assert infer(run, "val", out=out, scale=48, progress=False)["computed"] == 6  # other settings
    assert infer(run, "val", out=out, scale=48, progress=False)["computed"] == 0
    assert infer(run, "val", out=out, scale=48, overwrite=True, progress=False)["computed"] == 6
    later = time.time() + 10  # a retrained checkpoint makes every mask stale
    os.utime(run / "checkpoints" / "best.pt", (later, later))
    assert infer(run, "val", out=out, scale=48, progress=False)["computed"] == 6


def test_a_run_killed_between_npz_and_png_resumes_to_the_same_files(run, tmp_path, monkeypatch):
    """The npz of an image is written before its PNG: a PNG always has its npz, and a rerun
    computes exactly the images without a PNG."""
    out = tmp_path / "o"
    real = mask_writer_mod.save_mask_png
    calls = []

    def killed_at_the_fourth_png(path, mask, text=None):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # stands for a kill: nothing after this line runs
        real(path, mask, text)

    monkeypatch.setattr(mask_writer_mod, "save_mask_png", killed_at_the_fourth_png)
    with pytest.raises(KeyboardInterrupt):
        infer(run, "val", out=out, progress=False)
    monkeypatch.undo()
    pngs, npzs = _names(out / "masks", ".png"), _names(out / "probs", ".npz")
    assert pngs == VAL[:3] and npzs == VAL[:4]  # a PNG implies its npz
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()

    resumed = infer(run, "val", out=out, progress=False)
    assert (resumed["computed"], resumed["resumed"]) == (3, 3)
    ref = infer(run, "val", out=tmp_path / "ref", progress=False)
    assert resumed["miou"] == ref["miou"]
    for name in VAL:
        assert (out / "masks" / f"{name}.png").read_bytes() == (tmp_path / "ref/masks" / f"{name}.png").read_bytes()


def test_infer_crf_resumes_its_crf_and_redoes_it_for_other_parameters(run, tmp_path):
    out = tmp_path / "o"
    first = infer(run, "val", out=out, crf=True, overrides=["crf.workers=1"], progress=False)
    assert first["crf"]["computed"] == 6
    again = infer(run, "val", out=out, crf=True, overrides=["crf.workers=1"], progress=False)
    assert (again["computed"], again["crf"]["computed"], again["crf"]["skipped"]) == (0, 0, 6)
    assert again["crf_miou"] == first["crf_miou"]
    other = infer(run, "val", out=out, crf=True, overrides=["crf.workers=1", "crf.iterations=2"], progress=False)
    assert (other["computed"], other["crf"]["computed"]) == (0, 6)  # the CRF key changed, not infer's


def _broken_copy(synth_root: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    (data / "JPEGImages" / "val_00001.jpg").write_bytes(b"not a jpeg")
    (data / "JPEGImages" / "val_00003.jpg").unlink()
    mask = read_mask_png(data / "SegmentationClass" / "val_00005.png").copy()
    mask[0, 0] = 40  # beyond the 6 classes; the LAST item: found before any image is inferred
    Image.fromarray(mask, mode="L").save(data / "SegmentationClass" / "val_00005.png")
    return data


def test_bad_items_are_listed_together_before_any_output(run, tmp_path, synth_root):
    data = _broken_copy(synth_root, tmp_path)
    with pytest.raises(VitpcmError) as info:
        infer(run, "val", overrides=[f"data.root={data}"], progress=False)
    message = str(info.value)
    assert "3 problem(s) in split 'val' (3 item(s)), nothing inferred" in message
    for name in ("val_00001.jpg", "val_00003", "val_00005.png"):
        assert name in message
    assert not (run / "pseudo").exists()  # no empty pseudo/val/masks left behind

    s = infer(run, "val", out=tmp_path / "o", overrides=[f"data.root={data}"], skip_bad=True, progress=False)
    assert (s["images"], s["skipped"], s["computed"]) == (3, 3, 3)
    rows = [line.split("\t") for line in (tmp_path / "o/skipped.txt").read_text().splitlines()]
    assert sorted(r[1] for r in rows) == ["val_00001", "val_00003", "val_00005"] and {r[0] for r in rows} == {"val"}
    assert _names(tmp_path / "o/masks", ".png") == ["val_00000", "val_00002", "val_00004"]


def test_cli_infer_skip_bad_and_the_error_without_it(run, tmp_path, synth_root, capsys):
    data = _broken_copy(synth_root, tmp_path)
    args = ["infer", str(run), f"data.root={data}", "--out", str(tmp_path / "o"), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--skip-bad" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 masks" in printed and "skipped 3 broken item(s)" in printed
    assert main([*args, "--skip-bad"]) == 0
    assert "(3 already done)" in capsys.readouterr().out


def test_full_disk_is_one_line_and_leaves_no_png_without_its_npz(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    real = Path.write_bytes

    def full_disk(self, data):
        if self.name.startswith(".val_00002.png."):  # the third mask's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert main(["infer", str(run), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and str(out / "masks") in err[0]
    monkeypatch.undo()
    pngs, npzs = _names(out / "masks", ".png"), _names(out / "probs", ".npz")
    assert pngs == VAL[:2] and set(pngs) <= set(npzs)
    assert not list(out.rglob("*.tmp"))
    s = infer(run, "val", out=out, progress=False)  # space freed: the rest, nothing twice
    assert (s["computed"], s["resumed"]) == (4, 2)


def test_read_only_folder_is_one_line_and_creates_nothing(run, tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if ro in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["infer", str(run), "--out", str(ro / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0] and str(ro) in err[0]
    assert list(ro.iterdir()) == []


def test_big_images_keep_small_probabilities_and_full_size_masks(run, tmp_path):
    full = infer(run, "val", out=tmp_path / "a", crf=True, overrides=["crf.workers=1"], progress=False)
    small = infer(run, "val", out=tmp_path / "b", crf=True, overrides=["crf.workers=1", "infer.max_side=64"],
                  progress=False)  # fmt: skip
    assert small["max_side"] == 64 and small["miou"] == full["miou"]
    agree = []
    for name in VAL:
        probs, classes, size = read_probs(tmp_path / "b/probs" / f"{name}.npz")
        mask = read_mask_png(tmp_path / "b/masks" / f"{name}.png")
        assert max(probs.shape[1:]) == 64 and size == mask.shape  # stored small, the size beside it
        # with the tags merged, the mask over the kept classes is the full-size one exactly
        assert np.array_equal(mask, read_mask_png(tmp_path / "a/masks" / f"{name}.png"))
        assert load_probs(tmp_path / "b/probs" / f"{name}.npz")[0].shape[1:] == mask.shape  # readers get full size
        crf_small = read_mask_png(tmp_path / "b/crf" / f"{name}.png")
        assert crf_small.shape == mask.shape
        agree.append((crf_small == read_mask_png(tmp_path / "a/crf" / f"{name}.png")).mean())
    assert np.mean(agree) > 0.9


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_cpu_ranks_write_the_files_of_one_process(run, tmp_path):
    tail = ["infer", str(run), "--crf", "crf.workers=1", "-q"]
    _, two = one_and_two_ranks(tail, tmp_path)
    assert two.stdout.count("wrote 6 masks") == 1  # rank 0 speaks
    a, b = tmp_path / "one", tmp_path / "two"
    for sub in ("masks", "crf"):
        assert _names(a / sub, ".png") == _names(b / sub, ".png") == VAL
        for name in VAL:
            assert (a / sub / f"{name}.png").read_bytes() == (b / sub / f"{name}.png").read_bytes()
    for name in VAL:
        pa, ca, sa = read_probs(a / "probs" / f"{name}.npz")
        pb, cb, sb = read_probs(b / "probs" / f"{name}.npz")
        assert np.array_equal(pa, pb) and np.array_equal(ca, cb) and sa == sb
    assert np.array_equal(np.load(a / "confusion.npy"), np.load(b / "confusion.npy"))
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert sb["ranks"] == 2 and sb["computed"] == 6
    assert (sa["miou"], sa["crf_miou"]) == (sb["miou"], sb["crf_miou"])
    assert not list(b.rglob(".done-*"))


# ----------------------------------------------------------------------------- speed settings (issue 11)
def test_batched_inference_with_writer_threads_writes_what_one_image_at_a_time_writes(run, tmp_path):
    one = infer(run, "val", out=tmp_path / "one", overrides=["infer.batch_size=1", "infer.writers=1"], progress=False)
    many = infer(run, "val", out=tmp_path / "many", overrides=["infer.batch_size=4", "infer.writers=3"], progress=False)
    assert one["miou"] == pytest.approx(many["miou"], abs=1e-3)
    assert _names(tmp_path / "many" / "masks", ".png") == VAL and _names(tmp_path / "many" / "probs", ".npz") == VAL
    for name in VAL:
        a, b = (
            read_probs(tmp_path / "one" / "probs" / f"{name}.npz"),
            read_probs(tmp_path / "many" / "probs" / f"{name}.npz"),
        )
        assert np.array_equal(a[1], b[1])  # the same present classes
        assert np.allclose(a[0], b[0], atol=1e-4)
        agree = (read_mask_png(tmp_path / "one" / "masks" / f"{name}.png")
                 == read_mask_png(tmp_path / "many" / "masks" / f"{name}.png")).mean()  # fmt: skip
        assert agree > 0.999


@pytest.mark.parametrize("tta", [False, True])
def test_transforms_on_the_device_write_the_same_files(run, tmp_path, tta):
    """data.transforms_on=device (the GPU default): workers decode, resize + normalise run in
    the stage's loop; on the CPU the masks and probabilities are exactly the loader's."""
    opts = dict(tta=True) if tta else {}
    for where in ("loader", "device"):
        s = infer(run, "val", out=tmp_path / where, overrides=[f"data.transforms_on={where}", "infer.batch_size=3"],
                  progress=False, **opts)  # fmt: skip
        assert s["computed"] == len(VAL)
    for name in VAL:
        a, b = (read_probs(tmp_path / where / "probs" / f"{name}.npz") for where in ("loader", "device"))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        masks = [read_mask_png(tmp_path / where / "masks" / f"{name}.png") for where in ("loader", "device")]
        assert np.array_equal(*masks)


def test_amp_is_part_of_the_resume_stamp_and_bad_speed_settings_are_refused(run, tmp_path):
    infer(run, "val", out=tmp_path / "p", progress=False)
    again = infer(run, "val", out=tmp_path / "p", overrides=["infer.batch_size=3"], progress=False)
    assert again["computed"] == 0  # the batch size does not change the files: nothing redone
    amp = infer(run, "val", out=tmp_path / "p", overrides=["infer.amp=true"], progress=False)
    assert amp["computed"] == len(VAL)  # bf16 would change them (on a GPU): stale
    with pytest.raises(VitpcmError, match="infer.batch_size"):
        infer(run, "val", out=tmp_path / "q", overrides=["infer.batch_size=-1"], progress=False)
