"""`vitpcm predict` (issue 20): masks for new, untagged images with a trained run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datafix import jpeg_bytes, noise_image, save_jpg
from torchrun_pair import one_and_two_ranks
from vitpcm.cli import main
from vitpcm.data.transforms import EvalTransform
from vitpcm.errors import VitpcmError
from vitpcm.images import load_rgb
from vitpcm.io import read_mask_png
from vitpcm.models.predict import tags_from_scores, upsample
from vitpcm.models.vitpcm import merge_class_labels
from vitpcm.stages.load import load_run
from vitpcm.stages.predict import predict, predict_images

CLASSES = ["background", "sun", "leaf", "brick", "star", "ring"]  # the synthetic set's


@pytest.fixture()
def photos(tmp_path, synth_root) -> Path:
    """Four val images in a folder with a sub-folder: x/a.jpg, x/b.jpg, x/trip/c.jpg, x/trip/d.jpg."""
    folder = tmp_path / "photos"
    for i, rel in enumerate(["a", "b", "trip/c", "trip/d"]):
        dst = folder / f"{rel}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_root / "JPEGImages" / f"val_{i:05d}.jpg", dst)
    return folder


def _expected_mask(run: Path, image_path: Path, tags: torch.Tensor | None, threshold: float) -> tuple:
    """The mask computed here from the model directly: tags given or pooled >= threshold,
    merged, upsampled, argmax. Returns (mask, tags used)."""
    model, info = load_run(run)
    norm = info["normalisation"]
    image = torch.from_numpy(load_rgb(image_path)).permute(2, 0, 1)
    x = EvalTransform(32, mean=norm["mean"], std=norm["std"]).prepare(image)[None]
    with torch.no_grad():
        out = model(x)
    if tags is None:
        tags = tags_from_scores(out["pooled"][0], threshold)
    grid = merge_class_labels(out["probs"].float(), tags[None])[0]
    return upsample(grid, tuple(image.shape[1:])).argmax(0).numpy().astype(np.uint8), tags, out["pooled"][0]


def test_folder_without_tags_writes_every_output(run, photos, tmp_path):
    out = tmp_path / "out"
    threshold = 0.18  # the tiny model's scores sit near 1/6: some classes on, some off
    summary = predict_images(run, [photos], out=out, threshold=threshold, crf=True, overlay=True,
                             overrides=["crf.workers=1"], progress=False)  # fmt: skip
    records = summary["records"]
    assert [r["name"] for r in records] == ["a", "b", "trip/c", "trip/d"]  # relative paths kept, input order
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert lines == records
    for r in records:
        name = r["name"]
        src = photos / f"{name}.jpg"
        mask = read_mask_png(out / "masks" / f"{name}.png")
        expected, tags, pooled = _expected_mask(run, src, None, threshold)
        np.testing.assert_array_equal(mask, expected)
        assert r["tags_from"] == "scores" and r["threshold"] == threshold
        assert r["tags"] == [CLASSES[c] for c in torch.nonzero(tags).flatten().tolist() if c]
        assert r["scores"] == pytest.approx({c: float(s) for c, s in zip(CLASSES, pooled)}, abs=1e-4)
        assert r["size"] == list(mask.shape) == list(Image.open(src).size[::-1])
        shares = np.bincount(mask.ravel(), minlength=len(CLASSES)) / mask.size
        assert r["share"] == pytest.approx({CLASSES[c]: s for c, s in enumerate(shares) if s > 0}, abs=1e-4)
        assert set(np.unique(mask).tolist()) <= {0, *torch.nonzero(tags).flatten().tolist()}
        with np.load(out / "probs" / f"{name}.npz") as z:  # as infer's, plus the pooled scores
            assert z["probs"].shape[1:] == mask.shape
            assert z["classes"].tolist() == torch.nonzero(tags).flatten().tolist()
            np.testing.assert_allclose(z["pooled"], pooled.numpy(), atol=1e-6)
        assert read_mask_png(out / "crf" / f"{name}.png").shape == mask.shape
        overlay = Image.open(out / "overlays" / f"{name}.jpg")
        assert overlay.format == "JPEG" and overlay.size[0] == mask.shape[1] and overlay.size[1] > mask.shape[0]
    assert summary["computed"] == 4 and summary["images_per_second"] > 0


def test_given_tags_decide_the_classes(run, photos, tmp_path):
    records = predict(run, [photos / "a.jpg", str(photos / "trip" / "*.jpg")], out=tmp_path / "o", tags="sun, ring",
                      progress=False)  # fmt: skip
    assert [r["name"] for r in records] == ["a", "c", "d"]  # a glob names below its folder
    for r in records:
        src = photos / ("a.jpg" if r["name"] == "a" else f"trip/{r['name']}.jpg")
        given = torch.tensor([1.0, 1, 0, 0, 0, 1])
        expected, _, _ = _expected_mask(run, src, given, 0.5)
        np.testing.assert_array_equal(read_mask_png(tmp_path / "o" / "masks" / f"{r['name']}.png"), expected)
        assert r["tags"] == ["sun", "ring"] and r["tags_from"] == "given" and r["threshold"] is None


def test_tags_file_for_some_images(run, photos, tmp_path):
    (tmp_path / "tags.csv").write_text("a.jpg,leaf\n")
    records = predict(run, [photos], out=tmp_path / "o", tags_file=tmp_path / "tags.csv", threshold=0.9,
                      progress=False)  # fmt: skip
    by_name = {r["name"]: r for r in records}
    assert by_name["a"]["tags"] == ["leaf"] and by_name["a"]["tags_from"] == "given"
    assert by_name["b"]["tags"] == [] and by_name["b"]["tags_from"] == "scores"  # no score reaches 0.9
    assert np.unique(read_mask_png(tmp_path / "o" / "masks" / "b.png")).tolist() == [0]


def test_rerun_skips_finished_images(run, photos, tmp_path):
    out = tmp_path / "o"
    first = predict_images(run, [photos], out=out, threshold=0.2, progress=False)
    times = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")}
    again = predict_images(run, [photos], out=out, threshold=0.2, progress=False)
    assert (again["computed"], again["resumed"]) == (0, 4)
    assert again["records"] == first["records"]  # the records come back from the stamps
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*.png")} == times
    assert predict_images(run, [photos], out=out, threshold=0.3, progress=False)["computed"] == 4  # other threshold
    later = time.time() + 10
    os.utime(photos / "b.jpg", (later, later))  # a changed image: that one again
    assert predict_images(run, [photos], out=out, threshold=0.3, progress=False)["computed"] == 1
    (out / "probs" / "a.npz").unlink()  # a lost npz: that one again
    assert predict_images(run, [photos], out=out, threshold=0.3, progress=False)["computed"] == 1
    assert predict_images(run, [photos], out=out, threshold=0.3, overwrite=True, progress=False)["computed"] == 4


def test_awkward_images_follow_the_displayed_view(run, tmp_path):
    folder = tmp_path / "awkward"
    folder.mkdir()
    rgb = noise_image(40, 48, 0)
    Image.fromarray(rgb[..., 0]).save(folder / "grey.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "grey16.png")
    stored = Image.fromarray(noise_image(40, 64, 5))  # stored 64 wide x 40 high, displayed 40 x 64
    exif = stored.getexif()
    exif[0x0112] = 6
    (folder / "rotated.jpg").write_bytes(jpeg_bytes(np.asarray(stored), exif=exif))
    records = {r["name"]: r for r in predict(run, [folder], out=tmp_path / "o", overlay=True, progress=False)}
    assert records["rotated"]["size"] == [64, 40]
    assert read_mask_png(tmp_path / "o" / "masks" / "rotated.png").shape == (64, 40)
    assert Image.open(tmp_path / "o" / "overlays" / "rotated.jpg").size[0] == 40
    assert {n: r["size"] for n, r in records.items() if n != "rotated"} == {
        n: [40, 48] for n in ("grey", "cmyk", "grey16")
    }


def test_bad_images_are_listed_before_any_work(run, photos, tmp_path):
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "trip" / "broken.jpg").write_bytes(jpeg_bytes(noise_image(30, 30, 1))[:200])
    out = tmp_path / "o"
    with pytest.raises(VitpcmError) as err:
        predict(run, [photos], out=out, progress=False)
    text = str(err.value)
    assert "2 unreadable image(s)" in text and "empty.jpg" in text and "broken.jpg" in text
    assert not out.exists()  # nothing written
    records = predict(run, [photos], out=out, skip_bad=True, progress=False)
    assert [r["name"] for r in records] == ["a", "b", "trip/c", "trip/d"]
    skipped = (out / "skipped.txt").read_text()
    assert "empty" in skipped and "trip/broken" in skipped


def test_names_that_clash_are_refused_before_any_work(run, photos, tmp_path):
    other = tmp_path / "other"
    save_jpg(other / "a.jpg", noise_image(20, 20, 2))
    out = tmp_path / "o"
    with pytest.raises(VitpcmError, match="same output name"):
        predict(run, [photos, other / "a.jpg"], out=out, progress=False)
    assert not out.exists()
    # the same file twice is one image
    assert len(predict(run, [photos / "a.jpg", str(photos / "*.jpg")], out=out, progress=False)) == 2


def _cli(argv, capsys) -> tuple:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("no-checkpoint", "holds no checkpoints/best.pt"),
        ("no-image", "matches no image"),
        ("no-path", "not found"),
        ("unknown-tag", "'dog', unknown to this run; its classes are: sun, leaf, brick, star, ring"),
        ("threshold-0", "outside (0, 1)"),
        ("threshold-1.5", "outside (0, 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, expect, run, photos, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["predict", str(run), str(photos), "--out", str(out), "-q"]
    if case == "no-checkpoint":
        shutil.rmtree(run / "checkpoints")
    elif case == "no-image":
        (tmp_path / "empty").mkdir()
        argv[2] = str(tmp_path / "empty" / "*.jpg")
    elif case == "no-path":
        argv[2] = str(tmp_path / "nowhere")
    elif case == "unknown-tag":
        argv += ["--tags", "sun,dog"]
    else:
        argv += ["--threshold", case.split("-")[1]]
    code, err = _cli(argv, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("vitpcm predict: error:") and expect in err[0], err
    assert not out.exists()


def test_cli_prints_where_the_outputs_are(run, photos, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["predict", str(run), str(photos / "a.jpg"), "--out", str(out), "--overlay", "-q",
                 "infer.batch_size=2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert f"wrote 1 masks to {out / 'masks'}" in text and "predictions.jsonl" in text
    assert (out / "overlays" / "a.jpg").is_file()


def test_torchrun_two_cpu_ranks_write_what_one_process_writes(run, photos, tmp_path):
    tail = ["predict", str(run), str(photos), "--threshold", "0.18", "--crf", "--overlay", "crf.workers=1", "-q"]
    _, two = one_and_two_ranks(tail, tmp_path)
    assert two.stdout.count("wrote 4 masks") == 1  # rank 0 speaks
    a, b = tmp_path / "one", tmp_path / "two"
    names = ["a", "b", "trip/c", "trip/d"]
    for name in names:
        for sub in ("masks", "crf"):
            np.testing.assert_array_equal(
                read_mask_png(a / sub / f"{name}.png"), read_mask_png(b / sub / f"{name}.png")
            )
        assert (b / "overlays" / f"{name}.jpg").is_file()

    def records(folder: Path) -> list:
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in rows]

    assert records(a) == records(b) and [r["name"] for r in records(b)] == names


def test_tta_path(run, photos, tmp_path):
    """--tta with one scale and no flip is exactly plain inference (predict_tta's one-view
    case); with flips it is another setting: recomputed, same names and sizes."""
    plain = predict(run, [photos], out=tmp_path / "plain", threshold=0.2, progress=False)
    one = predict(run, [photos], out=tmp_path / "tta", threshold=0.2, tta=True, progress=False,
                  overrides=["infer.tta_scales=[1.0]", "infer.tta_flip=false"])  # fmt: skip
    for a, b in zip(plain, one):
        np.testing.assert_array_equal(read_mask_png(tmp_path / "plain" / "masks" / f"{a['name']}.png"),
                                      read_mask_png(tmp_path / "tta" / "masks" / f"{b['name']}.png"))  # fmt: skip
        assert a["scores"] == b["scores"] and a["tags"] == b["tags"]
    flipped = predict_images(run, [photos], out=tmp_path / "tta", threshold=0.2, tta=True, progress=False,
                             overrides=["infer.tta_scales=[0.75,1.0]"])  # fmt: skip
    assert flipped["computed"] == 4 and flipped["tta"] == {"sizes": [24, 32], "flip": True}
    assert [r["size"] for r in flipped["records"]] == [r["size"] for r in plain]


def test_big_images_keep_smaller_probabilities_and_a_full_size_mask(run, photos, tmp_path):
    records = predict(run, [photos / "a.jpg"], out=tmp_path / "o", threshold=0.2, crf=True, progress=False,
                      overrides=["infer.max_side=64", "crf.workers=1"])  # fmt: skip
    h, w = records[0]["size"]
    assert max(h, w) > 64
    with np.load(tmp_path / "o" / "probs" / "a.npz") as z:
        assert max(z["probs"].shape[1:]) == 64 and z["size"].tolist() == [h, w]
    assert read_mask_png(tmp_path / "o" / "masks" / "a.png").shape == (h, w)
    assert read_mask_png(tmp_path / "o" / "crf" / "a.png").shape == (h, w)  # the CRF upsamples
