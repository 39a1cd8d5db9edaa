"""The train stage: a config in, a run folder written, a summary dict out.

``train(cfg, run)`` prepares the config once (:func:`vitpcm.stages.config.prepare_config`:
``input.mean`` / ``input.std`` ``auto`` resolved, sizes checked), then runs the ViT-PCM task
(:class:`vitpcm.tasks.pcm.PcmTask`) on the generic engine (:class:`vitpcm.engine.trainer.Trainer`).

``train(None, run, resume=True)`` continues a run with its own config (``RUN/config.yaml``,
else the copy in ``checkpoints/last.pt``): nothing needs repeating. Overrides on resume may
change only :data:`vitpcm.config.RESUME_KEYS` (nothing that changes the model, the data or
its order); each change is logged and recorded in ``RUN/logs/resumes.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

from omegaconf import DictConfig

from vitpcm.config import to_yaml
from vitpcm.engine.trainer import Trainer
from vitpcm.stages.config import prepare_config
from vitpcm.tasks.pcm import PcmTask, train_settings


def train(
    cfg: Union[DictConfig, str, Path, None],
    run: Union[str, Path],
    *,
    resume: bool = False,
    overrides: Sequence[str] = (),
    skip_bad: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ViT-PCM as ``cfg`` says, writing the run folder ``run``.

    Args:
        cfg: a loaded config (:func:`vitpcm.load_config`), a preset name or a YAML path;
            ``None`` with ``resume``: the run's own config.
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
    prepared = prepare_config(cfg, overrides, resume=run if resume else None)
    task = PcmTask(prepared.cfg, skip_bad=skip_bad)
    trainer = Trainer(task, run, train_settings(prepared.cfg), resume=resume, progress=progress,
                      config_text=to_yaml(prepared.cfg), resume_changes=prepared.changes)  # fmt: skip
    result = trainer.fit()
    result["changed"] = {k: list(v) for k, v in prepared.changes.items()}
    return result
