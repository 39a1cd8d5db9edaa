"""The engine's settings from a config: the fields every task fills the same way."""

from __future__ import annotations

from omegaconf import DictConfig

from vitpcm.engine.trainer import TrainSettings


def engine_settings(cfg: DictConfig, *, epochs: int, batch_size: int, val_every: int) -> TrainSettings:
    """:class:`TrainSettings` of a task that trains ``epochs`` epochs of ``batch_size`` images
    per process, validating every ``val_every`` epochs.

    The rest is shared by every task: ``train.seed``, ``device``, ``threads``, ``amp``,
    ``log_every``, the reliability knobs (``deterministic``, ``checkpoint_every``,
    ``max_loss``: exact resume, mid-epoch checkpoints, the divergence bound) and
    ``data.num_workers``.
    """
    t = cfg.train
    return TrainSettings(
        epochs=int(epochs),
        batch_size=int(batch_size),
        seed=int(t.seed),
        device=str(t.device),
        threads=int(t.threads),
        amp=bool(t.amp),
        val_every=int(val_every),
        log_every=int(t.log_every),
        num_workers=int(cfg.data.num_workers),
        deterministic=bool(t.deterministic),
        checkpoint_every=int(t.checkpoint_every),
        max_loss=float(t.max_loss),
    )
