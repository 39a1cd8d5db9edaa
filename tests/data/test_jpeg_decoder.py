"""``data.jpeg_decoder=tf``: JPEGs decoded as the authors' ``tf.image.decode_jpeg`` decodes them.

The reference pixels in ``tests/fixtures/jpeg_tf_decode.npz`` were written by TensorFlow 2.21's
``decode_jpeg(channels=3)`` (default ``dct_method``) from the JPEG bytes stored beside them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitpcm.config import load_config
from vitpcm.data import build_dataset
from vitpcm.errors import VitpcmError
from vitpcm.images import ImageReadError, decode_image

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "jpeg_tf_decode.npz"


@pytest.mark.parametrize("kind", ["colour", "grey"])
def test_tf_decoder_gives_tensorflows_pixels_and_pillow_does_not(tmp_path, kind):
    ref = np.load(FIXTURE)
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(ref[f"{kind}_jpeg"].tobytes())
    ours, notes = decode_image(path, "tf")
    np.testing.assert_array_equal(ours, ref[f"{kind}_tf"])
    assert ("greyscale" in notes) == (kind == "grey")
    pillow, _ = decode_image(path)
    assert pillow.shape == ours.shape and (pillow != ours).mean() > 0.3  # the accurate IDCT: another image


def test_tf_decoder_ignores_exif_orientation_as_tensorflow_does(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif)
    assert decode_image(path)[0].shape == (30, 20, 3)  # as displayed
    arr, notes = decode_image(path, "tf")
    assert arr.shape == (20, 30, 3) and "EXIF orientation ignored (data.jpeg_decoder=tf)" in notes


def test_tf_decoder_reports_a_truncated_jpeg_and_leaves_other_formats_to_pillow(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError):
        decode_image(cut, "tf")
    png = tmp_path / "mask_like.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "L").save(png)
    np.testing.assert_array_equal(decode_image(png, "tf")[0], decode_image(png)[0])


def test_the_dataset_decodes_with_the_configured_decoder(synth_root):
    datasets = {d: build_dataset(load_config("synthetic", [f"data.root={synth_root}", f"data.jpeg_decoder={d}"]).data,
                                 "val") for d in ("pillow", "tf")}  # fmt: skip
    first = datasets["tf"].names[0]
    path = datasets["tf"].image_path(first)
    assert path.suffix == ".jpg"
    np.testing.assert_array_equal(datasets["tf"].raw(0)["image"].permute(1, 2, 0).numpy(), decode_image(path, "tf")[0])
    assert not np.array_equal(datasets["tf"].raw(0)["image"].numpy(), datasets["pillow"].raw(0)["image"].numpy())


def test_presets_and_bad_values():
    assert load_config("voc12").data.jpeg_decoder == "tf" and load_config("coco14").data.jpeg_decoder == "tf"
    assert load_config("synthetic").data.jpeg_decoder == "pillow"
    with pytest.raises(VitpcmError, match="data.jpeg_decoder"):
        load_config("synthetic", ["data.jpeg_decoder=opencv"])
