"""YAML layering: defaults <- a preset and the presets it names as base <- dotted overrides;
a run's saved config read back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from vitpcm.config.schema import Config, ModelConfig
from vitpcm.config.validate import validate_config
from vitpcm.errors import VitpcmError
from vitpcm.runs import RunLayout

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> List[str]:
    """Names of the presets shipped with the package (``vitpcm/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(preset: Union[str, Path]) -> Path:
    """Path of a YAML preset given as a file path or a shipped preset name."""
    path = Path(preset)
    if path.is_file():
        return path
    named = PRESET_DIR / f"{preset}.yaml"
    if named.is_file() and path.suffix == "":
        return named
    raise VitpcmError(f"config '{preset}' not found: give a YAML file or one of the presets {preset_names()}")


def _bad_key_message(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    parent = str(key).rsplit(".", 1)[0] if "." in str(key) else ""
    node = OmegaConf.structured(Config)
    valid: Sequence[str] = []
    try:
        sub = OmegaConf.select(node, parent) if parent else node
        if isinstance(sub, DictConfig):
            valid = list(sub.keys())
    except OmegaConfBaseException:
        pass
    hint = f"; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}" if valid else ""
    return f"unknown config key '{key}' in {where}{hint}"


def _bad_value_message(exc: OmegaConfBaseException, where: str) -> str:
    key = getattr(exc, "full_key", None) or "?"
    return f"bad value for '{key}' in {where}: {str(exc).splitlines()[0]}"


#: Top-level keys by which a YAML file names the preset(s) it builds on (``base: synthetic``;
#: ``_base_`` as in mmsegmentation; a name, a path relative to the file, or a list of them).
BASE_KEYS = ("base", "_base_")


def _read_yaml(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in many types
        raise VitpcmError(f"cannot parse config {path}: {exc}") from None


def _preset_layers(
    preset: Union[str, Path, DictConfig, Dict[str, Any]], seen: Tuple[Path, ...] = ()
) -> List[Tuple[str, Any]]:
    """The YAML layers of ``preset`` in merge order: its base presets first (``base:``), then
    the file itself (without the base key). A dict / DictConfig is one layer (a saved config).

    A user's file that names no base is layered on the library defaults (VOC 2012 with the
    ViT-B/16 of the hub); one INFO line says which base was used, so a short file meant for
    the CPU preset does not silently try to fetch ViT-B weights.
    """
    if isinstance(preset, (dict, DictConfig)):
        return [("the saved config", OmegaConf.create(preset) if isinstance(preset, dict) else preset)]
    path = resolve_preset(preset) if not seen else Path(preset)
    if path.resolve() in seen:
        raise VitpcmError(f"config {path} names itself as a base (through {' -> '.join(map(str, seen))})")
    loaded = _read_yaml(path)
    bases: List[str] = []
    if isinstance(loaded, DictConfig):
        for key in BASE_KEYS:
            if key in loaded:
                value = loaded.pop(key)
                bases += [str(v) for v in value] if isinstance(value, ListConfig) else [str(value)] if value else []
    layers: List[Tuple[str, Any]] = []
    for name in bases:
        local = path.parent / name
        base_path = local if local.is_file() else resolve_preset(name)
        layers += _preset_layers(base_path, (*seen, path.resolve()))
    if not seen:  # the file given, not one of its bases: say what it stands on
        sections = set(Config.__dataclass_fields__)
        complete = isinstance(loaded, DictConfig) and sections <= set(loaded.keys())
        if bases:
            log.info("config %s: based on %s", path, ", ".join(bases))
        elif path.parent.resolve() != PRESET_DIR and not complete:
            log.info(
                "config %s names no base: its keys are layered on the library defaults (VOC 2012, %s with hub"
                " weights); write `base: synthetic` (or voc12, coco14, a YAML path) in it to start from a preset",
                path, ModelConfig.backbone,
            )  # fmt: skip
    layers.append((str(path), loaded))
    return layers


def load_config(
    preset: Union[str, Path, DictConfig, Dict[str, Any], None] = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """Build the config: defaults <- preset YAML (after the presets it names as ``base``) <-
    ``key=value`` overrides. ``preset`` may also be a config dict (a run's saved config).

    Raises :class:`VitpcmError` for a missing preset, an unknown key or a badly typed value.
    """
    cfg = OmegaConf.structured(Config)
    if preset is not None:
        for where, loaded in _preset_layers(preset):
            try:
                cfg = OmegaConf.merge(cfg, loaded)
            except (ConfigKeyError, ConfigAttributeError) as exc:
                raise VitpcmError(_bad_key_message(exc, where)) from None
            except OmegaConfBaseException as exc:
                raise VitpcmError(_bad_value_message(exc, where)) from None
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise VitpcmError(f"override '{item}' is not of the form key=value (e.g. train.epochs=3)")
    if overrides:
        try:
            given = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as exc:
            raise VitpcmError(_bad_value_message(exc, "the overrides")) from None
        _reset_backbone_kwargs(cfg, given)
        try:
            cfg = OmegaConf.merge(cfg, given)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            raise VitpcmError(_bad_key_message(exc, "the overrides")) from None
        except OmegaConfBaseException as exc:
            raise VitpcmError(_bad_value_message(exc, "the overrides")) from None
    validate_config(cfg)
    return cfg


def _reset_backbone_kwargs(cfg: DictConfig, given: DictConfig) -> None:
    """Drop the preset's ``model.backbone_kwargs`` when the overrides switch ``model.backbone``.

    The kwargs describe the preset's backbone (the synthetic preset's patch-8, 4-block ViT);
    on another backbone they would silently change its shape. Kept when the overrides also
    touch ``model.backbone_kwargs`` (then the preset's kwargs are still dropped and only the
    overridden ones apply), or when the backbone does not change.
    """
    model = given.get("model") if isinstance(given, DictConfig) else None
    if not isinstance(model, DictConfig) or "backbone" not in model:
        return
    new, old = str(model.backbone), str(cfg.model.backbone)
    kwargs = OmegaConf.to_container(cfg.model.backbone_kwargs, resolve=True)
    if new == old or not kwargs:
        return
    cfg.model.backbone_kwargs = {}
    if "backbone_kwargs" in model:
        log.info(
            "model.backbone %s -> %s: the preset's model.backbone_kwargs %s dropped; the overridden ones apply",
            old,
            new,
            kwargs,
        )
    else:
        log.info(
            "model.backbone %s -> %s: the preset's model.backbone_kwargs %s dropped (they describe %s;"
            " set model.backbone_kwargs.KEY=VALUE to pass some to the new backbone)", old, new, kwargs, old,
        )  # fmt: skip


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text (saved in every run folder)."""
    return OmegaConf.to_yaml(cfg, resolve=True)


#: Runs saved before ``input.mean`` / ``input.std`` existed were fed [-1, 1] whatever the backbone.
LEGACY_NORMALISATION = ["input.mean=[0.5,0.5,0.5]", "input.std=[0.5,0.5,0.5]"]


def load_saved_config(path: Union[str, Path, DictConfig, Dict[str, Any]], overrides: Sequence[str] = ()) -> DictConfig:
    """Load a run's saved ``config.yaml`` (or the config dict stored in a checkpoint), then
    ``overrides``, keeping the run's normalisation.

    A run saved before ``input.mean`` / ``input.std`` existed was trained on [-1, 1] inputs
    whatever its backbone; ``auto`` would now give e.g. DINOv2 ImageNet statistics, so such a
    file gets 0.5 / 0.5 pinned (the same values for the authors' ViT and the demo).
    """
    if isinstance(path, (dict, DictConfig)):
        saved: Any = OmegaConf.create(path) if isinstance(path, dict) else path
        where: Any = "the checkpoint's config"
        source: Any = saved
    else:
        source = where = resolve_preset(path)
        saved = _read_yaml(source)
    section = saved.get("input") if isinstance(saved, DictConfig) else None
    legacy = isinstance(section, DictConfig) and "train_size" in section and "mean" not in section
    if legacy:
        log.info("%s predates input.mean/std: the run was trained on [-1, 1] inputs, pinned as 0.5 / 0.5", where)
    return load_config(source, [*(LEGACY_NORMALISATION if legacy else []), *overrides])


def run_config(
    run: Any,
    overrides: Sequence[str] = (),
    stored: Union[Dict[str, Any], Callable[[], Optional[Dict[str, Any]]], None] = None,
) -> DictConfig:
    """The config a run was trained with, then ``overrides``: ``RUN/config.yaml``, else the
    copy its checkpoint stores (``stored``: that dict, or a function returning it or None,
    called only when the file is missing; e.g. ``lambda:
    vitpcm.engine.checkpoint.checkpoint_config(path)``). ``run``: a folder or a RunLayout.

    Raises :class:`VitpcmError` when neither exists (rather than falling back to the library
    defaults, which would silently change sizes and models).
    """
    layout = run if isinstance(run, RunLayout) else RunLayout(run)
    if layout.config.is_file():
        return load_saved_config(layout.config, overrides)
    saved = stored() if callable(stored) else stored
    if saved:
        log.info("%s has no config.yaml: using the config stored in its checkpoint", layout.root)
        return load_saved_config(dict(saved), overrides)
    raise VitpcmError(
        f"{layout.root} has no config.yaml and its checkpoint stores no config: give the run folder of"
        " `vitpcm train` (or put the run's config.yaml back)"
    )
