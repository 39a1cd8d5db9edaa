"""Import of the authors' Keras weights, and TensorFlow's bicubic resize, without TensorFlow.

The fixture ``tests/fixtures/keras_tiny.h5`` is a narrow, shallow ViT-PCM of the authors'
architecture (width 32, 2 blocks, 2 heads, HV-BiLSTM 8, 21 classes) that real Keras wrote
with ``save_weights``; ``keras_tiny_expected.npz`` holds that Keras model's per-patch
probabilities for fixed images at 384 and 480, and TensorFlow's bicubic resize of a random
grid. Both were written by ``benchmarks/keras_reference/check.py --archs tiny --fixture``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch

import vitpcm
from vitpcm.cli import main
from vitpcm.engine.checkpoint import read_checkpoint
from vitpcm.errors import VitpcmError
from vitpcm.models.keras_import import KerasSpec, keras_to_state_dict, read_keras_h5, suggest_overrides
from vitpcm.models.tf_resize import (
    resample_pos_embed_tf,
    tf_bicubic_resize,
    tf_bicubic_weights,
    use_tf_pos_embed_resize,
    uses_tf_pos_embed_resize,
)
from vitpcm.runs import RunLayout
from vitpcm.stages.import_keras import import_keras

# tests/fixtures/, found from here upwards (the test may move into a subfolder of tests/)
FIXTURES = next(
    p / "fixtures" for p in Path(__file__).resolve().parents if (p / "fixtures" / "keras_tiny.h5").is_file()
)
H5 = FIXTURES / "keras_tiny.h5"
EXPECTED = FIXTURES / "keras_tiny_expected.npz"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(EXPECTED))


@pytest.fixture(scope="module")
def overrides(expected):
    return [str(s) for s in expected["overrides"]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, overrides):
    run = tmp_path_factory.mktemp("keras") / "run"
    summary = import_keras(H5, "voc12", overrides, run)
    return run, summary


# --- TensorFlow's bicubic resize -----------------------------------------------------------


def _keys(t: float, a: float = -0.5) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _reference_1d(values: np.ndarray, out_size: int) -> np.ndarray:
    """TF's ResizeBicubic (half-pixel centres) along axis 0, one output at a time: Keys
    a = -0.5 at the source offset rounded to 1/1024, taps outside the grid dropped and
    the kept weights renormalised."""
    n = values.shape[0]
    out = np.zeros((out_size,) + values.shape[1:])
    for x in range(out_size):
        s = (x + 0.5) * n / out_size - 0.5
        i = math.floor(s)
        delta = round((s - i) * 1024) / 1024
        taps = [(i - 1, _keys(1 + delta)), (i, _keys(delta)), (i + 1, _keys(1 - delta)), (i + 2, _keys(2 - delta))]
        kept = [(j, w) for j, w in taps if 0 <= j < n]
        total = sum(w for _, w in kept)
        out[x] = sum(w * values[j] for j, w in kept) / total
    return out


def test_tf_bicubic_hand_computed_ramp():
    # 4 -> 8 on the ramp 0, 1, 2, 3: source positions -0.25, 0.25, ..., 3.25.
    ramp = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)
    got = tf_bicubic_resize(ramp, (1, 8))[0, 0, 0].double().numpy()
    k25, k75, k125, k175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375  # Keys a=-0.5 at 0.25, 0.75, 1.25, 1.75
    want = [
        (0 * k25 + 1 * k125) / (k25 + k125),  # s=-0.25: taps -2, -1 dropped, 0 and 1 renormalised
        (0 * k25 + 1 * k75 + 2 * k175) / (k25 + k75 + k175),  # s=0.25: tap -1 dropped
        (0 * k75 + 1 * k25 + 2 * k125) / (k75 + k25 + k125),  # s=0.75: tap -1 dropped
        1.25,  # inside, all four taps: Keys' cubic reproduces a ramp
        1.75,
    ]
    want += [3 - v for v in reversed(want[:3])]  # mirror symmetry
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert want[0] == pytest.approx(-0.0703125 / 0.796875)


def test_tf_bicubic_matches_scalar_reference_on_tiny_grids():
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((3, 4, 2))  # [h, w, C]
    for size in [(6, 5), (7, 9), (2, 3), (3, 4)]:
        want = _reference_1d(_reference_1d(grid, size[0]).transpose(1, 0, 2), size[1]).transpose(1, 0, 2)
        got = tf_bicubic_resize(torch.from_numpy(grid).float(), size).double().numpy()  # [h, w, C] layout
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=str(size))
        nchw = tf_bicubic_resize(torch.from_numpy(grid).float().permute(2, 0, 1)[None], size)
        np.testing.assert_allclose(nchw[0].permute(1, 2, 0).double().numpy(), want, atol=2e-6)


def test_tf_bicubic_weights_rows_sum_to_one_and_identity():
    w = tf_bicubic_weights(24, 60)
    assert w.shape == (60, 24)
    torch.testing.assert_close(w.sum(1), torch.ones(60), atol=1e-6, rtol=0)
    assert torch.equal(tf_bicubic_weights(24, 24), torch.eye(24))


def test_tf_bicubic_matches_tensorflow(expected):
    grid = torch.from_numpy(expected["tf_resize_in"])  # [1, 24, 24, 4], TF layout
    for key in [k for k in expected if k.startswith("tf_resize_out_")]:
        h, w = map(int, key.rsplit("_", 1)[1].split("x"))
        got = tf_bicubic_resize(grid, (h, w), channels_last=True).numpy()
        np.testing.assert_allclose(got, expected[key], atol=2e-6, err_msg=key)


def test_resample_pos_embed_tf_keeps_cls_and_resizes_grid():
    pos = torch.randn(1, 1 + 24 * 24, 8)
    assert resample_pos_embed_tf(pos, (24, 24)) is pos
    out = resample_pos_embed_tf(pos, (60, 40))
    assert out.shape == (1, 1 + 60 * 40, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = tf_bicubic_resize(pos[:, 1:].reshape(1, 24, 24, 8), (60, 40), channels_last=True)
    torch.testing.assert_close(out[:, 1:], grid.reshape(1, -1, 8))


def test_use_tf_pos_embed_resize_changes_only_off_grid():
    vit = timm.create_model("vit_small_patch16_384", pretrained=False, num_classes=0, dynamic_img_size=True,
                            embed_dim=32, depth=1, num_heads=2).eval()  # fmt: skip
    with torch.no_grad():
        vit.pos_embed.normal_(0.0, 1.0)  # large enough for the two resizes to differ visibly
    keys = list(vit.state_dict())
    x384, x480 = torch.randn(1, 3, 384, 384), torch.randn(1, 3, 480, 480)
    with torch.no_grad():
        base384, base480 = vit.forward_features(x384), vit.forward_features(x480)
        use_tf_pos_embed_resize(vit)
        assert uses_tf_pos_embed_resize(vit)
        tf384, tf480 = vit.forward_features(x384), vit.forward_features(x480)
        use_tf_pos_embed_resize(vit, False)
        assert not uses_tf_pos_embed_resize(vit)
        again480 = vit.forward_features(x480)
    assert list(vit.state_dict()) == keys
    torch.testing.assert_close(tf384, base384)  # same grid: no resize either way
    assert not torch.allclose(tf480, base480, atol=1e-4)  # TF's and PyTorch's bicubic differ
    torch.testing.assert_close(again480, base480)


# --- the converter -------------------------------------------------------------------------


def _probs(model, images: np.ndarray) -> tuple:
    x = torch.from_numpy((images.astype(np.float32) - 127.5) / 127.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x)
    return out["probs"].permute(0, 2, 3, 1).numpy(), out["pooled"].numpy()


def test_imported_run_matches_keras(imported, expected):
    run, summary = imported
    layout = RunLayout(run)
    assert layout.config.is_file() and layout.classes.is_file() and layout.checkpoint("last").is_file()
    assert len(layout.classes.read_text().split()) == 21 == summary["classes"]
    state = read_checkpoint(layout.checkpoint("best"))
    assert state["epoch"] == 0 and state["arch"]["name"] == "vitpcm"
    assert len(state["source"]["sha256"]) == 64 and state["source"]["keras_h5"].endswith("keras_tiny.h5")
    assert summary["tensors"] == 51 and summary["spec"]["width"] == 32

    model, info = vitpcm.load_run(run)  # eval mode, as a trained run
    assert not model.training and info["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    # the imported run carries model.pos_embed_resize=tf: the model rebuilt from it resizes as TF does
    assert info["arch"]["pos_embed_resize"] == "tf" and uses_tf_pos_embed_resize(model.backbone)
    assert summary["pos_embed_resize"] == "tf" and info["config"]["model"]["pos_embed_resize"] == "tf"
    for size in (384, 480):
        probs, pooled = _probs(model, expected[f"images_{size}"])
        np.testing.assert_allclose(probs, expected[f"preds_{size}"], atol=1e-5, rtol=0, err_msg=f"@{size}")
        np.testing.assert_allclose(pooled, expected[f"pooled_preds_{size}"], atol=1e-5, rtol=0)


def _edit_copy(tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited.h5"
    shutil.copyfile(H5, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _set_names(group, names):
    group.attrs["weight_names"] = np.array([n.encode() for n in names])


def _names(group):
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]


def test_lstm_cell_suffix_does_not_matter(tmp_path, overrides, expected):
    def rename(f):
        group = f["patch_conditioning"]
        new = []
        for i, name in enumerate(_names(group)):
            renamed = name.replace("/lstm_cell/", f"/lstm_cell_{7 + i // 3}/")
            group.move(name, renamed)
            new.append(renamed)
        _set_names(group, new)

    a = keras_to_state_dict(read_keras_h5(H5))
    b = keras_to_state_dict(read_keras_h5(_edit_copy(tmp_path, rename)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nested_backbone_model_reads_the_same(tmp_path):
    def nest(f):  # the backbone saved as one layer "patch_encoder" (a nested Keras model)
        layers = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        inner = [n for n in layers if n.startswith(("embedding", "class_token", "Transformer/"))]
        names = []
        for layer in inner:
            for name in _names(f[layer]):
                f.copy(f[layer][name], f"patch_encoder/{name}")
                names.append(name)
            del f[layer]
        _set_names(f["patch_encoder"], names)
        kept = [n for n in layers if n not in inner] + ["patch_encoder"]
        f.attrs["layer_names"] = np.array([n.encode() for n in kept])

    a = keras_to_state_dict(read_keras_h5(H5))
    b = keras_to_state_dict(read_keras_h5(_edit_copy(tmp_path, nest)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_leftover_and_missing_tensors_are_listed(tmp_path):
    def add_head(f):
        layers = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = np.array([n.encode() for n in layers + ["head"]])
        group = f.create_group("head")
        group.create_dataset("head/kernel:0", data=np.zeros((32, 10), np.float32))
        _set_names(group, ["head/kernel:0"])

    with pytest.raises(VitpcmError, match=r"1 tensors that have no place.*head:head/kernel:0"):
        keras_to_state_dict(read_keras_h5(_edit_copy(tmp_path, add_head)))

    def drop(f):
        group = f["Transformer/encoderblock_1"]
        names = [n for n in _names(group) if "LayerNorm_2/gamma" not in n and "query/bias" not in n]
        for n in _names(group):
            if n not in names:
                del group[n]
        _set_names(group, names)

    with pytest.raises(VitpcmError, match=r"lacks 2 tensors") as err:
        keras_to_state_dict(read_keras_h5(_edit_copy(tmp_path, drop)))
    assert "Transformer/encoderblock_1: MultiHeadDotProductAttention_1/query/bias" in str(err.value)
    assert "Transformer/encoderblock_1: LayerNorm_2/gamma" in str(err.value)


def test_sizes_or_classes_that_do_not_fit_are_one_line(tmp_path, overrides):
    wider = [o for o in overrides if "embed_dim" not in o] + ["model.backbone_kwargs.embed_dim=48"]
    with pytest.raises(VitpcmError) as err:
        import_keras(H5, "voc12", wider, tmp_path / "wide")
    msg = str(err.value)
    assert "\n" not in msg and "width 32 vs 48" in msg and "model.backbone_kwargs.embed_dim=32" in msg

    with pytest.raises(VitpcmError, match="21 classes but .* gives 81") as err:
        import_keras(H5, "coco14", overrides, tmp_path / "coco")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "wide").exists() and not (tmp_path / "coco").exists()


def test_suggested_backbone_for_released_widths():
    spec_s = KerasSpec(width=384, depth=12, mlp_dim=1536, patch=16, grid=(24, 24), lstm_hidden=192, num_classes=21)
    assert suggest_overrides(spec_s) == ["model.backbone=vit_small_patch16_384", "model.hv_lstm=true"]
    spec_b = KerasSpec(width=768, depth=12, mlp_dim=3072, patch=16, grid=(24, 24), lstm_hidden=192, num_classes=21)
    assert suggest_overrides(spec_s, spec_b) == ["model.backbone=vit_small_patch16_384"]


def test_foreign_files_and_existing_runs_are_refused(tmp_path, imported, overrides):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(VitpcmError, match="not an HDF5 file"):
        read_keras_h5(junk)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(VitpcmError, match="not a Keras-2 weights file"):
        read_keras_h5(tmp_path / "other.h5")
    with pytest.raises(VitpcmError, match="not found"):
        read_keras_h5(tmp_path / "missing.h5")
    run, _ = imported
    with pytest.raises(VitpcmError, match="already holds checkpoints"):
        import_keras(H5, "voc12", overrides, run)


def test_cli_import_keras_then_load(tmp_path, overrides, capsys):
    run = tmp_path / "run"
    assert main(["import-keras", str(H5), *overrides, "--out", str(run), "-q"]) == 0
    assert "21 classes, 51 Keras tensors" in capsys.readouterr().out
    assert main(["import-keras", str(H5), "--out", str(tmp_path / "other"), "-q"]) == 2  # /B preset, tiny file
    assert "add model.backbone_kwargs.embed_dim=32" in capsys.readouterr().err
