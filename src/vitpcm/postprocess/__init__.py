"""Post-processing of pseudo-masks: the dense CRF of the paper (``crf.py``: the maths;
``crf_runner.py``: folders of images, resumable and parallel; ``probs_file.py``: the
probabilities file it reads). numpy and pydensecrf only (no torch, except the torch backend
``crf_torch.py`` when it runs): ``vitpcm crf`` runs on CPU boxes."""

from vitpcm.postprocess.crf import CRFParams, crf_labels, dense_crf
from vitpcm.postprocess.crf_runner import run_crf
from vitpcm.postprocess.probs_file import load_probs

__all__ = ["CRFParams", "crf_labels", "dense_crf", "load_probs", "run_crf"]
