"""`vitpcm bench --quick`: every section runs on tiny shapes and the JSON has the documented
keys and types (timings are not checked: quick mode says nothing about speed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vitpcm.cli import main
from vitpcm.stages.bench import TARGETS, bench, format_bench

NUMBER = (int, float)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = bench("synthetic", quick=True, json_path=out, progress=False, note="test", threads=1)
    return result, out


def _numbers(section: dict, keys) -> None:
    for k in keys:
        assert isinstance(section[k], NUMBER) and not isinstance(section[k], bool), k
        assert section[k] == section[k], f"{k} is NaN"


def test_quick_bench_writes_every_section(quick):
    result, out = quick
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["quick"] is True and result["device"] == "cpu" and result["note"] == "test"
    m = result["machine"]
    for k in ("cpu", "cpus", "cpus_usable", "torch", "timm", "python", "torch_threads", "loadavg_1min"):
        assert k in m, k
    assert isinstance(m["timm_fused_attention"], bool)
    assert isinstance(m["cpu"], str) and m["cpus_usable"] >= 1

    i = result["infer"]
    _numbers(i, ["pipeline_seconds_per_image", "backbone_seconds_per_image", "infer_ratio", "images_per_second",
                 "data_seconds_per_image", "data_wait_fraction", "peak_memory_mb", "pipeline_cpu_seconds_per_image",
                 "backbone_cpu_seconds_per_image", "infer_ratio_cpu"])  # fmt: skip
    assert i["scale"] == 32 and i["images"] == 2 and len(i["pipeline_seconds_per_image_runs"]) == 2
    assert i["memory_kind"] == "rss_peak" and i["peak_memory_mb"] > 0
    assert 0 <= i["data_wait_fraction"] <= 1

    t = result["train"]
    _numbers(t, ["step_seconds", "floor_seconds", "train_ratio", "images_per_second", "data_wait_fraction",
                 "peak_memory_mb", "trainable_backbone_parameters", "step_cpu_seconds", "floor_cpu_seconds",
                 "train_ratio_cpu"])  # fmt: skip
    assert t["batch_size"] == 4 and t["forward_inputs"] == 5 and t["steps"] == 2
    assert len(t["step_seconds_runs"]) == len(t["floor_seconds_runs"]) == 2
    assert t["trainable_backbone_parameters"] > 0

    c = result["crf"]
    _numbers(c, ["vitpcm_seconds", "authors_seconds", "crf_speedup", "agreement_pct", "vitpcm_cpu_seconds",
                 "authors_cpu_seconds", "crf_cpu_ratio", "lattice_seconds", "crf_speedup_lattice",
                 "agreement_lattice_pct", "authors_single_process_seconds", "crf_speedup_single_process",
                 "torch_seconds", "torch_images_per_second", "pydensecrf_images_per_second",
                 "agreement_torch_pct"])  # fmt: skip
    assert c["images"] == 3 and c["process_start_included"] is True
    assert c["agreement_pct"] > 99.0  # same parameters, present classes vs all channels, exact smoothness kernel
    assert c["agreement_lattice_pct"] > 99.0  # the same with pydensecrf's lattice, as the authors
    from vitpcm.utils.system import cpu_count

    assert c["authors_jobs"] == cpu_count() and c["command_authors"].endswith(f" 21 {cpu_count()}")  # their joblib
    assert c["agreement_torch_pct"] > 99.0 and c["torch_device"] == "cpu"  # crf.backend=torch vs pydensecrf

    cli = result["cli"]
    _numbers(cli, ["help_seconds", "crf_help_seconds"])

    assert result["targets"] == TARGETS
    assert set(result["met"]) == {"infer_ratio", "train_ratio", "crf_speedup", "crf_agreement"}
    assert all(isinstance(v, bool) for v in result["met"].values())
    text = format_bench(result)
    assert "infer_ratio" in text and "train_ratio" in text and "crf_speedup" in text and "quick mode" in text
    assert "at equal cores" in text and "torch" in text


def test_cli_bench_one_section(tmp_path, capsys):
    out = tmp_path / "cli.json"
    assert main(["bench", "--quick", "--section", "cli", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert set(result["met"]) == set() and "infer" not in result and result["cli"]["runs"] == 1
    assert "vitpcm --help" in capsys.readouterr().out


def test_bench_help_and_authors_path_import_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from vitpcm.cli import main\n"
        "import vitpcm.stages.bench, vitpcm.stages.bench.crf_authors\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_section_is_refused():
    from vitpcm.errors import VitpcmError

    with pytest.raises(VitpcmError, match="unknown bench section"):
        bench(quick=True, sections=["nope"])


def test_compile_blocks_keeps_state_dict_and_outputs():
    import torch

    from vitpcm.models.speed import attention_report, compile_blocks
    from vitpcm.models.vitpcm import ViTPCM

    torch.manual_seed(0)
    kw = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    model = ViTPCM("vit_tiny_patch16_224", 3, backbone_kwargs=kw, lstm_hidden=8).eval()
    report = attention_report(model)
    assert report["blocks"] == 2 and report["fused_blocks"] == (2 if report["timm_use_fused_attn"] else 0)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)["probs"]
    keys = list(model.state_dict())
    assert compile_blocks(model) == 2
    assert list(model.state_dict()) == keys  # checkpoints stay compatible
    assert torch.allclose(model(x)["probs"], ref, atol=1e-5)


def test_train_step_with_train_compile(tmp_path):
    # PcmTask.setup compiles the blocks (train.compile=true); one measured step runs through them
    result = bench("synthetic", quick=True, sections=["train"], overrides=["train.compile=true"], progress=False,
                   threads=1, train_steps=1)  # fmt: skip
    t = result["train"]
    assert t["compile"] is True and t["steps"] == 1 and t["step_seconds"] > 0


def test_train_section_times_the_engines_own_step(monkeypatch):
    # the measured step is the Trainer's own step (what `vitpcm train` runs per batch), not a copy
    from vitpcm.engine.step import Stepper

    engine_step = Stepper.training_step
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(self)
        return engine_step(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "training_step", counted)
    result = bench("synthetic", quick=True, sections=["train"], progress=False, threads=1, train_steps=1)
    assert len(calls) == 2 and isinstance(calls[0], Stepper)  # the warm-up step and the measured one
    assert result["train"]["steps"] == 1 and result["train"]["step_seconds"] > 0
