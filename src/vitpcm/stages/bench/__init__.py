"""``vitpcm bench``: what the pipeline costs next to what it cannot avoid, measured side by side.

In one process, on one device, each part beside its floor, one runner per section:

=========  ===================================================================================
section    what is measured (the runner's module docstring says how)
=========  ===================================================================================
infer      the inference stage vs the bare backbone forward (``infer_ratio``): ``infer.py``
train      the engine's own training step (``Trainer``) vs the bare backbone doing the same work
           (``train_ratio``): ``train.py``
crf        ``vitpcm crf`` vs the authors' CRF stage at equal cores (``crf_speedup``), pixel
           agreement, ``crf.backend=torch`` beside pydensecrf: ``crf.py``, ``crf_authors.py``
cli        wall time of ``vitpcm --help`` and ``vitpcm crf --help``: ``cli.py``
=========  ===================================================================================

``runner.py`` runs the sections and checks the targets (:func:`bench`, :func:`format_bench`);
``machine.py`` records the machine, ``memory.py`` the peak memory, ``timing.py`` the clocks,
``fixtures.py`` makes the data, the config and the run folder measured.

Each pair runs interleaved (pipeline, floor, pipeline, floor, ...; the order alternates per
training step) so that load from other processes hits both alike; the medians and ratios
come from the same run. Memory: the peak of the CUDA allocator on a GPU, else the peak
resident set size of this process (sampled every 5 ms), taken on the warm-up run of each
side (the timed runs run without the sampling thread).

The data are the built-in synthetic shapes upscaled to VOC sizes (500 x 375 / 375 x 500);
the model is the preset's architecture with random weights (the cost does not depend on
the weights). ``quick`` uses a tiny ViT and tiny images: seconds, for the test suite (its
numbers say nothing about speed).

This package imports its runners only when :func:`bench` or :func:`format_bench` is asked
for: ``vitpcm bench --help`` and the authors' CRF process (``python -m
vitpcm.stages.bench.crf_authors``) stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SECTIONS", "TARGETS", "bench", "format_bench"]


def __getattr__(name: str) -> Any:
    """``bench``, ``format_bench``, ``TARGETS``, ``SECTIONS`` from :mod:`.runner`, on first use."""
    if name in __all__:
        return getattr(importlib.import_module("vitpcm.stages.bench.runner"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
