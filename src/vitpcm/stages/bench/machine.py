"""The machine a bench ran on: CPU, cores, memory, library versions, load, the GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import timm
import torch
from timm.layers import use_fused_attn

from vitpcm.utils.system import cpu_count


def machine_info(device: str = "cpu") -> Dict[str, Any]:
    """CPU model, cores, memory, library versions, load, and the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info: Dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "timm_fused_attention": bool(use_fused_attn()),
        "loadavg_1min": load_average(),
        "processes_running": running_processes(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}  # fmt: skip
    return info


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the system has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def running_processes() -> Optional[int]:
    """Processes in state R (running or runnable) right now, this one included (Linux)."""
    try:
        text = Path("/proc/loadavg").read_text().split()
        return int(text[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
