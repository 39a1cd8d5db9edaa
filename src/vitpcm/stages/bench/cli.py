"""The ``cli`` section: wall time of ``vitpcm --help`` and ``vitpcm crf --help``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from vitpcm.stages.bench.timing import median, rounded, timed_process, vitpcm_command


def bench_cli(runs: int) -> Dict[str, Any]:
    """Wall time of ``vitpcm --help`` and ``vitpcm crf --help`` (fresh processes)."""
    cmd = vitpcm_command()
    out: Dict[str, Any] = {"runs": runs, "command": " ".join(Path(c).name for c in cmd)}
    for key, args in (("help_seconds", ["--help"]), ("crf_help_seconds", ["crf", "--help"])):
        times = [timed_process([*cmd, *args])[0] for _ in range(runs)]
        out[key] = rounded(median(times), 3)
        out[f"{key}_runs"] = [rounded(t, 3) for t in times]
    return out
