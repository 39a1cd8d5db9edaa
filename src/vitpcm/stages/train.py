"""The train stage: a config in, a run folder written, a summary dict out.

``train(cfg, run)`` resolves what depends on the backbone (``input.mean`` / ``input.std``
``auto``, size checks), then runs the ViT-PCM task (:class:`vitpcm.tasks.pcm.PcmTask`) on
the generic engine (:class:`vitpcm.engine.trainer.Trainer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

from omegaconf import DictConfig

from vitpcm.config import to_yaml


def train(
    cfg: DictConfig,
    run: Union[str, Path],
    *,
    resume: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Train ViT-PCM as ``cfg`` says, writing the run folder ``run``.

    Args:
        cfg: a loaded config (:func:`vitpcm.load_config`).
        run: the run folder (``vitpcm train --out``); an existing run needs ``resume``.
        resume: continue from ``RUN/checkpoints/last.pt``.
        skip_bad: leave broken data items out (listed in ``RUN/skipped.txt``) instead of
            refusing to start.
        progress: progress bars (rank 0 only).

    Returns:
        ``{"run": str, "best_miou": float | None, "epochs": int, "history": [row, ...]}``
        where each row is the epoch's line of ``logs/metrics.jsonl``.
    """
    from vitpcm.engine.trainer import Trainer
    from vitpcm.models.backbone import resolve_config
    from vitpcm.tasks.pcm import PcmTask, train_settings

    cfg = resolve_config(cfg)  # auto mean/std -> numbers (written to config.yaml), sizes checked
    task = PcmTask(cfg, skip_bad=skip_bad)
    trainer = Trainer(task, run, train_settings(cfg), resume=resume, progress=progress, config_text=to_yaml(cfg))
    return trainer.fit()
