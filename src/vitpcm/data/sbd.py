"""The SBD augmentation of PASCAL VOC 2012 ("trainaug"), in both forms in circulation.

1. The original SBD release (Hariharan et al. 2011, ``benchmark.tgz``)::

       benchmark_RELEASE/dataset/cls/NAME.mat     struct GTcls, field Segmentation:
                                                  uint8 [H, W] class indices, no 255 border
       benchmark_RELEASE/dataset/img/NAME.jpg     (the same pictures as VOC's JPEGImages)
       benchmark_RELEASE/dataset/{train,val}.txt  8,498 + 2,857 names

2. The converted folder (``SegmentationClassAug.zip``, as in DeepLab and the authors'
   download script): greyscale PNGs of class indices, usually unpacked into
   ``VOC2012/SegmentationClassAug/``, with a list ``train_aug.txt`` / ``trainaug.txt``
   whose lines are ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` or bare names.

``data.sbd`` may point at ``benchmark_RELEASE``, its ``dataset`` folder, the folder that
holds ``benchmark_RELEASE``, or a ``SegmentationClassAug`` folder; by default
``ROOT/SegmentationClassAug`` is used when it exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from vitpcm.errors import VitpcmError
from vitpcm.io import read_mask_png, read_names

AUG_LIST_NAMES = ("train_aug.txt", "trainaug.txt")


def read_sbd_mat(path: Path) -> np.ndarray:
    """``GTcls.Segmentation`` of an SBD ``cls/*.mat`` file as ``[H, W]`` uint8."""
    import scipy.io  # lazy: ~0.2 s to import, and only trainaug's SBD masks need it

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except FileNotFoundError:
        raise VitpcmError(f"SBD mask {path} not found") from None
    except (KeyError, AttributeError) as exc:
        raise VitpcmError(f"SBD mask {path} has no GTcls.Segmentation ({exc})") from None
    except Exception as exc:  # scipy raises several types (ValueError, MatReadError, ...) on damage
        raise VitpcmError(f"cannot read SBD mask {path}: {exc}") from None
    if seg.ndim != 2 or seg.size == 0:
        raise VitpcmError(f"SBD mask {path}: GTcls.Segmentation has shape {seg.shape}, expected [H, W]")
    if seg.min() < 0 or seg.max() > 255:
        raise VitpcmError(f"SBD mask {path} holds values outside 0..255")
    return seg.astype(np.uint8)


class AugSource:
    """Where trainaug masks beyond VOC's own come from.

    ``kind`` is ``"sbd"`` (``.mat`` files) or ``"png"`` (converted folder); ``names`` the
    images it covers; ``list_file`` the converted form's trainaug list when found.
    """

    def __init__(
        self, kind: str, mask_dir: Path, image_dir: Optional[Path], names: List[str], list_file: Optional[Path]
    ):
        self.kind = kind
        self.mask_dir = mask_dir
        self.image_dir = image_dir
        self.names = names
        self.list_file = list_file

    def mask_path(self, name: str) -> Path:
        return self.mask_dir / f"{name}.{'mat' if self.kind == 'sbd' else 'png'}"

    def read(self, name: str) -> np.ndarray:
        path = self.mask_path(name)
        return read_sbd_mat(path) if self.kind == "sbd" else read_mask_png(path)

    def describe(self) -> str:
        return f"SBD release {self.mask_dir.parent}" if self.kind == "sbd" else f"converted masks {self.mask_dir}"


def find_aug_source(voc_root: Path, spec: Optional[str | Path]) -> AugSource:
    """Locate the SBD masks (module docstring); :class:`VitpcmError` with the fix if absent."""
    candidates: List[Path] = []
    if spec:
        p = Path(spec).expanduser()
        if not p.exists():
            raise VitpcmError(
                f"data.sbd={spec} not found: point it at benchmark_RELEASE or a SegmentationClassAug folder"
            )
        candidates = [p]
    else:
        candidates = [voc_root / "SegmentationClassAug"]
    for p in candidates:
        for ds in (p, p / "dataset", p / "benchmark_RELEASE" / "dataset"):
            if (ds / "cls").is_dir():
                return _sbd_release(ds)
        for folder in (p, p / "SegmentationClassAug"):
            if folder.is_dir() and next(folder.glob("*.png"), None) is not None:
                return _converted(folder, voc_root)
    if spec:
        raise VitpcmError(
            f"data.sbd={spec} holds neither cls/*.mat (the SBD release) nor *.png masks (SegmentationClassAug)"
        )
    raise VitpcmError(
        f"split 'trainaug' needs the SBD masks: set data.sbd=PATH to benchmark_RELEASE (SBD download) or put"
        f" SegmentationClassAug/ into {voc_root} (see docs/datasets.md)"
    )


def _sbd_release(ds: Path) -> AugSource:
    names: List[str] = []
    for list_name in ("train.txt", "val.txt"):
        if (ds / list_name).is_file():
            names.extend(read_names(ds / list_name))
    if not names:  # lists missing: every mask file counts
        names = sorted(p.stem for p in (ds / "cls").glob("*.mat"))
    image_dir = ds / "img" if (ds / "img").is_dir() else None
    return AugSource("sbd", ds / "cls", image_dir, list(dict.fromkeys(names)), None)


def _converted(folder: Path, voc_root: Path) -> AugSource:
    list_file = None
    for d in (voc_root / "ImageSets" / "Segmentation", folder.parent, folder):
        for list_name in AUG_LIST_NAMES:
            if (d / list_name).is_file():
                list_file = d / list_name
                break
        if list_file:
            break
    names = sorted(p.stem for p in folder.glob("*.png"))
    return AugSource("png", folder, None, names, list_file)
