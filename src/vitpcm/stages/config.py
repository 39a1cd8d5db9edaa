"""The one config path: a preset, YAML file, loaded config or run folder, plus overrides, is
loaded, layered, resolved against its backbone and checked once (on resume, against the run).

Every stage that trains or builds a model takes its config from :func:`prepare_config`;
below it (tasks, models, the engine) the values are read as they are, never resolved or
checked again. Imports timm: the backbone is described on the meta device (no weights, no
network, about 0.1 s).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig

from vitpcm.config import (
    check_resume_changes,
    check_sizes,
    config_changes,
    load_config,
    normalisation_values,
    run_config,
)
from vitpcm.engine.checkpoint import checkpoint_config
from vitpcm.errors import VitpcmError
from vitpcm.models.backbone import describe_configured_backbone
from vitpcm.runs import RunLayout

#: What a config may come from: a preset name or YAML path, a loaded config (or its dict),
#: or a run folder as a :class:`RunLayout` (its ``config.yaml``, else its checkpoint's copy).
ConfigSource = Union[str, Path, DictConfig, Dict[str, Any], RunLayout]


@dataclass(frozen=True)
class PreparedConfig:
    """What :func:`prepare_config` returns.

    ``cfg``: the resolved config (``input.mean`` / ``input.std`` as numbers, sizes checked),
    what ``RUN/config.yaml`` holds. ``changes``: on resume, ``{dotted key: (old, new)}`` of
    what differs from the run's own config (only keys of :data:`vitpcm.config.RESUME_KEYS`).
    """

    cfg: DictConfig
    changes: Dict[str, Tuple[Any, Any]] = field(default_factory=dict)


def prepare_config(
    source: Optional[ConfigSource],
    overrides: Sequence[str] = (),
    *,
    resume: Union[str, Path, RunLayout, None] = None,
    check: bool = True,
) -> PreparedConfig:
    """Load, layer, resolve and check a config, once.

    Args:
        source: a preset name (``synthetic``, ``voc12``, ...), a YAML path, a loaded config
            (:func:`vitpcm.load_config`; a DictConfig is used as it is when no overrides
            come), or a run folder as a :class:`RunLayout`. ``None`` only with ``resume``:
            the run's own config.
        overrides: ``key=value`` on top of ``source``.
        resume: the run folder being continued. Its config (``config.yaml``, else the copy in
            ``checkpoints/last.pt``) is the base; ``source`` and ``overrides`` may change only
            :data:`vitpcm.config.RESUME_KEYS`, else one :class:`VitpcmError` names the keys.
            A folder that holds no run yet starts from ``source``.
        check: check every size against the backbone's patch size (:func:`resolve_config`).

    Returns a :class:`PreparedConfig`. Raises :class:`VitpcmError` for a missing preset, a
    bad key or value, a size that does not fit the patch, or a change refused on resume.
    """
    if resume is not None:
        layout = resume if isinstance(resume, RunLayout) else RunLayout(resume)
        try:
            saved = saved_run_config(layout)
        except VitpcmError:
            saved = None
        if saved is not None:
            return _prepare_resume(saved, source, overrides, check)
        if source is None:
            raise VitpcmError(
                f"--resume: {layout.root} holds no run (no config.yaml, no checkpoint): nothing to resume"
            )
    elif source is None:
        raise VitpcmError("a new run needs a config: a preset name (synthetic, voc12, coco14) or a YAML file")
    loaded = _load(source, overrides)
    return PreparedConfig(resolve_config(loaded, check=check))


def _prepare_resume(
    saved: DictConfig, source: Optional[ConfigSource], overrides: Sequence[str], check: bool
) -> PreparedConfig:
    """The resumed run's config: ``saved`` (the run's own) is the base, ``source`` (a preset
    given again) or the base itself, then ``overrides``, may change only RESUME_KEYS."""
    old = resolve_config(saved, check=False)  # the base: written by a run that was checked
    loaded = _load(old if source is None else source, overrides)
    new = resolve_config(loaded, check=check)
    hint = ""
    if source is not None:
        hint = " leave out the preset on --resume (the run's config.yaml is used) and give only the keys to change;"
    changes = config_changes(old, new)
    check_resume_changes(changes, hint=hint)
    return PreparedConfig(new, changes)


def saved_run_config(run: Union[str, Path, RunLayout], overrides: Sequence[str] = ()) -> DictConfig:
    """A run's config as written (``RUN/config.yaml``, else the copy stored in
    ``checkpoints/last.pt``), then ``overrides``; not resolved (:func:`vitpcm.config.run_config`)."""
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    last = layout.checkpoint("last")
    return run_config(layout, overrides, stored=lambda: checkpoint_config(last) if last.is_file() else None)


def resolve_config(cfg: DictConfig, check: bool = True) -> DictConfig:
    """A copy of ``cfg`` with what depends on the backbone resolved: ``input.mean`` /
    ``input.std`` ``auto`` -> the timm model's pretrained values; with ``check``, every size
    checked against the patch size (:func:`vitpcm.config.check_sizes`, one
    :class:`VitpcmError` naming the wrong keys). The backbone is described only when a value
    is ``auto`` or ``check`` asks for its patch size."""
    mean, std = normalisation_values(cfg, "mean"), normalisation_values(cfg, "std")
    adapter = describe_configured_backbone(cfg) if check or mean is None or std is None else None
    out = copy.deepcopy(cfg)  # keeps the typed schema: later overrides are still checked
    out.input.mean = [float(v) for v in (mean if mean is not None else adapter.mean)]
    out.input.std = [float(v) for v in (std if std is not None else adapter.std)]
    if check:
        check_sizes(out, adapter.patch_size, str(cfg.model.backbone))
    return out


def resolved_config(preset: str | Path | None, overrides: Sequence[str] = (), check: bool = True) -> DictConfig:
    """What ``vitpcm config`` prints: :func:`prepare_config` of a preset (or YAML file) and
    overrides, its config alone; no preset: the library defaults."""
    return prepare_config(load_config() if preset is None else preset, overrides, check=check).cfg


def _load(source: ConfigSource, overrides: Sequence[str]) -> DictConfig:
    """``source`` (see :func:`prepare_config`) with ``overrides``, loaded and validated."""
    if isinstance(source, RunLayout):
        return saved_run_config(source, overrides)
    if isinstance(source, DictConfig) and not overrides:
        return source
    return load_config(source, overrides)
