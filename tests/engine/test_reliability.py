"""Faults injected into training, and what must hold after each (docs/reliability.md).

Divergence (an exploding learning rate, NaN weights), kill -9 at a random moment and
SIGTERM / SIGINT (pre-emption), a changed config on resume, two writers on one run folder,
a full disk, a read-only folder, a kill during a save. Tiny data and model (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import TINY
from tests.engine.noisy_toy import NoisyToy, toy_settings
from torch.utils.data import DistributedSampler, RandomSampler

from vitpcm.atomic import DiskError
from vitpcm.cli import main
from vitpcm.config import RESUME_KEYS, load_config, run_config
from vitpcm.engine.checkpoint import checkpoint_config, non_finite_tensors, read_checkpoint, save_checkpoint
from vitpcm.engine.sampling import EpochSampler
from vitpcm.engine.trainer import Trainer, TrainingStopped, TrainSettings
from vitpcm.errors import VitpcmError
from vitpcm.locks import FolderLock
from vitpcm.runs import RunLayout
from vitpcm.stages.config import resolve_config
from vitpcm.stages.train import train

REPO = Path(__file__).resolve().parents[2]
# deterministic, a checkpoint after every step; 12 images in batches of 4: 3 steps per epoch.
# One thread: on a busy 2-core machine two threads make the tiny LSTM 100x slower.
EXACT = ["train.deterministic=true", "train.checkpoint_every=1", "train.device=cpu", "train.threads=1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The trainer sets torch's thread count for the process: put it back for other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_cfg(synth_root, *extra):
    return load_config("synthetic", [*TINY, f"data.root={synth_root}", *EXACT, *extra])


def weights(run: Path, which: str = "last"):
    return read_checkpoint(RunLayout(run).checkpoint(which))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, synth_root) -> Path:
    """A finished 1-epoch run (warm-up phase): its copies are resumed, broken and refused below."""
    run = tmp_path_factory.mktemp("rel") / "one"
    train(tiny_cfg(synth_root, "train.epochs=1"), run, progress=False)
    return run


@pytest.fixture()
def copy_of(one_epoch, tmp_path):
    def make(name: str = "run") -> Path:
        dest = tmp_path / name
        shutil.copytree(one_epoch, dest)
        return dest

    return make


# ------------------------------------------------------------------------ divergence
def test_exploding_loss_stops_before_anything_is_saved(synth_root, tmp_path):
    run = tmp_path / "div"
    with pytest.raises(VitpcmError) as info:
        train(tiny_cfg(synth_root, "train.lr=1e6", "train.warmup_lr=1e6", "train.checkpoint_every=0"), run,
              progress=False)  # fmt: skip
    message = str(info.value)
    assert "above the limit 10000 (train.max_loss) at epoch 1, batch 2/3 (step 2)" in message, message
    assert "no checkpoint was written yet" in message and "\n" not in message
    assert not RunLayout(run).checkpoint("last").exists()


def test_divergence_on_resume_keeps_the_last_good_checkpoint_and_resume_goes_on(copy_of):
    run = copy_of()
    last = RunLayout(run).checkpoint("last")
    before = digest(last)
    with pytest.raises(VitpcmError) as info:
        train(None, run, resume=True, overrides=["train.epochs=2", "train.lr=1e6"], progress=False)
    message = str(info.value)
    assert "at epoch 2, batch" in message and f"the last good checkpoint is {last}" in message, message
    assert digest(last) == before  # untouched: the diverged weights were never saved
    # --resume from it with the run's learning rate finishes the run
    result = train(None, run, resume=True, overrides=["train.epochs=2"], progress=False)
    assert [r["epoch"] for r in RunLayout(run).read_metrics()] == [1, 2]
    assert result["changed"] == {"train.epochs": [1, 2]}
    assert non_finite_tensors(weights(run)["model"]) == []
    rows = [json.loads(line) for line in RunLayout(run).resumes.read_text().splitlines()]
    assert rows[0]["changed"]["train.lr"] == {"from": 0.001, "to": 1e6} and rows[1]["epoch"] == 1


def test_a_nan_model_output_stops_in_one_line_not_in_binary_cross_entropy(synth_root, tmp_path):
    """NaN weights in a live run give NaN probabilities, on which F.binary_cross_entropy would
    raise "all elements of input should be between 0 and 1": one line instead. An lr of 1e30
    overflows the weights at the first update: the next loss is infinite, one line too."""
    from vitpcm.tasks.pcm import PcmTask, train_settings

    cfg = resolve_config(tiny_cfg(synth_root))
    trainer = Trainer(PcmTask(cfg), tmp_path / "nan", train_settings(cfg), progress=False)
    with torch.no_grad():
        trainer.model.classifier.linear.weight[0, 0] = float("nan")
    with pytest.raises(VitpcmError, match=r"the loss became nan at epoch 1, batch 1/3 \(step 1\)"):
        trainer.fit()
    cfg = tiny_cfg(synth_root, "train.warmup_lr=1e30", "train.checkpoint_every=0")
    with pytest.raises(VitpcmError, match=r"the loss became inf at epoch 1, batch 2/3 \(step 2\)"):
        train(cfg, tmp_path / "inf", progress=False)


def test_weights_that_explode_in_the_last_step_are_not_saved(synth_root, tmp_path):
    """The loss of a step is checked before its update; the update itself is checked by one
    forward before the save: the first checkpoint never holds exploded weights."""
    with pytest.raises(VitpcmError) as info:
        train(tiny_cfg(synth_root, "train.warmup_lr=1e6"), tmp_path / "run", progress=False)
    assert "the weights after step 1 give a loss of" in str(info.value)
    assert "at epoch 1, batch 1/3 (step 1, not saved)" in str(info.value)
    assert not RunLayout(tmp_path / "run").checkpoint("last").exists()


def test_init_from_refuses_non_finite_weights(synth_root, one_epoch, tmp_path):
    state = read_checkpoint(RunLayout(one_epoch).checkpoint("best"))
    state["model"]["classifier.linear.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(VitpcmError, match="model.init_from: .* holds non-finite weights .classifier.linear.weight."):
        train(tiny_cfg(synth_root, f"model.init_from={tmp_path / 'nan.pt'}"), tmp_path / "run", progress=False)


def test_infer_refuses_a_checkpoint_with_non_finite_weights(copy_of, capsys):
    run = copy_of()
    for which in ("best", "last"):
        state = weights(run, which)
        state["model"]["classifier.linear.weight"][0, 0] = float("inf")
        torch.save(state, RunLayout(run).checkpoint(which))
    assert main(["infer", str(run), "--split", "val", "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds non-finite weights (classifier.linear.weight)" in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("world", [1, 3])
def test_epoch_sampler_is_torchs_order_from_any_position(world):
    for epoch in (0, 4):
        for rank in range(world):
            if world == 1:
                gen = torch.Generator().manual_seed(7 + epoch)
                torchs = list(RandomSampler(range(10), generator=gen))
            else:
                ds = DistributedSampler(range(10), world, rank, shuffle=True, seed=7)
                ds.set_epoch(epoch)
                torchs = list(ds)
            assert EpochSampler(10, 7, epoch, rank, world).indices() == torchs
            assert list(EpochSampler(10, 7, epoch, rank, world, start=2)) == torchs[2:]
            assert list(EpochSampler(10, 7, epoch, rank, world, start=2, tagged=True))[0] == (epoch, torchs[2])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_mid_epoch_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, signum):
    handler = signal.getsignal(signum)
    Trainer(NoisyToy(), tmp_path / "full", toy_settings(), progress=False).fit()
    run = tmp_path / "cut"
    with pytest.raises(TrainingStopped) as info:
        Trainer(NoisyToy(signal_at=11, signum=signum), run, toy_settings(), progress=False).fit()
    assert info.value.exit_code == 128 + signum
    assert f"saved {RunLayout(run).checkpoint('last')} at epoch 2, batch 3/8" in str(info.value)
    assert "vitpcm train --resume --out" in str(info.value)
    assert weights(run)["position"]["batch"] == 3 and signal.getsignal(signum) == handler
    Trainer(NoisyToy(), run, toy_settings(), resume=True, progress=False).fit()
    assert same_weights(weights(tmp_path / "full")["model"], weights(run)["model"])
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in RunLayout(run).read_metrics()]
    assert strip == [
        {k: v for k, v in r.items() if k != "seconds"} for r in RunLayout(tmp_path / "full").read_metrics()
    ]


def test_a_mid_epoch_position_is_refused_with_another_batch_size(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped):
        Trainer(NoisyToy(signal_at=3), run, toy_settings(), progress=False).fit()
    with pytest.raises(VitpcmError, match=r"middle of epoch 1 with batch size 8 \(now 4\)"):
        Trainer(NoisyToy(), run, TrainSettings(epochs=3, batch_size=4, seed=0, device="cpu"), resume=True)


def _vitpcm(*args: str) -> list:
    return [sys.executable, "-m", "vitpcm.cli", *args, "-q"]


def _wait_for_new_checkpoint(proc: subprocess.Popen, last: Path, before: int, timeout: float = 120.0) -> bool:
    """Poll until ``last`` is replaced (True) or the process ends (False)."""
    end = time.time() + timeout
    while proc.poll() is None and time.time() < end:
        if last.exists() and last.stat().st_mtime_ns != before:
            return True
        time.sleep(0.002)
    return False


def test_sigkill_at_any_moment_then_resume_ends_as_the_uninterrupted_run(synth_root, tmp_path, caplog):
    """kill -9 right after the first checkpoint (mid-epoch) and at a random moment later;
    each --resume (nothing repeated) continues; the final weights and val mIoU are those of
    an uninterrupted run. While the first process runs, a second `train` on its folder is
    refused at once; after the kill, its lock is taken over with a note."""
    overrides = [*TINY, f"data.root={synth_root}", *EXACT, "train.epochs=3"]
    reference = train(load_config("synthetic", overrides), tmp_path / "full", progress=False)
    run = tmp_path / "cut"
    last = RunLayout(run).checkpoint("last")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    seed = int(os.environ.get("VITPCM_KILL_SEED", time.time_ns() % 1000))  # replay a failure with it
    rng = random.Random(seed)
    proc = subprocess.Popen(_vitpcm("train", "synthetic", *overrides, "--out", str(run)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert _wait_for_new_checkpoint(proc, last, 0), proc.communicate()
    started = time.time()
    with pytest.raises(VitpcmError, match=rf"is in use by another vitpcm train \(PID {proc.pid} on "):
        train(load_config("synthetic", overrides), run, progress=False)
    assert time.time() - started < 30  # refused before any data or model is touched
    proc.kill()
    proc.communicate()
    kills = 1
    while True:
        before = last.stat().st_mtime_ns
        proc = subprocess.Popen(_vitpcm("train", "--resume", "--out", str(run)), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if kills < 2 and _wait_for_new_checkpoint(proc, last, before):
            time.sleep(rng.uniform(0.0, 0.5))  # anywhere: in a step, a save, a validation
            if proc.poll() is None:
                proc.kill()
                kills += 1
        out, err = proc.communicate()
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
    resumes = [json.loads(line) for line in RunLayout(run).resumes.read_text().splitlines()]
    assert resumes[0]["epoch"] == 0 and resumes[0]["batch"] >= 1  # the first resume was mid-epoch
    assert all(r["changed"] == {} for r in resumes)
    assert same_weights(weights(tmp_path / "full")["model"], weights(run)["model"]), f"VITPCM_KILL_SEED={seed}"
    assert weights(run)["val_miou"] == reference["history"][-1]["val_miou"], f"VITPCM_KILL_SEED={seed}"
    assert not list(RunLayout(run).checkpoints.glob(".*"))  # no temporary of a killed save


def test_deterministic_runs_do_not_depend_on_loader_workers(synth_root, tmp_path):
    """data.num_workers may change on resume: with train.deterministic it changes nothing."""
    for workers in (0, 2):
        train(tiny_cfg(synth_root, "train.epochs=1", f"data.num_workers={workers}"), tmp_path / f"w{workers}",
              progress=False)  # fmt: skip
    assert same_weights(weights(tmp_path / "w0")["model"], weights(tmp_path / "w2")["model"])


# ------------------------------------------------------------------------ the run remembers itself
def test_resume_needs_only_the_folder_and_records_what_changed(copy_of, capsys):
    run = copy_of()
    assert main(["train", "--resume", "--out", str(run), "train.epochs=2", "-q"]) == 0
    assert load_config(RunLayout(run).config).train.epochs == 2
    (row,) = [json.loads(line) for line in RunLayout(run).resumes.read_text().splitlines()]
    assert row["changed"] == {"train.epochs": {"from": 1, "to": 2}} and row["epoch"] == 1 and row["batch"] == 0


@pytest.mark.parametrize(
    "argv, shown",
    [
        (["model.lstm_hidden=16"], "model.lstm_hidden (8 -> 16) cannot change on resume"),
        (["train.batch_size=2"], "train.batch_size (4 -> 2) cannot change on resume"),
        (["synthetic"], "leave out the preset on --resume"),
    ],
)
def test_resume_refuses_what_changes_the_model_or_the_data_in_one_line(copy_of, capsys, argv, shown):
    run = copy_of()
    before = RunLayout(run).config.read_text()
    args = ["train", *argv, "--resume", "--out", str(run), "-q"] if argv == ["synthetic"] else [
        "train", "--resume", "--out", str(run), *argv, "-q"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert shown in err and len(err.splitlines()) == 1, err
    assert RunLayout(run).config.read_text() == before and not RunLayout(run).resumes.exists()


def test_without_config_yaml_the_checkpoints_copy_is_used(copy_of):
    run = copy_of()
    RunLayout(run).config.unlink()
    # what infer uses (its 32 px, not the library's 960)
    layout = RunLayout(run)
    cfg = run_config(layout, stored=lambda: checkpoint_config(layout.checkpoint("best")))
    assert cfg.infer.scale == 32 and cfg.input.train_size == 32
    with pytest.raises(VitpcmError, match="has no config.yaml and its checkpoint stores no config"):
        run_config(layout)
    assert main(["train", "--resume", "--out", str(run), "train.epochs=2", "-q"]) == 0
    assert RunLayout(run).config.is_file() and weights(run)["epoch"] == 2


def test_a_changed_model_is_one_line_not_a_line_per_tensor(copy_of, synth_root):
    from vitpcm.tasks.pcm import PcmTask, train_settings

    cfg = resolve_config(tiny_cfg(synth_root, "model.lstm_hidden=16", "train.epochs=2"))
    with pytest.raises(VitpcmError) as info:
        Trainer(PcmTask(cfg), copy_of(), train_settings(cfg), resume=True, progress=False)
    message = str(info.value)
    assert "does not fit the model this config builds" in message and "\n" not in message
    assert "tensor(s) of another shape, e.g." in message


def test_resume_keys_are_documented():
    text = (REPO / "docs/reliability.md").read_text()
    assert all(f"`{key}`" in text for key in RESUME_KEYS)


# ------------------------------------------------------------------------ one writer per run
def test_a_live_writer_refuses_a_second_and_a_dead_ones_lock_is_taken_over(copy_of, caplog):
    run = copy_of()
    holder = FolderLock(RunLayout(run).lock, "vitpcm train")
    holder.acquire()
    try:
        with pytest.raises(VitpcmError, match=rf"{run} is in use by another vitpcm train \(PID {os.getpid()} on "):
            train(None, run, resume=True, overrides=["train.epochs=2"], progress=False)
    finally:
        holder.release()
    RunLayout(run).lock.write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere", "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="vitpcm"):
        train(None, run, resume=True, overrides=["train.epochs=2"], progress=False)
    assert f"took over the lock of PID {2**22 + 7} on elsewhere (started then)" in caplog.text
    assert RunLayout(run).lock.read_text() == ""  # released at the end


# ------------------------------------------------------------------------ disks
def test_save_checkpoint_names_a_full_disk(monkeypatch, tmp_path):
    """torch says "enforce fail at inline_container.cc"; the user reads "no space left"."""
    import contextlib

    import vitpcm.engine.checkpoint as checkpoint

    @contextlib.contextmanager
    def full(path):
        fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
        try:
            yield fd
        finally:
            os.close(fd)

    monkeypatch.setattr(checkpoint, "atomic_fd", full)
    with pytest.raises(DiskError, match=r"cannot write last.pt in .*: no space left on device"):
        save_checkpoint(tmp_path / "last.pt", {"arch": {}, "model": {"w": torch.zeros(1000)}})


# A process saving a checkpoint that stalls mid-save: before the first byte (in the pickler)
# or after the first bytes reached the file (in the writer), and says so in a marker file.
_STALLED_SAVE = """
import sys, time
from pathlib import Path
import torch
from vitpcm.engine import checkpoint

folder, marker, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def stall():
    marker.write_text("saving")
    time.sleep(120)

class Stall:
    def __reduce__(self):
        stall()
        return (int, (0,))

state = {"arch": {}, "model": {"w": torch.zeros(100_000)}}
if where == "pickling":
    state["extra"] = Stall()
else:
    write = checkpoint._Sink.write
    def slow_write(self, data):
        n = write(self, data)
        stall()
        return n
    checkpoint._Sink.write = slow_write
checkpoint.save_checkpoint(folder / "last.pt", state)
"""


@pytest.mark.parametrize("where", ["pickling", "writing"])
def test_a_kill_during_a_save_leaves_no_file_behind(tmp_path, where):
    """The issue's "0-byte .last.pt.*.tmp left when a kill lands during the first save": the
    checkpoint is written into an unnamed file (O_TMPFILE), so a kill -9 leaves nothing."""
    folder, marker = tmp_path / "checkpoints", tmp_path / "marker"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _STALLED_SAVE, str(folder), str(marker), where], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the save never started"
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
    assert list(folder.iterdir()) == []  # no temporary, no half checkpoint
    save_checkpoint(folder / "last.pt", {"arch": {}, "model": {"w": torch.ones(3)}})  # and a later save works
    assert [p.name for p in folder.iterdir()] == ["last.pt"]
    assert torch.equal(read_checkpoint(folder / "last.pt")["model"]["w"], torch.ones(3))
    assert oct((folder / "last.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_save_checkpoint_without_o_tmpfile_uses_a_named_temporary(monkeypatch, tmp_path):
    """A file system without O_TMPFILE (or another OS): the named temporary, renamed on success."""
    import vitpcm.atomic as vio

    monkeypatch.setattr(vio, "_open_unnamed", lambda folder: None)
    save_checkpoint(tmp_path / "c" / "last.pt", {"arch": {}, "model": {"w": torch.ones(3)}})
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["last.pt"]
    assert torch.equal(read_checkpoint(tmp_path / "c" / "last.pt")["model"]["w"], torch.ones(3))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture()
def tmpfs(tmp_path):
    """A small RAM file system mounted at tmp_path/fs (needs root); skipped elsewhere."""
    mount = tmp_path / "fs"
    mount.mkdir()
    mounted = []

    def make(size_kb: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(mount)
        return mount

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _kb(folder: Path) -> int:
    """Disk use in KiB (whole blocks, as a tmpfs counts them)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*")) // 1024 + 16


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(copy_of, tmpfs, capsys):
    src = copy_of()
    room = (
        RunLayout(src).checkpoint("last").stat().st_size // 1024 // 2
    )  # not enough for a (larger) finetune checkpoint
    fs = tmpfs(_kb(src) + room)
    run = fs / "run"
    shutil.copytree(src, run)
    before = digest(RunLayout(run).checkpoint("last"))
    assert main(["train", "--resume", "--out", str(run), "train.epochs=2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write last.pt in {run}/checkpoints: no space left on device" in err, err
    assert "the previous last.pt is unchanged" in err and len(err.splitlines()) == 1
    assert digest(RunLayout(run).checkpoint("last")) == before
    assert not list(RunLayout(run).checkpoints.glob(".*"))


def test_a_file_size_limit_is_one_line_and_the_previous_checkpoint_stays(copy_of, capsys):
    """The same without root: RLIMIT_FSIZE makes the checkpoint write fail (EFBIG)."""
    run = copy_of()
    before = digest(RunLayout(run).checkpoint("last"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    # the warm-up checkpoint's size: the finetune phase's (more trainable tensors in Adam) is larger
    resource.setrlimit(resource.RLIMIT_FSIZE, (RunLayout(run).checkpoint("last").stat().st_size, hard))
    try:
        code = main(["train", "--resume", "--out", str(run), "train.epochs=2", "-q"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write last.pt in {run}/checkpoints: file too large" in err and len(err.splitlines()) == 1, err
    assert digest(RunLayout(run).checkpoint("last")) == before


def test_a_read_only_run_folder_is_one_line(copy_of, tmpfs, capsys):
    src = copy_of()
    fs = tmpfs(_kb(src) + 2048)
    run = fs / "run"
    shutil.copytree(src, run)
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    assert main(["train", "--resume", "--out", str(run), "train.epochs=2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write .lock in {run}: read-only file system" in err and len(err.splitlines()) == 1, err


def test_temporaries_of_a_save_killed_midway_are_removed_on_resume(copy_of, caplog):
    run = copy_of()
    checkpoints = RunLayout(run).checkpoints
    (checkpoints / ".last.pt.4194311-ab12cd.tmp").write_bytes(b"")  # a dead PID's (kill -9 in the first save)
    (checkpoints / ".last.pt.x1y2z3.tmp").write_bytes(b"PK")  # the older naming
    with caplog.at_level(logging.INFO, logger="vitpcm"):
        train(None, run, resume=True, overrides=["train.epochs=2"], progress=False)
    assert not list(checkpoints.glob(".*")) and "removed 2 unfinished temporary file(s)" in caplog.text


# ------------------------------------------------------------------------ configs
def test_a_short_yaml_says_which_base_it_stands_on(tmp_path, caplog):
    short = tmp_path / "short.yaml"
    short.write_text("train:\n  epochs: 3\n")
    based = tmp_path / "based.yaml"
    based.write_text("base: synthetic\ntrain:\n  epochs: 3\n")
    listed = tmp_path / "sub" / "listed.yaml"
    listed.parent.mkdir()
    listed.write_text("_base_: [../based.yaml]\ntrain:\n  lr: 0.5\n")
    with caplog.at_level(logging.INFO, logger="vitpcm"):
        cfg = load_config(short)
    assert cfg.model.backbone == "vit_base_patch16_384" and cfg.train.epochs == 3
    assert "names no base: its keys are layered on the library defaults" in caplog.text
    assert "base: synthetic" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitpcm"):
        cfg = load_config(based, ["train.lr=0.1"])
    assert cfg.model.backbone == "vit_tiny_patch16_224" and cfg.input.train_size == 128
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.1
    assert f"config {based}: based on synthetic" in caplog.text
    cfg = load_config(listed)
    assert cfg.input.train_size == 128 and cfg.train.epochs == 3 and cfg.train.lr == 0.5
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(VitpcmError, match="names itself as a base"):
        load_config(loop)


def _two_ranks(script: Path, *args: str) -> list:
    """Run ``script`` as 2 DDP processes (gloo, env:// as torchrun sets it, without its agent
    process: one python start less per launch). Returns both CompletedProcess-like results."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    return [(p, *p.communicate(timeout=300)) for p in procs]


def test_ddp_a_signal_on_one_rank_stops_both_at_one_step_and_resume_is_exact(tmp_path):
    """Pre-emption under DDP (2 CPU processes, gloo): only rank 0 gets SIGTERM; both save
    at the same step (every rank's generators in last.pt) and the resumed run ends with the
    weights of an uninterrupted one."""
    script = tmp_path / "toy_ddp.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.engine.noisy_toy import NoisyToy, toy_settings\n"
        "from vitpcm.engine.trainer import Trainer, TrainingStopped\n"
        "rank, (run, mode) = int(os.environ['RANK']), sys.argv[1:]\n"
        "task = NoisyToy(signal_at=11 if (rank == 0 and mode == 'stop') else 0)\n"
        "try:\n"
        "    Trainer(task, run, toy_settings(checkpoint_every=2), resume=mode == 'resume', progress=False).fit()\n"
        "except TrainingStopped as exc:\n"
        "    print(f'rank {rank}: {exc}', flush=True)\n"
        "    sys.exit(3)\n"
    )
    for run, mode in (("full", "full"), ("cut", "stop"), ("cut", "resume")):
        for rank, (proc, out, err) in enumerate(_two_ranks(script, str(tmp_path / run), mode)):
            assert proc.returncode == (3 if mode == "stop" else 0), out + err[-2000:]
            if mode == "stop":
                cut = tmp_path / "cut"
                assert f"rank {rank}: SIGTERM received: saved {cut}/checkpoints/last.pt at epoch 3, batch 3/4" in out
    assert len(weights(tmp_path / "cut")["rng"]) == 2
    assert same_weights(weights(tmp_path / "full")["model"], weights(tmp_path / "cut")["model"])
