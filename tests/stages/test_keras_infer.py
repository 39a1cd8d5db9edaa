"""``vitpcm infer`` (the ``voc12`` preset) against the authors' ``main.py test``, without TensorFlow.

The fixture ``tests/fixtures/keras_infer_tiny.npz`` holds two small photos (a 64 x 90 RGB
crop of scikit-image's ``chelsea``, a 75 x 61 greyscale crop of ``camera``, both as PNG bytes
behind a ``.jpg`` name, so that both sides decode the same pixels), their class-index masks
(the grey one without background), and what the authors' own test path made of them with the
weights of ``tests/fixtures/keras_tiny.h5`` (their ``dataloader.py`` on a TFRecord, resize
to 960 with ``align_corners``, tags from the mask resized to 960, ``model.infer`` with the tag
merge, ``preds2dict``, ``resize`` back to the image size, ``argmax``): the present classes,
their probabilities at the original size and the mask. Written by
``benchmarks/keras_reference/infer_check.py --archs tiny --fixture``.

The test imports the weights (``vitpcm import-keras``, preset ``voc12``), runs the inference
stage itself on a VOC-layout folder of the photos and asserts the same classes, the
probabilities of ``probs/NAME.npz`` within 1e-4 and >= 99.99 % of the mask pixels equal; and
that the comparison fails when one of the preset's switches is turned back to vitpcm's own
behaviour (so a drift of the inference path cannot pass unseen).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpcm.stages.import_keras import import_keras

FIXTURES = next(
    p / "fixtures" for p in Path(__file__).resolve().parents if (p / "fixtures" / "keras_infer_tiny.npz").is_file()
)
H5 = FIXTURES / "keras_tiny.h5"
NPZ = FIXTURES / "keras_infer_tiny.npz"
HARNESS = FIXTURES.parent.parent / "benchmarks" / "keras_reference" / "infer_check.py"


def _harness():
    """The vitpcm side of the benchmark (folder, stage call, comparison), loaded from its file."""
    spec = importlib.util.spec_from_file_location("infer_check", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _harness()


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(NPZ))


@pytest.fixture(scope="module")
def names(fixture):
    return [str(n) for n in fixture["names"]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, harness, fixture, names):
    tmp = tmp_path_factory.mktemp("keras_infer")
    import_keras(H5, "voc12", [str(s) for s in fixture["overrides"]], tmp / "run")
    files = {n: {"jpg": fixture[f"jpg_{n}"].tobytes(), "png": fixture[f"png_{n}"].tobytes()} for n in names}
    data = harness.write_folder(tmp / "voc", files)
    return tmp, data


def _compare(harness, fixture, names, prepared, extra=(), tag="plain", against=None):
    tmp, data = prepared
    summary = harness.run_vitpcm(tmp / "run", data, tmp / f"pseudo_{tag}", extra)
    assert summary["scale"] == 960 and summary["images"] == len(names)
    out = Path(summary["out"])
    rows = {}
    for n in names:
        ref = {k: fixture[f"{k}_{n}"] for k in ("present", "probs", "crf_in", "seg")}
        npz = dict(np.load(out / "probs" / f"{n}.npz"))
        mask = np.asarray(Image.open(out / "masks" / f"{n}.png"))
        # the voc12 preset stores the authors' CRF input (infer.probs_resize=skimage); =mask: their mask's
        against = against or ("probs" if "infer.probs_resize=mask" in extra else "crf_in")
        rows[n] = harness.compare_image(ref, npz, mask, against)
    return rows


def test_fixture_is_small_and_covers_both_tag_rules(fixture, names):
    assert NPZ.stat().st_size < 400_000
    present = {n: fixture[f"present_{n}"].tolist() for n in names}
    assert any(0 in p for p in present.values()) and any(0 not in p for p in present.values()), present


def test_infer_matches_authors_test(harness, fixture, names, prepared):
    rows = _compare(harness, fixture, names, prepared)
    for n, r in rows.items():
        assert r["same_classes"], (n, r["classes_vitpcm"], r["classes_authors"])
        assert r["probs_max_abs_diff"] <= harness.PROB_TOL, (n, r["probs_max_abs_diff"])
        assert r["mask_equal_pct"] >= harness.MASK_MIN_EQUAL * 100, (n, r["mask_equal_pct"])
        assert r["pass"]


def test_probs_resized_as_the_mask_match_the_probabilities_of_the_authors_mask(harness, fixture, names, prepared):
    rows = _compare(harness, fixture, names, prepared, ["infer.probs_resize=mask"], tag="probs_mask")
    for n, r in rows.items():
        assert r["probs_against"] == "probs" and r["pass"], (n, r)


@pytest.mark.parametrize(
    "switch",
    [
        "input.align_corners=false",  # resize of the input and of the probabilities
        "infer.merge_labels=false",  # the tag merge of model.infer
        "data.background_tag=always",  # the grey photo has no background pixel
        "infer.probs_resize=mask",  # checked against the CRF input all the same: must fail
    ],
)
def test_comparison_fails_when_a_switch_drifts(harness, fixture, names, prepared, switch):
    tag = switch.split("=")[0].replace(".", "_")
    rows = _compare(harness, fixture, names, prepared, [switch], tag=tag, against="crf_in")
    assert not all(r["pass"] for r in rows.values()), (switch, rows)
