"""The resume policy: which keys may change on ``vitpcm train --resume``, and what changed."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from vitpcm.errors import VitpcmError

#: Keys an override may change on ``vitpcm train --resume``: none of them changes the model,
#: the data it trains on or the order the data comes in (docs/reliability.md). A trailing
#: ``.*`` takes a whole section. Every change is logged and kept in RUN/logs/resumes.jsonl.
RESUME_KEYS: Tuple[str, ...] = (
    "data.root",  # the same dataset, moved
    "data.num_workers",
    "data.transforms_on",  # the same draws either way (float rounding between devices)
    "train.epochs",  # train longer (with train.schedule=cosine the remaining lr curve changes)
    "train.lr",  # after a divergence: go on from the last good checkpoint more gently
    "train.warmup_lr",
    "train.max_loss",
    "train.checkpoint_every",
    "train.val_every",
    "train.val_batch_size",
    "train.log_every",
    "train.device",
    "train.threads",
    "train.amp",
    "infer.*",
    "crf.*",
)


def _leaves(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_changes(old: DictConfig, new: DictConfig) -> Dict[str, Tuple[Any, Any]]:
    """Dotted keys whose values differ between two configs: ``{key: (old, new)}`` (lists
    compare whole; a key present on one side only counts as a change)."""
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_allowed(key: str, allowed: Sequence[str] = RESUME_KEYS) -> bool:
    """Whether ``key`` may change on resume (:data:`RESUME_KEYS`)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in allowed)


def check_resume_changes(
    changes: Dict[str, Tuple[Any, Any]], allowed: Sequence[str] = RESUME_KEYS, hint: str = ""
) -> None:
    """Refuse, in one line, changes of keys that may not change on resume."""
    refused = [k for k in changes if not resume_allowed(k, allowed)]
    if not refused:
        return
    shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:4])
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    raise VitpcmError(
        f"--resume: {shown}{more} cannot change on resume: {'it changes' if len(refused) == 1 else 'they change'}"
        f" the model or the data and its order. Only {', '.join(allowed)} may change;{hint} to train"
        " otherwise, start a new run with another --out"
    )
