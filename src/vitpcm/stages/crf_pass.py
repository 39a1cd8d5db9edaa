"""The dense CRF inside ``vitpcm infer --crf`` when ``crf.backend`` resolves to torch.

On a GPU (``crf.backend=auto`` or ``torch``), each inference batch is refined on the device
right after the forward, from the probabilities already there: no npz read back, no process
pool. :class:`DeviceCRF` writes ``crf/NAME.png`` with the stamp of the CRF stage (the same
key as ``vitpcm crf --backend torch``: :func:`vitpcm.postprocess.crf_runner.settings_key`), after
the image's npz, so the CRF stage chained after inference finds these masks finished and
refines only what the pass left out: images whose probabilities are stored smaller than
the image (``infer.max_side``) or larger than ``crf.max_pixels`` (solved there at a
reduced size), and nothing else. A mask is never lost: out of GPU memory, a batch is split
in halves, and an image that does not fit alone is refined on the CPU, with a warning.

The CRF's input is what the CRF stage would read from the npz: the kept channels of the
full-size probabilities (float32) and the image file decoded by
:func:`vitpcm.images.load_rgb`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vitpcm.crf_params import CRFParams
from vitpcm.images import load_rgb
from vitpcm.io import save_mask_png
from vitpcm.postprocess.crf_runner import settings_key
from vitpcm.postprocess.crf_torch import LatticeKeyError, dense_crf_batch
from vitpcm.utils.stamps import stamp

log = logging.getLogger(__name__)


class DeviceCRF:
    """Refines inference batches with the torch CRF backend on ``device``.

    Args:
        crf_cfg: the config's ``crf`` section (parameters, ``max_pixels``).
        device: where the CRF runs (the inference device).
        out_dir: the ``crf/`` folder of the pseudo-masks.
        image_path: the original image file of a name (the dataset's ``image_path``).
    """

    def __init__(self, crf_cfg: Any, device: torch.device, out_dir: Path, image_path: Callable[[str], Path]) -> None:
        self.params = CRFParams.from_config(crf_cfg)
        self.max_pixels = int(getattr(crf_cfg, "max_pixels", 0) or 0)
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.image_path = image_path
        self.text = stamp("crf", settings_key(self.params, self.max_pixels, "torch"))
        self.refined = 0  # masks written by the pass
        self.left = 0  # images left to the CRF stage (stored smaller, or above crf.max_pixels)
        self.on_cpu = 0  # images that did not fit the device's memory alone

    @staticmethod
    def wanted(crf_cfg: Any, device: torch.device) -> bool:
        """Whether ``crf.backend`` resolves to torch on ``device`` (then the pass runs)."""
        return CRFParams.from_config(crf_cfg).resolved_backend(str(device)) == "torch"

    def masks(self, items: Sequence[Tuple[str, torch.Tensor, np.ndarray, Tuple[int, int]]]) -> Dict[str, np.ndarray]:
        """CRF masks of one batch.

        ``items``: ``(name, probs [P, h, w] on the device, classes [P] int64, image size (H, W))``
        per image, ``probs`` the kept channels as the npz stores them. Returns ``{name: [H, W]
        uint8 mask}`` for the images the pass refines (the others are counted in ``left``).
        """
        out: Dict[str, np.ndarray] = {}
        todo: List[Tuple[str, torch.Tensor, np.ndarray, np.ndarray]] = []
        for name, probs, classes, size in items:
            if len(classes) == 1:
                out[name] = np.full(size, classes[0], dtype=np.uint8)
                continue
            h, w = probs.shape[1:]
            if (h, w) != tuple(size) or (self.max_pixels and h * w > self.max_pixels):
                self.left += 1
                continue
            image = load_rgb(self.image_path(name))
            if image.shape[:2] != (h, w):  # the CRF stage says why, naming the file
                self.left += 1
                continue
            todo.append((name, probs, classes, image))
        # chunks of at most crf.max_pixels pixels: the bound of one CRF holds for a batch too
        chunk: List[Tuple[str, torch.Tensor, np.ndarray, np.ndarray]] = []
        for item in todo:
            pixels = sum(p.shape[1] * p.shape[2] for _, p, _, _ in chunk)
            if chunk and self.max_pixels and pixels + item[1].shape[1] * item[1].shape[2] > self.max_pixels:
                out.update(self._refine(chunk))
                chunk = []
            chunk.append(item)
        if chunk:
            out.update(self._refine(chunk))
        self.refined += len(out)
        return out

    def _refine(self, chunk: Sequence[Tuple[str, torch.Tensor, np.ndarray, np.ndarray]]) -> Dict[str, np.ndarray]:
        """Labels of a chunk; halves it when the device runs out of memory, down to one image
        on the CPU."""
        try:
            qs = self._run(chunk, self.device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(chunk) > 1:
                half = len(chunk) // 2
                log.warning("crf on %s: out of memory for %d images, trying %d at a time", self.device, len(chunk),
                            half)  # fmt: skip
                return {**self._refine(chunk[:half]), **self._refine(chunk[half:])}
            log.warning("crf on %s: %s does not fit alone; refined on the CPU", self.device, chunk[0][0])
            self.on_cpu += 1
            qs = self._run(chunk, torch.device("cpu"))
        out = {}
        for (name, _, classes, _), q in zip(chunk, qs):
            if q is None:  # its lattice keys do not pack: the CRF stage refines it (pydensecrf, with a warning)
                self.left += 1
                continue
            out[name] = classes[q.argmax(0).cpu().numpy()].astype(np.uint8)
        return out

    def _run(
        self, chunk: Sequence[Tuple[str, torch.Tensor, np.ndarray, np.ndarray]], device: torch.device
    ) -> List[Optional[torch.Tensor]]:
        images = [image for _, _, _, image in chunk]
        probs = [p.to(device) for _, p, _, _ in chunk]
        try:
            return list(dense_crf_batch(images, probs, self.params, device=device))
        except LatticeKeyError:
            if len(chunk) == 1:
                return [None]
            # the batch's keys do not pack together: one image at a time
            return [q for item in chunk for q in self._run([item], device)]

    def write(self, name: str, mask: np.ndarray) -> None:
        """``crf/NAME.png``, stamped as the CRF stage stamps it (call after the image's npz is written)."""
        save_mask_png(self.out_dir / f"{name}.png", mask, self.text)

    def summary(self) -> Dict[str, Optional[int]]:
        return {"on_device": self.refined, "left_to_the_stage": self.left, "on_cpu_after_oom": self.on_cpu}
