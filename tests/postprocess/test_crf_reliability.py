"""`vitpcm crf` (and the other process pools) under faults (issue 12): no orphans after
kill -9, parameters changed between runs, big images, the memory budget, full disk and
read-only folders; under torchrun without torch (issue 11): the files of one process."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.postprocess.test_crf import _scene, _write_folder

from vitpcm.atomic import atomic_path, save_npz_atomic
from vitpcm.cli import main
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.postprocess.crf import crf_labels, crf_labels_bounded
from vitpcm.postprocess.crf_runner import run_crf
from vitpcm.utils.pools import budget_workers, memory_budget, parse_size, process_pool
from vitpcm.utils.shard import Shard, done_marker, wait_for_ranks, write_done

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


# ------------------------------------------------------------------------------ orphans
def _children(pid: int) -> list:
    """Live (not zombie) processes whose parent is ``pid``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie is dead, only not yet reaped by PID 1


def _kill_parent_and_watch_workers(cmd: list, cwd: Path, n_workers: int = 2) -> None:
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        workers: list = []
        while time.time() < deadline and len(workers) < n_workers:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert len(workers) >= n_workers, "the pool never started"
        time.sleep(0.3)  # the workers are busy now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.05)
        left = [w for w in workers if _alive(w)]
        for w in left:  # do not leave them to the next test
            os.kill(w, signal.SIGKILL)
        assert not left, f"workers {left} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@linux_only
def test_crf_workers_die_with_a_killed_parent(tmp_path):
    _write_folder(tmp_path, 6, size=(200, 260))
    cmd = [sys.executable, "-m", "vitpcm", "crf", "--probs", str(tmp_path / "probs"), "--images",
           str(tmp_path / "images"), "--out", str(tmp_path / "o"), "--workers", "2", "crf.iterations=200", "-q"]  # fmt: skip
    _kill_parent_and_watch_workers(cmd, tmp_path)


@linux_only
def test_synth_workers_die_with_a_killed_parent(tmp_path):
    cmd = [sys.executable, "-m", "vitpcm", "synth", "--out", str(tmp_path / "d"), "--train", "4000", "--val", "0",
           "--workers", "2", "-q"]  # fmt: skip
    _kill_parent_and_watch_workers(cmd, tmp_path)


_WATCHDOG_ONLY = """
import multiprocessing, os, sys, time
import vitpcm.utils.pools as pools

def child(parent):
    pools.sys.platform = "darwin"  # no prctl: only the parent-pid watchdog guards this child
    pools.die_with_parent(parent)
    time.sleep(60)

if __name__ == "__main__":
    p = multiprocessing.get_context("fork").Process(target=child, args=(os.getpid(),))
    p.start()
    p.join()
"""


@linux_only
def test_the_parent_watchdog_alone_ends_an_orphan(tmp_path):
    """Where prctl does not exist (macOS, BSD), the watchdog thread ends the worker."""
    (tmp_path / "watch.py").write_text(_WATCHDOG_ONLY)
    _kill_parent_and_watch_workers([sys.executable, str(tmp_path / "watch.py")], tmp_path, n_workers=1)


def _boom(x):
    raise RuntimeError(f"boom {x}")


def _sleep(x):
    time.sleep(x)
    return x


def test_process_pool_ends_its_workers_on_an_error():
    with pytest.raises(RuntimeError, match="boom"):
        with process_pool(2) as pool:
            slow = pool.submit(_sleep, 30)  # would hold a plain shutdown(wait=True) for 30 s
            pool.submit(_boom, 1).result()
    assert slow.cancelled() or slow.done()
    assert not [p for p in (pool._processes or {}).values() if p.is_alive()]


def _stall_in_write(path: str, flag: str) -> None:
    """Open an atomic write of ``path``, say so, and stall inside it."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        Path(flag).touch()
        time.sleep(30)


def test_a_worker_stopped_mid_write_leaves_no_temporary(tmp_path):
    """The pool ends the other workers when one fails (the CRF's full disk): one stopped
    inside an atomic write removes its .NAME.PID-XXXX.tmp (a flaky leftover before)."""
    flag = tmp_path / "writing"
    with pytest.raises(RuntimeError, match="boom"):
        with process_pool(2) as pool:
            pool.submit(_stall_in_write, str(tmp_path / "im.png"), str(flag))
            deadline = time.time() + 20
            while not flag.exists() and time.time() < deadline:
                time.sleep(0.02)
            assert flag.exists()
            pool.submit(_boom, 1).result()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]


# ------------------------------------------------------------------------------ resume
def test_other_parameters_make_finished_masks_stale(tmp_path):
    _write_folder(tmp_path, 3)
    args = (tmp_path / "probs", tmp_path / "images", tmp_path / "o")
    assert run_crf(*args, workers=1, progress=False)["computed"] == 3
    assert run_crf(*args, workers=1, progress=False)["computed"] == 0
    s = run_crf(*args, params={"iterations": 2}, workers=1, progress=False)
    assert (s["computed"], s["skipped"]) == (3, 0)
    image, probs, classes, _ = _scene(0)
    assert np.array_equal(read_mask_png(tmp_path / "o/im0.png"), crf_labels(image, probs, classes, s_params(2)))
    lattice = {"iterations": 2, "gaussian": "lattice"}  # how the smoothness kernel is computed counts too
    assert run_crf(*args, params=lattice, workers=1, progress=False)["computed"] == 3
    assert run_crf(*args, params=lattice, workers=1, progress=False)["computed"] == 0


def s_params(iterations):
    from vitpcm.crf_params import CRFParams

    return CRFParams(iterations=iterations)


# ------------------------------------------------------------------------------ big inputs
def test_big_images_are_solved_at_max_pixels_and_upsampled(tmp_path):
    image, probs, classes, _ = _scene(4, 120, 160)
    full = crf_labels(image, probs, classes)
    small, reduced = crf_labels_bounded(image, probs, classes, max_pixels=4800)
    assert reduced and small.shape == (120, 160) and small.dtype == np.uint8
    assert (small == full).mean() > 0.95
    same, reduced = crf_labels_bounded(image, probs, classes, max_pixels=120 * 160)
    assert not reduced and np.array_equal(same, full)  # at or under the bound: the plain CRF

    (tmp_path / "images").mkdir()
    Image.fromarray(image).save(tmp_path / "images/big.png")
    save_npz_atomic(tmp_path / "probs/big.npz", probs=probs, classes=classes)
    s = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", workers=1, max_pixels=4800, progress=False)
    assert (s["reduced"], s["max_pixels"]) == (1, 4800)
    assert np.array_equal(read_mask_png(tmp_path / "o/big.png"), small)

    # probabilities stored smaller than the image (infer.max_side), with its size beside them
    low = np.stack([np.asarray(Image.fromarray(p, mode="F").resize((80, 60), Image.BILINEAR)) for p in probs])
    save_npz_atomic(tmp_path / "probs/big.npz", probs=low / low.sum(0), classes=classes, size=np.array([120, 160]))
    s = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o2", workers=1, max_pixels=0, progress=False)
    assert s["reduced"] == 1 and read_mask_png(tmp_path / "o2/big.png").shape == (120, 160)
    assert (read_mask_png(tmp_path / "o2/big.png") == full).mean() > 0.9


def test_the_worker_count_is_budgeted_by_memory(tmp_path, caplog):
    _write_folder(tmp_path, 4)
    s = run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", workers=2, memory="1M", progress=False)
    assert s["workers"] == 1 and "memory budget" in s["memory_note"]
    assert "memory budget" in caplog.text
    assert budget_workers(8, 3 << 30, 10 << 30)[0] == 3
    assert budget_workers(8, 1 << 30, 10 << 30) == (8, None)
    assert budget_workers(4, 1 << 30, None) == (4, None)  # unknown memory: cores decide
    assert parse_size("8G") == 8 << 30 and parse_size("512M") == 512 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("auto") is None and parse_size(0) is None
    for bad in ("8", "lots", "5ib"):
        with pytest.raises(VitpcmError, match="crf.memory_budget"):
            parse_size(bad, "crf.memory_budget")
    if Path("/proc/meminfo").exists():
        assert memory_budget("auto") > 0 and memory_budget("auto", share=2) <= memory_budget("auto") // 2 + 1
    assert memory_budget("8G", share=4) == 2 << 30


# ------------------------------------------------------------------------------ disk faults
def test_a_full_disk_in_a_worker_is_one_line(tmp_path, monkeypatch, capsys):
    _write_folder(tmp_path, 4)
    real = Path.write_bytes

    def full_disk(self, data):  # inherited by the forked workers
        if self.name.startswith(".im2.png."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "o"
    args = ["crf", "--probs", str(tmp_path / "probs"), "--images", str(tmp_path / "images"), "--out", str(out), "-q"]
    assert main([*args, "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and str(out) in err[0]
    assert not list(out.glob(".*.tmp")) and not (out / "im2.png").exists()
    monkeypatch.undo()
    assert main([*args, "--workers", "2"]) == 0
    assert "already done" in capsys.readouterr().out


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    _write_folder(tmp_path, 2)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = Path.mkdir

    def read_only(self, *args, **kwargs):
        if ro in self.parents:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    args = ["crf", "--probs", str(tmp_path / "probs"), "--images", str(tmp_path / "images")]
    assert main([*args, "--out", str(ro / "o"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0] and str(ro) in err[0]


def test_a_missing_input_creates_no_output_folder(tmp_path):
    _write_folder(tmp_path, 3)
    (tmp_path / "images/im1.png").unlink()
    (tmp_path / "images/im2.png").unlink()
    with pytest.raises(VitpcmError, match=r"no image for 2 name\(s\) .*: im1, im2;"):
        run_crf(tmp_path / "probs", tmp_path / "images", tmp_path / "o", workers=1, progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ shards
def test_shards_are_disjoint_and_rank0_waits_for_this_launchs_markers(tmp_path, monkeypatch):
    names = [f"n{i}" for i in range(7)]
    parts = [Shard(r, 3).take(names) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(names) and parts[1] == ["n1", "n4"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(VitpcmError, match="RANK=5 and WORLD_SIZE=2"):
        Shard.from_env()

    rank0, rank1 = Shard(0, 2, 2, "launch-b/0"), Shard(1, 2, 2, "launch-b/0")
    write_done(tmp_path, Shard(1, 2, 2, "launch-a/0"), {"computed": 9})  # left by an earlier launch
    with pytest.raises(VitpcmError, match="did not finish"):
        wait_for_ranks(tmp_path, rank0, timeout=0.3, poll=0.05)
    write_done(tmp_path, rank1, {"computed": 2})
    assert wait_for_ranks(tmp_path, rank0, timeout=5) == [{"computed": 2}]
    assert not done_marker(tmp_path, 1).exists()
    write_done(tmp_path, rank1, error="cannot write x: no space left on device")
    with pytest.raises(VitpcmError, match="rank 1 failed: cannot write x"):
        wait_for_ranks(tmp_path, rank0, timeout=5)


def test_vitpcm_crf_under_torchrun_writes_the_files_of_one_process(tmp_path):
    _write_folder(tmp_path, 5)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    tail = ["crf", "--probs", str(tmp_path / "probs"), "--images", str(tmp_path / "images"), "--workers", "1", "-q"]
    one = subprocess.run([sys.executable, "-m", "vitpcm", *tail, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitpcm", *tail, "--out", str(tmp_path / "two")]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote 5 CRF masks") == 1  # rank 0 counts for both ranks
    for i in range(5):
        assert (tmp_path / "one" / f"im{i}.png").read_bytes() == (tmp_path / "two" / f"im{i}.png").read_bytes()
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert (summary["ranks"], summary["computed"], summary["total"]) == (2, 5, 5)
    assert not list((tmp_path / "two").glob(".done-*"))
