"""The train stage: a config in, a run folder written, a summary dict out.

``train(cfg, run)`` resolves what depends on the backbone (``input.mean`` / ``input.std``
``auto``, size checks), then runs the ViT-PCM task (:class:`vitpcm.tasks.pcm.PcmTask`) on
the generic engine (:class:`vitpcm.engine.trainer.Trainer`).

``train(None, run, resume=True)`` continues a run with its own config (``RUN/config.yaml``,
else the copy in ``checkpoints/last.pt``): nothing needs repeating. Overrides on resume may
change only :data:`vitpcm.config.RESUME_KEYS` (nothing that changes the model, the data or
its order); each change is logged and recorded in ``RUN/logs/resumes.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from omegaconf import DictConfig

from vitpcm.config import check_resume_changes, config_changes, load_config, run_config, to_yaml
from vitpcm.errors import VitpcmError
from vitpcm.runs import RunLayout


def train(
    cfg: Optional[DictConfig],
    run: Union[str, Path],
    *,
    resume: bool = False,
    overrides: Sequence[str] = (),
    skip_bad: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ViT-PCM as ``cfg`` says, writing the run folder ``run``.

    Args:
        cfg: a loaded config (:func:`vitpcm.load_config`); ``None`` with ``resume``: the
            run's own config.
        run: the run folder (``vitpcm train --out``); an existing run needs ``resume``.
        resume: continue from ``RUN/checkpoints/last.pt`` (mid-epoch too).
        overrides: ``key=value`` applied on ``cfg`` (or on the run's config with ``cfg=None``).
            On resume only keys of :data:`vitpcm.config.RESUME_KEYS` may differ from the
            run's config; others are refused in one line.
        skip_bad: leave broken data items out (listed in ``RUN/skipped.txt``) instead of
            refusing to start.
        progress: progress bars (rank 0 only).

    Returns:
        ``{"run": str, "best_miou": float | None, "epochs": int, "history": [row, ...],
        "changed": {key: [old, new]}}`` where each row is the epoch's line of
        ``logs/metrics.jsonl`` and ``changed`` what a resume changed.

    Raises :class:`vitpcm.engine.trainer.TrainingStopped` after SIGTERM / SIGINT (a
    checkpoint was saved; resume with ``resume=True``).
    """
    from vitpcm.engine.trainer import Trainer
    from vitpcm.models.backbone import resolve_config
    from vitpcm.tasks.pcm import PcmTask, train_settings

    changes: Dict[str, Any] = {}
    if resume:
        cfg, changes = resume_config(run, cfg, overrides)
    else:
        if cfg is None:
            raise VitpcmError("a new run needs a config: a preset name (synthetic, voc12, coco14) or a YAML file")
        if overrides:
            cfg = load_config(cfg, overrides)
        cfg = resolve_config(cfg)  # auto mean/std -> numbers (written to config.yaml), sizes checked
    task = PcmTask(cfg, skip_bad=skip_bad)
    trainer = Trainer(task, run, train_settings(cfg), resume=resume, progress=progress, config_text=to_yaml(cfg),
                      resume_changes=changes)  # fmt: skip
    result = trainer.fit()
    result["changed"] = {k: list(v) for k, v in changes.items()}
    return result


def resume_config(
    run: Union[str, Path], cfg: Optional[DictConfig] = None, overrides: Sequence[str] = ()
) -> tuple[DictConfig, Dict[str, Any]]:
    """The config to resume ``run`` with, and what changes: ``(config, {key: (old, new)})``.

    The run's config (``config.yaml``, else the copy in ``checkpoints/last.pt``) is the base;
    ``cfg`` (a preset given again), then ``overrides``, may change only the keys of
    :data:`vitpcm.config.RESUME_KEYS`, else one :class:`VitpcmError` names the keys.
    """
    from vitpcm.engine.checkpoint import checkpoint_config
    from vitpcm.models.backbone import resolve_config

    layout = RunLayout(run)
    last = layout.checkpoint("last")
    try:
        saved = run_config(layout, (), stored=lambda: checkpoint_config(last) if last.is_file() else None)
    except VitpcmError:
        saved = None
    if saved is None:
        if cfg is None:
            raise VitpcmError(
                f"--resume: {layout.root} holds no run (no config.yaml, no checkpoint): nothing to resume"
            )
        new = resolve_config(load_config(cfg, overrides) if overrides else cfg)
        return new, {}
    old = resolve_config(saved)
    if cfg is None:
        new = resolve_config(load_config(old, overrides) if overrides else old)
        hint = ""
    else:
        new = resolve_config(load_config(cfg, overrides) if overrides else cfg)
        hint = " leave out the preset on --resume (the run's config.yaml is used) and give only the keys to change;"
    changes = config_changes(old, new)
    check_resume_changes(changes, hint=hint)
    return new, changes
