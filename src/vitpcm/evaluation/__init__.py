"""Evaluation: confusion matrix and scores, folders of masks, published rows, tables.

numpy, PIL and the standard library only (no torch, no matplotlib: figures are drawn by
:mod:`vitpcm.viz.figures`), so ``vitpcm evaluate`` runs on any CPU box.

* :mod:`.confusion`: :class:`ConfusionMatrix` (IoU, mIoU over the classes in the ground
  truth, pixel accuracy, mean accuracy, fwIoU, :meth:`~ConfusionMatrix.summary`).
* :mod:`.folders`: :func:`evaluate_folders` (several prediction folders, one ground truth).
* :mod:`.published`: the published ViT-PCM rows (``resources/published.json``) and the
  paper's whole Tables S1 / S2 (``resources/published/*.tsv``).
* :mod:`.tables`: markdown / CSV comparison tables (ours beside ViT-PCM, or inside the
  paper's whole table) and :func:`write_evaluation`.
"""

from vitpcm.evaluation.confusion import ConfusionMatrix, confused_pairs
from vitpcm.evaluation.folders import GroundTruth, evaluate_folder, evaluate_folders, names_from_split_file
from vitpcm.evaluation.published import (
    COCO_S2_NAMES,
    VOC_SHORT,
    builtin_list_name,
    load_published,
    load_table,
    published_row,
    published_table,
)
from vitpcm.evaluation.tables import (
    Table,
    comparison_tables,
    confusion_stem,
    format_comparison,
    format_full_table,
    full_tables,
    markdown_table,
    overall_table,
    per_class_csv,
    write_evaluation,
)

__all__ = [
    "ConfusionMatrix",
    "confused_pairs",
    "GroundTruth",
    "evaluate_folder",
    "evaluate_folders",
    "names_from_split_file",
    "COCO_S2_NAMES",
    "VOC_SHORT",
    "builtin_list_name",
    "load_published",
    "load_table",
    "published_row",
    "published_table",
    "Table",
    "comparison_tables",
    "confusion_stem",
    "format_comparison",
    "format_full_table",
    "full_tables",
    "markdown_table",
    "overall_table",
    "per_class_csv",
    "write_evaluation",
]
