"""The torch backend of the dense CRF (crf.backend=torch) against pydensecrf and dense kernels."""

import logging

import numpy as np
import pytest
import torch
from tests.postprocess.test_crf import _direct, _scene, _write_folder

from vitpcm.atomic import save_npz_atomic
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.postprocess.crf import CRFParams, dense_crf
from vitpcm.postprocess.crf_runner import run_crf, settings_key
from vitpcm.postprocess.crf_torch import PermutohedralLattice, dense_crf_batch, dense_crf_tensor, smooth_exact

TORCH = CRFParams(backend="torch")
TORCH_LATTICE = CRFParams(backend="torch", gaussian="lattice")


def test_torch_equals_a_direct_pydensecrf_call():
    """Both kernels on pydensecrf's lattice (the authors' CRF): the same marginals up to float
    rounding, hence the same labels."""
    for seed in range(3):
        image, probs, _, _ = _scene(seed, h=30, w=41)
        ours, theirs = dense_crf(image, probs, TORCH_LATTICE), _direct(image, probs)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
        assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.999


@pytest.mark.parametrize("gaussian", ["exact", "lattice"])
def test_torch_equals_the_pydensecrf_backend_with_more_classes(gaussian):
    rng = np.random.default_rng(7)
    image, probs3, _, _ = _scene(5, h=40, w=52)
    logits = np.log(np.concatenate([probs3, rng.uniform(0.01, 0.3, (3, 40, 52))]).astype(np.float32))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)  # 6 labels
    ours = dense_crf(image, probs, CRFParams(backend="torch", gaussian=gaussian))
    theirs = dense_crf(image, probs, CRFParams(backend="pydensecrf", gaussian=gaussian))
    assert np.abs(ours - theirs).max() < 1e-4
    assert (ours.argmax(0) == theirs.argmax(0)).mean() >= 0.999


def test_the_lattice_filters_like_pydensecrfs_on_its_own():
    """The lattice alone (one Gaussian kernel, no unary): pydensecrf's message buffer of one
    mean-field step holds -w K_n Q for its normalised kernel K_n = n^-1/2 K n^-1/2."""
    from pydensecrf import densecrf as dcrf
    from pydensecrf import eigen

    rng = np.random.default_rng(3)
    h, w, c = 9, 13, 3
    q = np.ascontiguousarray(rng.dirichlet(np.ones(c), size=h * w).T, dtype=np.float32)  # [C, N]
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.addPairwiseGaussian(sxy=2.5, compat=1.0)
    energy, message = eigen.matrixXf(np.zeros_like(q)), eigen.matrixXf(np.zeros_like(q))
    crf.stepInference(eigen.matrixXf(q), energy, message)
    ys, xs = np.mgrid[0:h, 0:w]
    feats = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) / np.float32(2.5))
    lattice = PermutohedralLattice(feats)
    norm = (lattice.filter(torch.ones(h * w, 1)) + 1e-20).rsqrt()
    ours = (norm * lattice.filter(norm * torch.from_numpy(q.T))).numpy().T
    np.testing.assert_allclose(ours, -np.asarray(message), rtol=0, atol=1e-6)


def test_the_lattice_approximates_the_dense_gaussian_kernel():
    """Normalised as the CRF uses it, the lattice's kernel is close to the dense
    exp(-|f_i - f_j|^2 / 2) normalised the same way (the permutohedral approximation)."""
    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 4, (60, 3)).astype(np.float32)
    values = rng.uniform(0, 1, (60, 2)).astype(np.float32)
    dist2 = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    dense = np.exp(-dist2 / 2)
    dense_norm = 1 / np.sqrt(dense.sum(1, keepdims=True))
    want = dense_norm * (dense @ (dense_norm * values))
    lattice = PermutohedralLattice(torch.from_numpy(feats))
    norm = (lattice.filter(torch.ones(60, 1)) + 1e-20).rsqrt()
    got = (norm * lattice.filter(norm * torch.from_numpy(values))).numpy()
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95


def test_the_exact_smoothness_filter_is_scipys():
    from scipy.ndimage import gaussian_filter1d

    x = np.random.default_rng(1).uniform(0, 1, (2, 3, 17, 23)).astype(np.float32)
    for sigma in (1.0, 2.3):
        want = gaussian_filter1d(gaussian_filter1d(x, sigma, axis=-2, mode="constant"), sigma, axis=-1, mode="constant")
        np.testing.assert_allclose(smooth_exact(torch.from_numpy(x), sigma).numpy(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("params", [TORCH, TORCH_LATTICE], ids=["exact", "lattice"])
def test_a_batch_equals_one_image_at_a_time(params):
    """Images of other sizes and class counts in one batch: padded pixels and classes change
    nothing; images share no lattice vertex."""
    scenes = [_scene(0, h=20, w=30), _scene(1, h=33, w=17), _scene(2, h=25, w=25, classes=(0, 4))]
    images = [s[0] for s in scenes]
    probs = [s[1] for s in scenes]
    probs[2] = probs[2][:2] / probs[2][:2].sum(0, keepdims=True)  # two classes
    batch = dense_crf_batch(images, probs, params)
    for image, p, q in zip(images, probs, batch):
        assert q.shape == p.shape
        np.testing.assert_allclose(q.numpy(), dense_crf_batch([image], [p], params)[0].numpy(), rtol=0, atol=1e-6)


def test_dense_crf_tensor_takes_tensors_and_keeps_the_device():
    image, probs, _, _ = _scene(3, h=16, w=20)
    q = dense_crf_tensor(torch.from_numpy(image)[None], torch.from_numpy(probs)[None], TORCH)
    assert q.shape == (1, 3, 16, 20) and q.device == torch.device("cpu") and q.dtype == torch.float32
    torch.testing.assert_close(q.sum(1), torch.ones(1, 16, 20))
    with pytest.raises(ValueError, match=r"do not match probabilities"):
        dense_crf_tensor(torch.from_numpy(image)[None, :15], torch.from_numpy(probs)[None], TORCH)
    nan = torch.from_numpy(probs)[None].clone()
    nan[0, 1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values"):
        dense_crf_tensor(torch.from_numpy(image)[None], nan, TORCH)


def test_auto_means_torch_on_cuda_only_and_the_key_tells_the_backends_apart():
    assert CRFParams().backend == "auto"
    assert CRFParams().resolved_backend(None) == "pydensecrf"
    assert CRFParams().resolved_backend("cpu") == "pydensecrf"
    assert CRFParams().resolved_backend("cuda:1") == "torch"
    assert CRFParams(backend="pydensecrf").resolved_backend("cuda") == "pydensecrf"
    with pytest.raises(VitpcmError, match=r"crf.backend must be one of auto \| pydensecrf \| torch, got 'gpu'"):
        CRFParams(backend="gpu").validated()
    from vitpcm.config import load_config

    with pytest.raises(VitpcmError, match="crf.backend must be one of"):
        load_config("synthetic", ["crf.backend=cuda"])
    # pydensecrf's masks keep the key they had before crf.backend existed; torch's differ
    old = settings_key(CRFParams(), 100)
    assert settings_key(CRFParams(backend="pydensecrf"), 100) == old
    assert settings_key(TORCH, 100, "torch") != old


def test_run_crf_with_the_torch_backend(tmp_path):
    _write_folder(tmp_path, 3)
    s = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "torch", TORCH, workers=2, progress=False)
    assert (s["computed"], s["workers"], s["backend"]) == (3, 2, "torch")  # CPU: worker processes, as pydensecrf
    theirs = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "pyd", CRFParams(backend="pydensecrf"),
                     workers=1, progress=False)  # fmt: skip
    assert theirs["backend"] == "pydensecrf"
    for i in range(3):
        a, b = read_mask_png(tmp_path / "torch" / f"im{i}.png"), read_mask_png(tmp_path / "pyd" / f"im{i}.png")
        assert (a == b).mean() >= 0.999
    again = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "torch", TORCH, progress=False)
    assert (again["computed"], again["skipped"]) == (0, 3)  # resumable, same key
    other = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "pyd", TORCH, progress=False)
    assert other["computed"] == 3  # masks of the other backend are recomputed


def test_cli_crf_backend_torch_and_a_missing_cuda_device(tmp_path, capsys):
    from vitpcm.cli import main

    _write_folder(tmp_path, 2)
    args = ["crf", "--probs", str(tmp_path / "probs"), "--images", str(tmp_path / "images"), "-q"]
    assert main([*args, "--out", str(tmp_path / "out"), "--backend", "torch", "--device", "cpu"]) == 0
    assert "torch" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["im0.png", "im1.png"]
    if not torch.cuda.is_available():
        with pytest.raises(VitpcmError, match=r"asked for cuda.* give --device cpu"):
            run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "gpu", progress=False, device="cuda")


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda p: np.where(p > 0.9, np.nan, p), "NaN or infinite"),
        (lambda p: np.log(p), r"not \[0, 1\] \(logits\?\)"),
        (lambda p: p * 1.5 / p.max(), r"not \[0, 1\]|sum to up to"),
    ],
)
def test_bad_probabilities_name_the_file_and_the_fix(tmp_path, bad, message):
    _write_folder(tmp_path, 2)
    data = np.load(tmp_path / "probs" / "im1.npz")
    save_npz_atomic(tmp_path / "probs" / "im1.npz", probs=bad(data["probs"]).astype(np.float32),
                    classes=data["classes"])  # fmt: skip
    for backend in ("torch", "pydensecrf"):
        with pytest.raises(VitpcmError, match=rf"im1.npz: not probabilities \(.*{message}.*rerun `vitpcm infer`"):
            run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / backend, CRFParams(backend=backend),
                    workers=1, progress=False, overwrite=True)  # fmt: skip


def test_keys_that_do_not_pack_fall_back_to_pydensecrf(caplog):
    """Features spread so far that the vertex keys need more than 62 bits: a warning, and
    pydensecrf computes that image."""
    image, probs, _, _ = _scene(0, h=12, w=14)
    params = CRFParams(backend="torch", bilateral_sxy=1e-4, bilateral_srgb=1e-4, iterations=2)
    with caplog.at_level(logging.WARNING, logger="vitpcm.postprocess.crf"):
        q = dense_crf(image, probs, params)
    assert "lattice keys need" in caplog.text and "goes to pydensecrf" in caplog.text
    np.testing.assert_array_equal(q, dense_crf(image, probs, CRFParams(bilateral_sxy=1e-4, bilateral_srgb=1e-4,
                                                                       iterations=2, backend="pydensecrf")))  # fmt: skip


def test_the_memory_budget_counts_the_torch_backend_heavier():
    from vitpcm.postprocess.crf_runner import crf_memory

    shape = (3, 1000, 1000, 1000, 1000)
    pyd, tor = crf_memory(shape, 0), crf_memory(shape, 0, "torch")
    assert tor - pyd > 1000 * 1000 * 800  # ~1.7 kB / px measured, and torch's own pages per worker


@pytest.mark.parametrize("gaussian", ["exact", "lattice"])
def test_a_batch_equals_one_image_at_a_time_when_stopping_early(gaussian):
    """crf.tolerance: an image that has settled keeps its marginals while the others go on."""
    params = CRFParams(backend="torch", gaussian=gaussian, tolerance=0.002)
    scenes = [_scene(0, h=20, w=30), _scene(1, h=33, w=17), _scene(3, h=25, w=25)]
    images, probs = [s[0] for s in scenes], [s[1] for s in scenes]
    batch = dense_crf_batch(images, probs, params)
    for image, p, q in zip(images, probs, batch):
        np.testing.assert_allclose(q.numpy(), dense_crf_batch([image], [p], params)[0].numpy(), rtol=0, atol=1e-6)
