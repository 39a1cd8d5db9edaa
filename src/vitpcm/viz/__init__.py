"""What ``vitpcm report`` and ``vitpcm evaluate --out`` draw and render (no torch).

* :mod:`.figures`: matplotlib (Agg) figures: Fig. S1 heat maps, Fig. S2 mask rows,
  training curves, per-class IoU bars, confusion matrices.
* :mod:`.html`: the self-contained report page.

The stage that gathers a run's results into ``RUN/report.html`` is
:func:`vitpcm.stages.report.report`.
"""
