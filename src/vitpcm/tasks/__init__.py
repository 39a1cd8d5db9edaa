"""Tasks: the trainable models the engine (:mod:`vitpcm.engine.trainer`) runs.

* :mod:`.pcm`: ViT-PCM (two phases, the ET step, val mIoU) — :class:`~vitpcm.tasks.pcm.PcmTask`.

A task subclasses :class:`vitpcm.engine.task.Task`. Import the task modules directly
(``from vitpcm.tasks.pcm import PcmTask``): this package imports none of them.
"""
