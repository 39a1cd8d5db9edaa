"""`vitpcm segment train / infer`: the verification chain on tiny synthetic data, bad input, DDP."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import TINY_SEGMENT

from torchrun_pair import one_and_two_ranks
from vitpcm.atomic import save_npz_atomic
from vitpcm.cli import main
from vitpcm.config import load_config
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png, save_mask_png
from vitpcm.stages.segment import segment_infer, segment_train


def _cfg(synth_root, *extra):
    return load_config(None, [f"data.root={synth_root}", "data.num_workers=0", *TINY_SEGMENT, *extra])


@pytest.fixture(scope="session")
def pseudo_dir(tmp_path_factory, synth_root) -> Path:
    """The train split's ground truth as 'pseudo-masks', minus one image (counted as missing)."""
    out = tmp_path_factory.mktemp("pseudo") / "crf"
    shutil.copytree(synth_root / "SegmentationClass", out)
    for p in out.glob("val_*.png"):
        p.unlink()
    (out / "train_00011.png").unlink()
    return out


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory, synth_root, pseudo_dir):
    """A tiny DeepLab run (3 epochs, val mIoU each), its val masks, probabilities and CRF masks."""
    run = tmp_path_factory.mktemp("segrun") / "seg"
    cfg = _cfg(synth_root, "segment.iterations=6", "segment.val_every=1", "segment.msc_scales=[0.5]")
    result = segment_train(cfg, run, pseudo_dir, progress=False)
    infer = segment_infer(run, "val", crf=True, scales=[0.75, 1.0], flip=True, overrides=["crf.workers=1"],
                          progress=False)  # fmt: skip
    return run, result, infer


def test_train_writes_the_run_and_counts_images_without_a_mask(seg_run):
    run, result, _ = seg_run
    assert result["images"] == 11 and result["missing"] == 1
    assert result["epochs"] == 3 and result["iterations"] == 6  # 11 images, batches of 4: 2 whole batches per epoch
    for rel in ("config.yaml", "classes.txt", "checkpoints/last.pt", "checkpoints/best.pt", "logs/metrics.jsonl"):
        assert (run / rel).is_file(), rel
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(0 <= r["val_miou"] <= 1 for r in rows)
    assert rows[2]["lr"] < rows[1]["lr"] < rows[0]["lr"]  # poly decay
    saved = load_config(run / "config.yaml")
    assert saved.segment.pseudo and Path(saved.segment.pseudo).name == "crf"
    state = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert state["arch"]["name"] == "deeplab" and state["arch"]["backbone"] == "resnet18"


def test_infer_writes_the_layout_of_vitpcm_infer_and_scores_it(seg_run, synth_root):
    run, _, s = seg_run
    pseudo = run / "pseudo" / "val"
    names = sorted(p.stem for p in (synth_root / "SegmentationClass").glob("val_*.png"))
    for sub in ("masks", "crf"):
        assert sorted(p.stem for p in (pseudo / sub).glob("*.png")) == names
    with np.load(pseudo / "probs" / f"{names[0]}.npz") as z:
        probs, classes = z["probs"], z["classes"]
    mask = read_mask_png(pseudo / "masks" / f"{names[0]}.png")
    assert probs.shape[1:] == mask.shape and probs.dtype == np.float32 and classes.dtype == np.int64
    assert set(np.unique(mask)) <= set(classes.tolist())  # every winning class is kept for the CRF
    assert s["scales"] == [0.75, 1.0] and s["flip"] is True
    assert 0 <= s["miou"] <= 1 and 0 <= s["crf_miou"] <= 1
    assert json.loads((pseudo / "summary.json").read_text())["crf_miou"] == s["crf_miou"]


def test_infer_crf_with_the_torch_backend_refines_in_the_pass(seg_run, tmp_path):
    """crf.backend=torch (what auto means on a GPU): the CRF masks come from the inference
    pass itself, and equal those the CRF stage computes from the npz files."""
    run, _, reference = seg_run
    out = tmp_path / "o"
    s = segment_infer(run, "val", crf=True, scales=[0.75, 1.0], flip=True, out=out, overrides=["crf.backend=torch"],
                      progress=False)  # fmt: skip
    assert s["crf_pass"] == {"on_device": 6, "left_to_the_stage": 0, "on_cpu_after_oom": 0}
    assert (s["crf"]["computed"], s["crf"]["skipped"]) == (0, 6)
    staged = segment_infer(run, "val", crf=True, scales=[0.75, 1.0], flip=True, out=tmp_path / "p",
                           overrides=["crf.backend=pydensecrf", "crf.workers=1"], progress=False)  # fmt: skip
    assert "crf_pass" not in staged and staged["crf"]["computed"] == 6
    same = [
        (read_mask_png(out / "crf" / p.name) == read_mask_png(p)).mean() for p in (tmp_path / "p/crf").glob("*.png")
    ]
    assert len(same) == 6 and min(same) >= 0.999  # torch vs pydensecrf, same probabilities


def test_the_checkpoint_reloads_and_predicts_the_same(seg_run, synth_root):
    from vitpcm.data import build_dataset
    from vitpcm.data.pseudo import SegmentEvalTransform
    from vitpcm.models.deeplab import predict_probs
    from vitpcm.stages.load import load_model

    run, _, _ = seg_run
    model, _ = load_model(run / "checkpoints" / "best.pt")
    model.eval()
    data = build_dataset(load_config(run / "config.yaml").data, "val", require_masks=False)
    data.transform = SegmentEvalTransform(*model.normalisation)
    for i in range(2):
        sample = data[i]
        with torch.inference_mode():
            mask = predict_probs(model, sample["image"], [0.75, 1.0], flip=True).argmax(0).numpy()
        assert np.array_equal(mask, read_mask_png(run / "pseudo/val/masks" / f"{sample['name']}.png"))


def test_evaluate_runs_on_the_output(seg_run, synth_root, capsys):
    run, _, s = seg_run
    code = main(["evaluate", "--pred", f"deeplab={run / 'pseudo/val/masks'}", "--pred", f"crf={run / 'pseudo/val/crf'}",
                 "--gt", str(synth_root / "SegmentationClass"), "--classes", str(synth_root / "classes.txt"), "-q"])  # fmt: skip
    assert code == 0
    assert f"{100 * s['miou']:.1f}" in capsys.readouterr().out


def test_the_loss_goes_down(synth_root, pseudo_dir):
    """Ten SGD steps of the task on one fixed batch lower its loss."""
    from vitpcm.data import build_dataset
    from vitpcm.data.pseudo import PseudoMaskDataset, list_pseudo_masks, segment_collate
    from vitpcm.engine.distributed import Dist
    from vitpcm.engine.task import EngineContext
    from vitpcm.runs import RunLayout
    from vitpcm.tasks.segment import SegmentTask

    torch.manual_seed(0)
    cfg = _cfg(synth_root, "segment.lr=0.002", "segment.loss=balanced")
    base = build_dataset(cfg.data, "train", require_masks=False)
    task = SegmentTask(cfg, PseudoMaskDataset(base, list_pseudo_masks(pseudo_dir, base.names)), None, epochs=1)
    ctx = EngineContext(device=torch.device("cpu"), dist=Dist(), run=RunLayout("/nonexistent"), progress=False)
    task.setup(ctx)
    phase = task.phases()[0]
    opt = task.make_optimizer(
        phase, [dict(g, lr=phase.lr * g["lr_scale"]) for g in task.param_groups(phase, task.model)]
    )
    batch = segment_collate([task.train_set[i] for i in range(4)])
    task.train_mode(task.model)
    losses = []
    for _ in range(10):
        loss, _ = task.train_step(task.model, batch, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_iterations_map_onto_whole_epochs():
    from vitpcm.tasks.segment import iterations_to_epochs, steps_per_epoch

    assert steps_per_epoch(10582, 10, 1, 1) == 1058  # the last partial batch is dropped
    assert iterations_to_epochs(20000, 10582, 10, 1, 1) == (19, 20102)  # VOC trainaug, the recipe's 20k
    assert iterations_to_epochs(20000, 10582, 5, 1, 2) == (19, 20102)  # the same step as 5 x 2
    assert iterations_to_epochs(20000, 10582, 5, 2, 1) == (19, 20102)  # ... or as 2 processes x 5
    assert iterations_to_epochs(2, 7, 4, 1, 1) == (1, 2)  # a tiny set keeps its partial batch


def test_poly_schedule_with_warmup():
    from vitpcm.engine.task import Phase
    from vitpcm.tasks.segment import SegmentTask

    cfg = load_config(None, ["segment.lr=0.1", "segment.warmup=10", "segment.poly_power=1.0"])
    task = SegmentTask.__new__(SegmentTask)
    task.cfg, task.epochs, task.steps = cfg, 4, 100
    phase = Phase("train", 0, 0.1)
    assert task.lr_at(phase, 0.0) == pytest.approx(0.1 * 1 / 10)  # first step of the ramp
    assert task.lr_at(phase, 4 * 0.05) == pytest.approx(0.1 * 0.95 * 6 / 10)  # step 5 of 100
    assert task.lr_at(phase, 2.0) == pytest.approx(0.05)  # half way: poly only
    assert task.lr_at(phase, 4.0) == 0.0


def test_resume_refuses_an_existing_run_and_continues_one(seg_run, synth_root, pseudo_dir):
    run, _, _ = seg_run
    cfg = _cfg(synth_root, "segment.iterations=6", "segment.val_every=1", "segment.msc_scales=[0.5]")
    with pytest.raises(VitpcmError, match="--resume"):
        segment_train(cfg, run, pseudo_dir, progress=False)
    # the run's config remembers its pseudo-masks: --resume needs no --pseudo
    result = segment_train(load_config(run / "config.yaml"), run, resume=True, progress=False)
    assert result["history"] == [] and result["epochs"] == 3


# ------------------------------------------------------------------------------ bad input
def _bad_case(kind: str, tmp_path: Path, synth_root: Path, pseudo_dir: Path) -> Path:
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "empty":
        return folder
    if kind == "probs":
        save_npz_atomic(folder / "train_00000.npz", probs=np.ones((1, 4, 4), np.float32), classes=np.array([0]))
        return folder
    if kind == "pseudo-root":
        (folder / "masks").mkdir()
        (folder / "crf").mkdir()
        return folder
    for p in pseudo_dir.glob("*.png"):
        shutil.copy(p, folder / p.name)
    mask = read_mask_png(folder / "train_00003.png").copy()
    if kind == "size":
        save_mask_png(folder / "train_00003.png", mask[:-2])
    elif kind == "values":
        mask[0, 0] = 9
        save_mask_png(folder / "train_00003.png", mask)
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "holds no PNG masks"),
        ("probs", r"holds probabilities \(NAME.npz\), not masks: give the masks/ or crf/ folder"),
        ("pseudo-root", "give one of them, e.g. --pseudo"),
        ("size", r"train_00003.png: the mask is \d+x\d+ but its image .* is \d+x\d+: pseudo-masks must have the original image size"),
        ("values", r"train_00003.png: mask values \[9\] lie outside the 6 classes .*data.classes"),
    ],
)  # fmt: skip
def test_bad_pseudo_masks_are_one_line_and_nothing_is_written(kind, message, tmp_path, synth_root, pseudo_dir, capsys):
    folder = _bad_case(kind, tmp_path, synth_root, pseudo_dir)
    run = tmp_path / "run"
    with pytest.raises(VitpcmError, match=message):
        segment_train(_cfg(synth_root), run, folder, progress=False)
    assert not run.exists()
    code = main(["segment", "train", "synthetic_segment", f"data.root={synth_root}", "--pseudo", str(folder),
                 "--out", str(run), "-q", *TINY_SEGMENT])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vitpcm segment: error:") and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_deeplabv3plus_trains_and_infers(tmp_path, synth_root, pseudo_dir):
    run = tmp_path / "v3p"
    cfg = _cfg(synth_root, "segment.model=deeplabv3plus", "segment.iterations=1", "segment.freeze_bn=true")
    result = segment_train(cfg, run, pseudo_dir, progress=False)
    assert result["iterations"] == 2  # one epoch: 2 whole batches
    s = segment_infer(run, "val", progress=False)
    assert s["model"]["model"] == "deeplabv3plus" and s["model"]["output_stride"] == 16 and 0 <= s["miou"] <= 1


def test_bad_backbone_weights_leave_no_run_folder(tmp_path, synth_root, pseudo_dir):
    run = tmp_path / "run"
    with pytest.raises(VitpcmError, match="file /nonexistent/resnet18.pth not found"):
        segment_train(
            _cfg(synth_root, "segment.backbone_weights=/nonexistent/resnet18.pth"), run, pseudo_dir, progress=False
        )
    with pytest.raises(VitpcmError, match="pixel labels"):
        segment_train(
            _cfg(synth_root, "segment.backbone_weights=COCO_WITH_VOC_LABELS_V1"), run, pseudo_dir, progress=False
        )
    assert not run.exists()


def test_masks_of_another_split_are_named(tmp_path, synth_root):
    folder = tmp_path / "other"
    folder.mkdir()
    save_mask_png(folder / "elsewhere_1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(VitpcmError, match="none of the 12 images of split 'train' has a mask there"):
        segment_train(_cfg(synth_root), tmp_path / "run", folder, progress=False)


def test_infer_refuses_a_vitpcm_run(tiny_run):
    with pytest.raises(VitpcmError, match="not a DeepLab: use `vitpcm infer`"):
        segment_infer(tiny_run, "val", progress=False)


# ------------------------------------------------------------------------------ CLI, demo folder, DDP
def test_cli_demo_run_and_infer(tmp_path, synth_root, pseudo_dir, capsys):
    """`segment train --demo-run DIR` finds the demo's data and train CRF masks; `segment infer` prints the mIoU."""
    demo = tmp_path / "demo"
    shutil.copytree(synth_root, demo / "data")
    shutil.copytree(pseudo_dir, demo / "run/pseudo/train/crf")
    argv = [
        "segment",
        "train",
        "--demo-run",
        str(demo),
        "-q",
        "data.num_workers=0",
        *TINY_SEGMENT,
        "segment.loss_at=input",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "11 images" in out and "1 images of the split without a mask" in out
    assert (demo / "segment/checkpoints/last.pt").is_file()
    assert main(["segment", "infer", str(demo / "segment"), "--split", "val", "--scales", "1.0", "-q"]) == 0
    assert "mIoU" in capsys.readouterr().out
    assert main(["segment", "infer", str(demo / "segment"), "--scales", "0.5,x", "-q"]) == 2
    assert "--scales 0.5,x" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tmp_path, synth_root, pseudo_dir):
    """DDP through torchrun (gloo on the CPU): both ranks train, rank 0 writes the run."""
    import os
    import subprocess
    import sys

    from vitpcm.engine.checkpoint import read_checkpoint

    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitpcm", "segment", "train", "synthetic_segment", f"data.root={synth_root}", "--pseudo", str(pseudo_dir),
           "--out", str(run), "-q", *TINY_SEGMENT, "segment.iterations=2", "data.num_workers=0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run: ") == 1
    # 11 images on 2 processes: 6 each, batches of 4 -> 2 steps per epoch; 2 iterations = 1 epoch
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1]
    assert read_checkpoint(run / "checkpoints/last.pt")["epoch"] == 1


# ------------------------------------------------------------------------------ resume (issue 12), torchrun (issue 11)
MINI = [f"val_{i:05d}" for i in range(3)]  # split "mini": half of val, to keep these tests short


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory, synth_root) -> Path:
    """The synthetic data with one more split, ``mini``: three val images."""
    root = tmp_path_factory.mktemp("mini") / "data"
    shutil.copytree(synth_root, root)
    (root / "ImageSets" / "Segmentation" / "mini.txt").write_text("".join(f"{n}\n" for n in MINI))
    return root


@pytest.fixture()
def seg_copy(tmp_path, seg_run) -> Path:
    """A copy of the tiny DeepLab run without its outputs (a test may touch its checkpoint)."""
    dst = tmp_path / "seg"
    shutil.copytree(seg_run[0], dst, ignore=shutil.ignore_patterns("pseudo"))
    return dst


def _names(folder: Path, suffix: str) -> list:
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _mtimes(out: Path) -> dict:
    return {p.relative_to(out): p.stat().st_mtime_ns for sub in ("masks", "probs") for p in (out / sub).iterdir()}


def test_infer_rerun_skips_finished_images_and_redoes_stale_ones(seg_copy, mini_root, tmp_path, capsys):
    run, out, data = seg_copy, tmp_path / "o", [f"data.root={mini_root}"]

    def infer(*extra, flip=False):  # at half size: these tests are about files, not masks
        return segment_infer(run, "mini", out=out, scales=[0.5], flip=flip, overrides=[*data, *extra], progress=False)

    first = infer()
    assert (first["computed"], first["resumed"], first["images"]) == (3, 0, 3)
    mtimes = _mtimes(out)
    again = infer()
    assert (again["computed"], again["resumed"]) == (0, 3)
    assert again["miou"] == first["miou"]  # the finished images count in the score
    assert _mtimes(out) == mtimes  # untouched

    (out / "probs" / "val_00001.npz").unlink()  # a lost npz: that image again
    assert infer()["computed"] == 1
    assert infer(flip=True)["computed"] == 3  # other settings
    assert infer(flip=True)["computed"] == 0
    os.utime(run / "checkpoints" / "best.pt")  # a retrained checkpoint makes every mask stale
    assert infer(flip=True)["computed"] == 3
    assert infer("segment.keep_threshold=0.5", flip=True)["computed"] == 3  # what the npz keeps is a setting too

    capsys.readouterr()
    cli = ["segment", "infer", str(run), "--split", "mini", "--out", str(out), "--scales", "0.5", "--flip", "-q",
           *data, "segment.keep_threshold=0.5"]  # fmt: skip
    assert main(cli) == 0
    assert "(scales [0.5] + flips; 3 already done)" in capsys.readouterr().out
    assert main([*cli, "--overwrite"]) == 0
    assert "already done" not in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["computed"] == 3


def test_infer_killed_between_npz_and_png_resumes_to_the_same_files(seg_copy, mini_root, tmp_path, monkeypatch):
    """Each image's npz is written before its PNG: a PNG always has its npz, and a rerun
    computes exactly the images without a PNG; the CRF after it resumes too."""
    import vitpcm.stages.mask_writer as mask_writer_mod  # where the stage's files are written

    run, out, over = seg_copy, tmp_path / "o", [f"data.root={mini_root}", "crf.workers=1"]
    real = mask_writer_mod.save_mask_png
    calls = []

    def killed_at_the_second_png(path, mask, text=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for a kill: nothing after this line runs
        real(path, mask, text)

    monkeypatch.setattr(mask_writer_mod, "save_mask_png", killed_at_the_second_png)
    with pytest.raises(KeyboardInterrupt):
        segment_infer(run, "mini", scales=[0.5], out=out, overrides=over, progress=False)
    monkeypatch.undo()
    assert _names(out / "masks", ".png") == MINI[:1] and _names(out / "probs", ".npz") == MINI[:2]
    assert not list(out.rglob("*.tmp")) and not (out / "summary.json").exists()

    resumed = segment_infer(run, "mini", scales=[0.5], out=out, crf=True, overrides=over, progress=False)
    assert (resumed["computed"], resumed["resumed"]) == (2, 1)
    ref = segment_infer(run, "mini", scales=[0.5], out=tmp_path / "ref", crf=True, overrides=over, progress=False)
    assert (resumed["miou"], resumed["crf_miou"]) == (ref["miou"], ref["crf_miou"])
    for sub, suffix in (("masks", ".png"), ("probs", ".npz"), ("crf", ".png")):
        assert _names(out / sub, suffix) == MINI
        for name in MINI:
            a, b = out / sub / f"{name}{suffix}", tmp_path / "ref" / sub / f"{name}{suffix}"
            assert a.read_bytes() == b.read_bytes(), a
    again = segment_infer(run, "mini", scales=[0.5], out=out, crf=True, overrides=over, progress=False)
    assert (again["computed"], again["crf"]["computed"]) == (0, 0)  # the CRF masks are kept too


def test_infer_under_torchrun_two_cpu_ranks_write_the_files_of_one_process(seg_copy, mini_root, tmp_path):
    over = [f"data.root={mini_root}", "crf.workers=1"]
    tail = ["segment", "infer", str(seg_copy), "--split", "mini", "--scales", "0.5", "--flip", "--crf", "-q", *over]
    _, two = one_and_two_ranks(tail, tmp_path)
    assert two.stdout.count("wrote 3 DeepLab masks") == 1  # rank 0 speaks
    a, b = tmp_path / "one", tmp_path / "two"
    for sub, suffix in (("masks", ".png"), ("probs", ".npz"), ("crf", ".png")):
        assert _names(a / sub, suffix) == _names(b / sub, suffix) == MINI
        for name in MINI:
            assert (a / sub / f"{name}{suffix}").read_bytes() == (b / sub / f"{name}{suffix}").read_bytes()
    assert np.array_equal(np.load(a / "confusion.npy"), np.load(b / "confusion.npy"))
    sa, sb = (json.loads((x / "summary.json").read_text()) for x in (a, b))
    assert sb["ranks"] == 2 and (sb["computed"], sb["resumed"]) == (3, 0)
    assert (sa["miou"], sa["crf_miou"]) == (sb["miou"], sb["crf_miou"])
    assert not list(b.rglob(".done-*"))
    # the ranks stamped their masks as one process does: a one-process rerun keeps them all
    rerun = segment_infer(seg_copy, "mini", out=b, scales=[0.5], flip=True, overrides=over, progress=False)
    assert (rerun["computed"], rerun["resumed"], rerun["miou"]) == (0, 3, sb["miou"])


def test_infer_lists_every_bad_item_before_any_output(seg_copy, mini_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(mini_root, data)
    (data / "JPEGImages" / "val_00000.jpg").write_bytes(b"not a jpeg")
    (data / "JPEGImages" / "val_00002.jpg").unlink()  # the last item: found before any image is inferred
    with pytest.raises(VitpcmError) as info:
        segment_infer(seg_copy, "mini", out=tmp_path / "o", scales=[0.5], overrides=[f"data.root={data}"],
                      progress=False)  # fmt: skip
    message = str(info.value)
    assert "2 problem(s) in split 'mini' (2 item(s)), nothing inferred" in message
    assert "val_00000.jpg" in message and "val_00002" in message
    assert not (tmp_path / "o").exists()  # no empty folders left behind
