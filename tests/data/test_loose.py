"""Images without a dataset (`vitpcm predict`'s inputs): names, globs, clashes, tags."""

from __future__ import annotations

import numpy as np
import pytest

from vitpcm.data.loose import LooseImages, collect_images, parse_tag_list, tags_from_file
from vitpcm.errors import VitpcmError

CLASSES = ["background", "cat", "dog", "person"]


@pytest.fixture()
def tree(tmp_path):
    for rel in ["a.jpg", "b.PNG", "sub/c.jpeg", "sub/deeper/d.webp", ".hidden/e.jpg", "sub/.f.jpg", "notes.txt"]:
        p = tmp_path / "photos" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # contents do not matter here: decoding is the screen's job
    return tmp_path / "photos"


def test_folders_files_and_globs_name_their_images(tree):
    found = collect_images([tree])
    assert list(found) == ["a", "b", "sub/c", "sub/deeper/d"]  # hidden files and non-images left out
    assert found["sub/c"] == tree / "sub" / "c.jpeg"
    assert list(collect_images([tree / "sub" / "c.jpeg"])) == ["c"]
    assert list(collect_images([str(tree / "sub" / "**" / "*.webp")])) == ["deeper/d"]  # below the glob's folder
    assert list(collect_images([str(tree / "su*")])) == ["c", "deeper/d"]  # a matched folder: as a folder input
    # the same file twice is one image; input order is kept
    assert list(collect_images([tree / "b.PNG", tree, tree / "a.jpg"])) == ["b", "a", "sub/c", "sub/deeper/d"]


def test_a_home_folder_glob_is_expanded(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert list(collect_images(["~/photos/sub/**/*.webp"])) == ["deeper/d"]
    assert list(collect_images(["~/photos/a.jpg"])) == ["a"]


def test_inputs_that_find_nothing_or_clash(tree, tmp_path):
    with pytest.raises(VitpcmError, match="not found"):
        collect_images([tmp_path / "nowhere"])
    with pytest.raises(VitpcmError, match="matches no image"):
        collect_images([str(tree / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitpcmError, match="matches no image"):
        collect_images([tmp_path / "empty"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.png").write_bytes(b"x")
    with pytest.raises(VitpcmError, match=r"same output name: .*a\.jpg and .*a\.png -> a"):
        collect_images([tree, tmp_path / "other" / "a.png"])
    with pytest.raises(VitpcmError, match="at least one INPUT"):
        collect_images([])


def test_tags_from_the_command_line_and_a_file(tree, tmp_path):
    assert parse_tag_list("cat, person", CLASSES).tolist() == [1, 1, 0, 1]
    assert parse_tag_list("dog;background", CLASSES).tolist() == [1, 0, 1, 0]
    with pytest.raises(VitpcmError, match="'horse', unknown to this run; its classes are: cat, dog, person"):
        parse_tag_list("cat,horse", CLASSES)
    files = collect_images([tree])
    (tmp_path / "tags.csv").write_text("a.jpg,cat\nsub/c,dog;person\nzzz.jpg,cat\n")
    tags = tags_from_file(tmp_path / "tags.csv", CLASSES, files)
    assert {n: v.tolist() for n, v in tags.items()} == {"a": [1, 1, 0, 0], "sub/c": [1, 0, 1, 1]}
    (tmp_path / "bad.csv").write_text("a.jpg,cow\n")
    with pytest.raises(VitpcmError, match="'cow', unknown to this run"):
        tags_from_file(tmp_path / "bad.csv", CLASSES, files)


def test_every_sample_carries_labels_and_whether_they_are_known(tmp_path):
    from PIL import Image

    for n in ("x", "y"):
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / f"{n}.png")
    files = collect_images([tmp_path])
    ds = LooseImages(files, CLASSES, {"x": parse_tag_list("cat", CLASSES)})
    x, y = ds[0], ds[1]
    assert x["tagged"] and x["labels"].tolist() == [1, 1, 0, 0]
    assert not y["tagged"] and y["labels"].tolist() == [0, 0, 0, 0] and y["size"] == (5, 7)
