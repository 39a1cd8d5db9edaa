"""Post-processing of pseudo-masks: the dense CRF of the paper (``crf.py``). numpy and
pydensecrf only (no torch): ``vitpcm crf`` runs on CPU boxes."""

from vitpcm.postprocess.crf import CRFParams, crf_labels, dense_crf, load_probs, run_crf

__all__ = ["CRFParams", "crf_labels", "dense_crf", "load_probs", "run_crf"]
