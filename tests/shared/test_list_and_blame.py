"""Small items of issue 12: a split-list line with a space is not cut silently; evaluate
blames the file that holds a value outside the class list."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from vitpcm.cli import main
from vitpcm.io import read_names, save_mask_png


def test_a_list_line_with_a_space_warns_and_known_columns_do_not(tmp_path, caplog):
    lst = tmp_path / "val.txt"
    lst.write_text("a 1\nb -1\n/JPEGImages/c.jpg /SegmentationClassAug/c.png\nd\n")
    with caplog.at_level(logging.WARNING):
        assert read_names(lst) == ["a", "b", "c", "d"]
    assert not caplog.records  # VOC's class column and SBD's mask path are columns
    lst.write_text("a\nmy photo.jpg\nholiday 2019 beach\n")
    with caplog.at_level(logging.WARNING):
        assert read_names(lst) == ["a", "my", "holiday"]
    assert "2 line(s) hold a space, e.g. line 2 'my photo.jpg': only 'my' is used" in caplog.text


@pytest.mark.parametrize("where", ["gt", "pred"])
def test_evaluate_blames_the_file_with_the_value_outside_the_classes(tmp_path, capsys, where):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    good = np.zeros((8, 8), np.uint8)
    good[2:5, 2:5] = 1
    bad = good.copy()
    bad[0, 0] = 4  # the class list has background + 1 class
    save_mask_png(tmp_path / "gt/x.png", bad if where == "gt" else good)
    save_mask_png(tmp_path / "pred/x.png", bad if where == "pred" else good)
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--classes",
               str(tmp_path / "classes.txt"), "-q"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / where / "x.png") in err
    assert str(tmp_path / ("pred" if where == "gt" else "gt") / "x.png") not in err
    assert ("ground-truth value 4" if where == "gt" else "predicted value 4") in err
