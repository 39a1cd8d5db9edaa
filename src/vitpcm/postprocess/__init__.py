"""Post-processing of pseudo-masks: the dense CRF of the paper (``crf.py``)."""

from vitpcm.postprocess.crf import CRFParams, crf_labels, dense_crf, run_crf

__all__ = ["CRFParams", "crf_labels", "dense_crf", "run_crf"]
