"""A vitpcm command run as one process and as two torchrun CPU ranks, for the tests that
check both write the same files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence, Tuple

#: what an outer launcher may have set; each run starts its own process group
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_PORT")


def one_and_two_ranks(
    tail: Sequence[str], out: Path, timeout: int = 240
) -> Tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """``vitpcm *tail --out out/one`` in one process, then under ``torchrun --nproc_per_node 2``
    with ``--out out/two``; both must exit 0 (their stderr tail is the failure message)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in LAUNCHER_VARS:
        env.pop(key, None)
    one = subprocess.run([sys.executable, "-m", "vitpcm", *tail, "--out", str(out / "one")], env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitpcm", *tail, "--out", str(out / "two")]  # fmt: skip
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert two.returncode == 0, two.stderr[-2000:]
    return one, two
