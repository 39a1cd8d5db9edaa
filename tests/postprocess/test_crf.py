"""Dense CRF: against a direct pydensecrf call, present-only vs all channels, the folder runner."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import pydensecrf.utils as dutils
import pytest
from PIL import Image

from vitpcm.atomic import save_npz_atomic
from vitpcm.cli import main
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.postprocess.crf import CRFParams, crf_labels, dense_crf
from vitpcm.postprocess.crf_runner import run_crf
from vitpcm.utils.stamps import digest


def _scene(seed: int, h: int = 36, w: int = 48, classes=(0, 3, 7)):
    """An image of flat colour regions and noisy probabilities that roughly follow them."""
    rng = np.random.default_rng(seed)
    label = np.zeros((h, w), dtype=np.int64)
    label[h // 4 : 3 * h // 4, w // 5 : w // 2] = 1
    label[h // 3 :, 3 * w // 5 :] = 2
    colours = np.array([[40, 60, 50], [200, 40, 40], [40, 40, 210]])
    image = np.clip(colours[label] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(3)[label].transpose(2, 0, 1) + rng.normal(0, 1.0, (3, h, w))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, probs.astype(np.float32), np.array(classes, dtype=np.int64), label


def _direct(image, probs, params=CRFParams()):
    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(dutils.unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image), compat=4)
    return np.array(crf.inference(10)).reshape(c, h, w)


LATTICE = CRFParams(gaussian="lattice")


def test_defaults_are_the_papers():
    assert CRFParams() == CRFParams(10, 1.0, 3.0, 67.0, 3.0, 4.0, 1e-5, "exact", "auto")
    from vitpcm.config import load_config

    assert CRFParams.from_config(load_config("voc12").crf) == LATTICE  # the authors' pydensecrf, lattice and all
    assert CRFParams.from_config(load_config("synthetic").crf) == CRFParams()
    with pytest.raises(VitpcmError, match="crf.gaussian must be exact or lattice"):
        CRFParams(gaussian="fast").validated()


def test_dense_crf_equals_a_direct_pydensecrf_call():
    image, probs, _, _ = _scene(0)
    np.testing.assert_allclose(dense_crf(image, probs, LATTICE), _direct(image, probs), rtol=0, atol=1e-6)


def _softmax(x):
    e = np.exp(x - x.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_the_exact_smoothness_kernel_is_the_papers_gaussian(iterations, backend):
    """gaussian=exact with the appearance kernel off: mean field with exp(-|p_i - p_j|^2 / 2),
    written out as a dense N x N matrix (4-sigma window, as the separable filter), both sides
    normalised by sqrt(K 1) as pydensecrf does; with either backend."""
    image, probs, _, _ = _scene(2, h=7, w=11)
    params = CRFParams(iterations=iterations, bilateral_compat=0.0, backend=backend)
    ys, xs = np.mgrid[0:7, 0:11]
    dy, dx = ys.reshape(-1, 1) - ys.reshape(1, -1), xs.reshape(-1, 1) - xs.reshape(1, -1)
    kernel = np.exp(-(dy**2 + dx**2) / 2.0) * ((np.abs(dy) <= 4) & (np.abs(dx) <= 4))
    norm = 1.0 / np.sqrt(kernel.sum(1))
    unary = -np.log(np.maximum(probs.reshape(3, -1).astype(np.float64), 1e-5))
    q = _softmax(-unary)
    for _ in range(iterations):
        q = _softmax(-unary + 3.0 * norm * ((q * norm) @ kernel.T))
    np.testing.assert_allclose(dense_crf(image, probs, params).reshape(3, -1), q, rtol=0, atol=2e-5)


def test_the_exact_path_takes_the_appearance_kernel_from_pydensecrf():
    """With the smoothness kernel off, both paths are pydensecrf's mean field over the
    bilateral lattice alone: the same marginals up to float rounding."""
    image, probs, _, _ = _scene(4)
    params = CRFParams(gauss_compat=0.0)
    exact = dense_crf(image, probs, params)
    np.testing.assert_allclose(exact, dense_crf(image, probs, CRFParams(gauss_compat=0.0, gaussian="lattice")),
                               rtol=0, atol=1e-5)  # fmt: skip
    assert not np.allclose(exact, dense_crf(image, probs, CRFParams(gauss_compat=0.0, bilateral_compat=0.0)))


def test_exact_and_lattice_smoothness_agree_on_the_masks():
    for seed in range(4):
        image, probs, classes, _ = _scene(seed, h=48, w=64)
        agree = (crf_labels(image, probs, classes) == crf_labels(image, probs, classes, LATTICE)).mean()
        assert agree >= 0.999


def test_present_classes_only_agrees_with_all_21_channels():
    for seed in range(3):
        image, probs, classes, _ = _scene(seed)
        full = np.zeros((21, *probs.shape[1:]), dtype=np.float32)  # the authors: absent classes at 0
        full[classes] = probs
        ours = crf_labels(image, probs, classes)
        theirs = _direct(image, full).argmax(0)
        assert (ours == theirs).mean() >= 0.999


def test_crf_follows_the_image_and_zero_iterations_is_the_argmax():
    image, probs, classes, label = _scene(1)
    before = classes[probs.argmax(0)]
    after = crf_labels(image, probs, classes)
    truth = classes[label]
    assert (after == truth).mean() > (before == truth).mean() + 0.05  # noisy unaries, clean colours
    assert np.array_equal(crf_labels(image, probs, classes, CRFParams(iterations=0)), before)
    one = crf_labels(image, probs[:1], classes[:1])  # one present class: no CRF needed
    assert one.dtype == np.uint8 and (one == 0).all()


def _write_folder(root: Path, n: int, size=(36, 48)):
    (root / "images").mkdir(parents=True)
    for i in range(n):
        image, probs, classes, _ = _scene(i, *size)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        save_npz_atomic(root / "probs" / f"im{i}.npz", probs=probs, classes=classes)


def test_run_crf_folder_parallel_resumable(tmp_path):
    _write_folder(tmp_path, 4)
    out = tmp_path / "crf"
    (out).mkdir()
    (out / ".im0.png.abc123.tmp").write_bytes(b"half")  # left by a killed run
    s = run_crf(tmp_path / "probs", tmp_path / "images", out, workers=2, progress=False)
    assert (s["computed"], s["skipped"], s["workers"]) == (4, 0, 2)
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im1.png", "im2.png", "im3.png", "summary.json"]
    for i in range(4):
        image, probs, classes, _ = _scene(i)
        mask = read_mask_png(out / f"im{i}.png")
        assert Image.open(out / f"im{i}.png").mode == "P" and mask.shape == (36, 48)
        assert np.array_equal(mask, crf_labels(image, probs, classes))  # workers = same result
    again = run_crf(tmp_path / "probs", tmp_path / "images", out, workers=2, progress=False)
    assert (again["computed"], again["skipped"]) == (0, 4)
    # new probabilities make that mask stale
    later = time.time() + 5
    os.utime(tmp_path / "probs" / "im2.npz", (later, later))
    assert run_crf(tmp_path / "probs", tmp_path / "images", out, workers=1, progress=False)["computed"] == 1


def test_run_crf_errors_name_the_file(tmp_path):
    _write_folder(tmp_path, 2)
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "im1.png")
    with pytest.raises(VitpcmError, match=r"im1.png is 40x30 but .*im1.npz is 48x36"):
        run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", workers=2, progress=False)
    (tmp_path / "images" / "im1.png").unlink()
    with pytest.raises(VitpcmError, match=r"no image for 1 name\(s\) in .*: im1;"):
        run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", workers=1, progress=False)
    Image.fromarray(_scene(1)[0]).save(tmp_path / "images" / "im1.png")
    np.savez(tmp_path / "probs" / "im1.npz", other=np.zeros(3))
    with pytest.raises(VitpcmError, match="lacks the arrays 'probs' and 'classes'"):
        run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", names=["im1"], workers=1, progress=False)
    with pytest.raises(VitpcmError, match="crf.bilateral_srgb must be positive"):
        run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", params=CRFParams(bilateral_srgb=0))


def test_cli_crf(tmp_path, capsys):
    _write_folder(tmp_path, 2)
    args = [
        "crf",
        "--probs",
        str(tmp_path / "probs"),
        "--images",
        str(tmp_path / "images"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "crf.iterations=2", "--workers", "1", "-q"]) == 0
    assert "wrote 2 CRF masks" in capsys.readouterr().out
    assert main([*args, "train.epochs=3", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crf.* overrides only" in err[0]


def _run_in_new_group(probs, images, out):
    os.setsid()  # its own process group: the test kills the runner and its workers at once
    run_crf(probs, images, out, workers=2, progress=False)


def test_a_killed_run_leaves_complete_pngs_and_resumes(tmp_path):
    import multiprocessing

    _write_folder(tmp_path, 20, size=(64, 80))
    out = tmp_path / "o"
    proc = multiprocessing.get_context("fork").Process(
        target=_run_in_new_group, args=(tmp_path / "probs", tmp_path / "images", out)
    )
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-write or not
    proc.join()
    done = sorted(out.glob("*.png"))
    assert 3 <= len(done) < 20
    for path in done:  # every PNG that exists is whole
        assert read_mask_png(path).shape == (64, 80)
    s = run_crf(tmp_path / "probs", tmp_path / "images", out, workers=2, progress=False)
    assert s["skipped"] == len(done) and s["computed"] == 20 - len(done)
    assert not list(out.glob(".*.tmp"))


def test_refine_stage_of_a_run_and_its_overrides(tiny_run):
    """`vitpcm.stages.crf`: the CRF of RUN/pseudo/SPLIT (as `vitpcm infer --crf` chains it);
    finished masks are kept, and the score is the one infer wrote."""
    import json

    from vitpcm.stages.crf import crf_params_from_overrides, refine

    result = refine(tiny_run, "val", overrides=["crf.workers=1"], progress=False)
    saved = json.loads((tiny_run / "pseudo/val/summary.json").read_text())
    assert result["miou"] == pytest.approx(saved["crf_miou"]) and result["workers"] == 1
    assert crf_params_from_overrides(["crf.iterations=3", "crf.workers=2"]) == (CRFParams(iterations=3), 2)
    with pytest.raises(VitpcmError, match=r"crf.\* overrides only"):
        crf_params_from_overrides(["data.root=/x"])
    with pytest.raises(VitpcmError, match="crf.clip must lie in"):
        crf_params_from_overrides(["crf.clip=2"])


def test_refine_folders_takes_the_cli_overrides(tmp_path):
    from vitpcm.stages.crf import crf_folders

    _write_folder(tmp_path, 2)
    s = crf_folders(tmp_path / "probs", tmp_path / "images", tmp_path / "o", overrides=["crf.iterations=2", "crf.workers=1"],
                    progress=False)  # fmt: skip
    assert (s["computed"], s["workers"], s["params"]["iterations"]) == (2, 1, 2)
    with pytest.raises(VitpcmError, match=r"crf.\* overrides only"):
        crf_folders(tmp_path / "probs", tmp_path / "images", tmp_path / "o", overrides=["train.epochs=3"])


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
@pytest.mark.parametrize("gaussian", ["exact", "lattice"])
def test_tolerance_stops_mean_field_once_the_labels_settle(gaussian, backend):
    """crf.tolerance (0, the authors': every iteration) stops after the first step that changes
    at most that share of the labels: the marginals of a fixed count of that many steps."""
    import dataclasses

    image, probs, _, _ = _scene(1, h=30, w=40)
    base = CRFParams(gaussian=gaussian, backend=backend)

    def marginals(**changes):
        return dense_crf(image, probs, dataclasses.replace(base, **changes))

    steps = [marginals(iterations=k) for k in range(11)]
    changed = [np.count_nonzero(steps[k].argmax(0) != steps[k - 1].argmax(0)) for k in range(1, 11)]
    for tolerance in (0.99, 0.01, 1e-9):
        stop = next((k + 1 for k, n in enumerate(changed) if n <= tolerance * probs[0].size), 10)
        np.testing.assert_allclose(marginals(tolerance=tolerance), steps[stop], rtol=0, atol=2e-6)
    assert next(k + 1 for k, n in enumerate(changed) if n <= 0.01 * probs[0].size) > 1  # the case is not trivial
    np.testing.assert_array_equal(marginals(tolerance=0.0), steps[10])
    for bad in (-0.1, 1.0):
        with pytest.raises(VitpcmError, match="crf.tolerance must lie in"):
            CRFParams(tolerance=bad).validated()


def test_the_settings_key_tells_early_stopped_masks_apart():
    from vitpcm.postprocess.crf_runner import settings_key

    assert settings_key(CRFParams(tolerance=0.001), 100) != settings_key(CRFParams(), 100)
    # tolerance 0 (the default) keeps the key masks were stamped with before it existed
    before = {k: v for k, v in CRFParams().as_dict().items() if k not in ("backend", "tolerance")}
    assert settings_key(CRFParams(), 100) == digest({"params": before, "max_pixels": 100})
    assert CRFParams.from_config({"tolerance": "0.001"}).tolerance == 0.001
