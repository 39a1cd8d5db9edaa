"""Train -> infer -> evaluate end to end on a tiny model, through the API and the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitpcm.cli import main
from vitpcm.config import load_config
from vitpcm.engine.checkpoint import read_checkpoint
from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png
from vitpcm.stages.config import resolve_config
from vitpcm.stages.infer import run_inference
from vitpcm.stages.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth_root):
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config("synthetic", [*TINY, f"data.root={synth_root}"])
    result = train(cfg, run, progress=False)
    return run, result


def test_training_writes_run_folder(trained_run):
    run, result = trained_run
    assert (run / "config.yaml").is_file() and (run / "classes.txt").is_file()
    assert (run / "checkpoints/last.pt").is_file() and (run / "checkpoints/best.pt").is_file()
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["phase"] for r in rows] == ["warmup", "finetune"]
    for r in rows:
        assert {"epoch", "loss", "val_miou", "mce", "et", "reg"} <= set(r)
        assert 0.0 <= r["val_miou"] <= 1.0 and np.isfinite(r["loss"])
    assert result["best_miou"] == max(r["val_miou"] for r in rows)
    state = read_checkpoint(run / "checkpoints/last.pt")
    assert state["epoch"] == 2 and state["arch"]["num_classes"] == 6


def test_validation_records_the_tag_quality(trained_run, synth_root):
    """metrics.jsonl's val_tag_f1 / val_tag_map: the pooled scores of the last epoch's model
    on the val images (at the training size) against their tags, recomputed here."""
    from vitpcm.data import EvalTransform, build_dataset
    from vitpcm.evaluation.tags import tag_quality
    from vitpcm.stages.load import load_run

    run, _ = trained_run
    last = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()][-1]
    model, info = load_run(run, "last")
    cfg = load_config(run / "config.yaml")
    norm = info["normalisation"]
    val = build_dataset(cfg.data, "val", EvalTransform(32, mean=norm["mean"], std=norm["std"]))
    with torch.no_grad():
        scores = np.stack([model(val[i]["image"][None])["pooled"][0].numpy() for i in range(len(val))])
    truth = np.stack([val[i]["labels"].numpy() for i in range(len(val))])
    q = tag_quality(scores, truth, val.classes, float(cfg.infer.present_threshold))
    assert last["val_tag_f1"] == pytest.approx(q["mean_f1"]) and last["val_tag_map"] == pytest.approx(q["map"])


def test_warmup_leaves_backbone_untouched(tmp_path, tiny_overrides):
    cfg = resolve_config(
        load_config("synthetic", [*tiny_overrides, "train.epochs=1", "train.warmup_epochs=1", "loss.et=false"])
    )
    torch.manual_seed(0)
    from vitpcm.engine.trainer import Trainer
    from vitpcm.tasks.pcm import PcmTask, train_settings

    trainer = Trainer(PcmTask(cfg), tmp_path / "r", train_settings(cfg))
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainer.model.classifier.weight.detach().clone()
    trainer.fit()
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, trainer.model.classifier.weight.detach())


def test_rerun_without_resume_is_refused_and_resume_continues(trained_run, tmp_path, synth_root):
    from tests.conftest import TINY

    run, _ = trained_run
    cfg = load_config("synthetic", [*TINY, f"data.root={synth_root}"])
    with pytest.raises(VitpcmError, match="--resume"):
        train(cfg, run, progress=False)
    # resume a copy for one more epoch
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cfg3 = load_config("synthetic", [*TINY, f"data.root={synth_root}", "train.epochs=3"])
    train(cfg3, copy, resume=True, progress=False)
    rows = [json.loads(line) for line in (copy / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert read_checkpoint(copy / "checkpoints/last.pt")["epoch"] == 3


def test_infer_writes_masks_and_probs_at_original_size(trained_run, synth_root, tmp_path):
    run, _ = trained_run
    out = tmp_path / "pseudo"
    summary = run_inference(run, "val", out=out, scale=48, progress=False)
    names = (synth_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert summary["images"] == len(names) and 0.0 <= summary["miou"] <= 1.0
    for name in names:
        mask = read_mask_png(out / "masks" / f"{name}.png")
        gt = read_mask_png(synth_root / "SegmentationClass" / f"{name}.png")
        assert mask.shape == gt.shape
        assert Image.open(out / "masks" / f"{name}.png").mode == "P"
        data = np.load(out / "probs" / f"{name}.npz")
        probs, classes = data["probs"], data["classes"]
        assert probs.shape == (len(classes), *gt.shape)
        tags = set(np.unique(gt[gt != 255]).tolist()) | {0}
        assert set(classes.tolist()) == tags  # merged with tags: present classes only
        # argmax over the kept channels reproduces the mask
        assert probs.dtype == np.float32
        assert np.array_equal(classes[probs.argmax(0)], mask)
        assert set(np.unique(mask).tolist()) <= tags


def test_infer_rejects_scale_off_the_patch_grid(trained_run):
    run, _ = trained_run
    with pytest.raises(VitpcmError, match="not a multiple of the patch size 8: use 40 or 48"):
        run_inference(run, "val", scale=44, progress=False)


def test_infer_rejects_checkpoint_with_other_class_count(trained_run, tmp_path):
    run, _ = trained_run
    classes = tmp_path / "classes.txt"
    classes.write_text("background\na\nb\n")
    with pytest.raises(VitpcmError, match="trained for 6 classes but the data has 3"):
        run_inference(run, "val", overrides=[f"data.classes={classes}"], progress=False)


def test_cli_infer_and_evaluate(trained_run, synth_root, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "p"
    assert main(["infer", str(run), "--split", "val", "--out", str(out), "-q"]) == 0
    js = tmp_path / "eval.json"
    code = main(["evaluate", "--pred", str(out / "masks"), "--gt", str(synth_root / "SegmentationClass"),
                 "--classes", str(synth_root / "classes.txt"),
                 "--split-file", str(synth_root / "ImageSets/Segmentation/val.txt"), "--json", str(js), "-q"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "leaf" in printed
    result = json.loads(js.read_text())
    infer_summary = json.loads((out / "summary.json").read_text())
    assert result["miou"] == pytest.approx(infer_summary["miou"])
    assert set(result["iou"]) == set((synth_root / "classes.txt").read_text().split())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "synthetic", "data.root=/nonexistent/x"], "dataset folder /nonexistent/x not found"),
        (["train", "synthetic"], "no dataset given: set data.root"),
        (["train", "synthetic", "train.epoch=3", "data.root=/x"], "unknown config key 'train.epoch'"),
        (["infer", "/nonexistent/run"], "run folder /nonexistent/run not found"),
        (["evaluate", "--pred", "/nope", "--gt", "/nope", "--classes", "voc12"], "prediction folder /nope not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_cli_empty_split(tmp_path, synth_root, capsys):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(synth_root, root)
    (root / "ImageSets/Segmentation/train.txt").write_text("")
    assert main(["train", "synthetic", f"data.root={root}", "--out", str(tmp_path / "r")]) == 2
    assert "split 'train' is empty" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tmp_path, synth_root):
    """DDP through torchrun (gloo on the CPU): both ranks train, rank 0 writes the run."""
    import os
    import subprocess
    import sys

    from tests.conftest import TINY

    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitpcm", "train", "synthetic", f"data.root={synth_root}", "--out", str(run), "-q", *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("run: ") == 1
    rows = [json.loads(line) for line in (run / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert read_checkpoint(run / "checkpoints/last.pt")["epoch"] == 2
