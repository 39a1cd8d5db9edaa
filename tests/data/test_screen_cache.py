"""The screening cache (data/check.py): a second start on an unchanged dataset decodes no
file, a changed file is read again, and an unwritable cache folder only costs the cache."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import vitpcm.data.base as base
import vitpcm.data.voc as voc
from vitpcm.data.check import CheckCache, check_before_training, check_cache_dir, check_dataset
from vitpcm.data.synthetic import generate
from vitpcm.data.voc import VOCDataset
from vitpcm.errors import VitpcmError
from vitpcm.io import save_mask_png


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen") / "data"
    generate(root, n_train=6, n_val=2, seed=5, workers=1, progress=False)
    return root


@pytest.fixture()
def data(pristine, tmp_path):
    """A private copy: tests touch and break files."""
    root = tmp_path / "data"
    shutil.copytree(pristine, root)
    return root


@pytest.fixture()
def reads(monkeypatch):
    """Counts every image decode and mask read done through the datasets."""
    count = {"image": 0, "mask": 0}
    decode, read_mask = base.decode_image, voc.read_mask_png

    def counting_decode(path, *args):
        count["image"] += 1
        return decode(path, *args)

    def counting_mask(path):
        count["mask"] += 1
        return read_mask(path)

    monkeypatch.setattr(base, "decode_image", counting_decode)
    monkeypatch.setattr(voc, "read_mask_png", counting_mask)
    return count


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("VITPCM_CACHE_DIR", str(folder))
    return folder / "screen"


def _screen(root, run, **kw):
    ds = VOCDataset(root, "train", strict=False)
    check_before_training([ds], run, skip_bad=kw.pop("skip_bad", False), progress=False, workers=1, **kw)
    return ds


def test_second_screening_reads_nothing(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    assert reads == {"image": 6, "mask": 6}
    files = list(cache_dir.glob("*.json"))
    assert len(files) == 1
    ident, items = (json.loads(line) for line in files[0].read_text().splitlines())
    assert ident["split"] == "train" and len(items) == 6
    mtime = files[0].stat().st_mtime_ns

    reads.update(image=0, mask=0)
    ds = _screen(data, tmp_path / "run")
    assert reads == {"image": 0, "mask": 0}
    assert len(ds) == 6
    assert files[0].stat().st_mtime_ns == mtime  # nothing changed: not rewritten


def test_cached_report_equals_a_fresh_read(data, reads, cache_dir):
    ds = VOCDataset(data, "train", strict=False)
    fresh = check_dataset(ds, "train", workers=1, progress=False)
    sc = CheckCache(ds, cache_dir)
    check_dataset(ds, "train", workers=1, progress=False, cache=sc)
    sc.save()
    again = CheckCache(VOCDataset(data, "train", strict=False), cache_dir)
    cached = check_dataset(again.ds, "train", workers=2, progress=False, cache=again)
    assert cached.from_cache == 6 and again.reads == 0
    assert cached.to_dict() == fresh.to_dict()
    assert [(i.name, i.size, i.tags, i.notes) for i in cached.items] == [
        (i.name, i.size, i.tags, i.notes) for i in fresh.items
    ]


def test_touched_file_is_read_again(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    image = data / "JPEGImages" / "train_00002.jpg"
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, newer mtime
    reads.update(image=0, mask=0)
    _screen(data, tmp_path / "run")
    assert reads == {"image": 1, "mask": 1}
    reads.update(image=0, mask=0)
    _screen(data, tmp_path / "run")  # and cached again after that
    assert reads == {"image": 0, "mask": 0}


def test_changed_mask_is_found_broken(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    mask = data / "SegmentationClass" / "train_00001.png"
    bad = np.full((8, 8), 9, np.uint8)  # wrong size and a value outside the 6 classes
    save_mask_png(mask, bad)
    with pytest.raises(VitpcmError, match="train_00001"):
        _screen(data, tmp_path / "run")
    # skip_bad drops it, also when the verdict comes from the cache
    reads.update(image=0, mask=0)
    ds = _screen(data, tmp_path / "run", skip_bad=True)
    assert "train_00001" not in ds.names and len(ds) == 5
    assert reads == {"image": 0, "mask": 0}  # the broken verdict was cached too
    assert "train_00001" in (tmp_path / "run" / "skipped.txt").read_text()


def test_moved_dataset_and_other_split_have_their_own_entry(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    reads.update(image=0, mask=0)
    _screen(moved, tmp_path / "run")
    assert reads["image"] == 6  # another root: read
    assert len(list(cache_dir.glob("*.json"))) == 2


def test_class_list_change_invalidates(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    classes = (data / "classes.txt").read_text().split()
    (data / "classes.txt").write_text("\n".join(classes + ["extra"]) + "\n")
    reads.update(image=0, mask=0)
    _screen(data, tmp_path / "run")
    assert reads["image"] == 6


def test_read_only_dataset_and_unwritable_cache(data, tmp_path, reads, monkeypatch):
    # the cache folder cannot be created (a file is in the way): screening still works, every time
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("VITPCM_CACHE_DIR", str(blocker))
    before = sorted(str(p) for p in data.rglob("*"))
    os.chmod(data, 0o555)
    try:
        _screen(data, tmp_path / "run")
        _screen(data, tmp_path / "run")
    finally:
        os.chmod(data, 0o755)
    assert reads["image"] == 12
    assert sorted(str(p) for p in data.rglob("*")) == before  # nothing is ever written into the dataset


def test_cache_off_and_default_location(data, tmp_path, reads, monkeypatch):
    monkeypatch.setenv("VITPCM_CACHE_DIR", "off")
    assert check_cache_dir() is None
    _screen(data, tmp_path / "run")
    _screen(data, tmp_path / "run")
    assert reads["image"] == 12
    monkeypatch.delenv("VITPCM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert check_cache_dir() == tmp_path / "xdg" / "vitpcm" / "screen"


def test_corrupt_cache_file_is_ignored(data, tmp_path, reads, cache_dir):
    _screen(data, tmp_path / "run")
    (f,) = cache_dir.glob("*.json")
    f.write_text("{not json")
    reads.update(image=0, mask=0)
    _screen(data, tmp_path / "run")
    assert reads["image"] == 6
    assert len(json.loads(f.read_text().splitlines()[1])) == 6  # rewritten whole


def test_cache_of_a_removed_dataset_is_pruned(data, tmp_path, reads, cache_dir):
    gone = tmp_path / "gone"
    shutil.copytree(data, gone)
    _screen(gone, tmp_path / "run")
    (stale,) = cache_dir.glob("*.json")
    shutil.rmtree(gone)
    _screen(data, tmp_path / "run")  # writing another entry prunes the one whose dataset is gone
    assert not stale.exists() and len(list(cache_dir.glob("*.json"))) == 1


def test_the_older_screen_names_are_the_check():
    """check and screen were two verbs for one read: the screen_* names stay as aliases."""
    import vitpcm.data.check as check

    assert check.screen_items is check.check_items
    assert check.screen_for_training is check.check_before_training
    assert check.ScreenCache is check.CheckCache
    assert check.screen_cache_dir is check.check_cache_dir
