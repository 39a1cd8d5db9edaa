"""Fixtures of the stage tests."""

import shutil
from pathlib import Path

import pytest


@pytest.fixture()
def run(tmp_path, tiny_run) -> Path:
    """A copy of the tiny trained run without its outputs (a test may touch its checkpoint)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst, ignore=shutil.ignore_patterns("pseudo", "eval", "figures", "report.html"))
    return dst
