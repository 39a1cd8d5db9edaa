"""Tasks: the trainable models the engine (:mod:`vitpcm.engine.trainer`) runs.

* :mod:`.pcm`: ViT-PCM (warm-up and fine-tune phases, the ET step, val mIoU) —
  :class:`~vitpcm.tasks.pcm.PcmTask`.
* :mod:`.segment`: the verification DeepLab trained on pseudo-masks (kazuto1011's recipe:
  SGD over three parameter groups, poly schedule, the loss at every MSC scale) —
  :class:`~vitpcm.tasks.segment.SegmentTask`.

A task subclasses :class:`vitpcm.engine.task.Task`. Import the task modules directly
(``from vitpcm.tasks.pcm import PcmTask``): this package imports none of them.
"""
