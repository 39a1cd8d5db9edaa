"""The stages of the pipeline, one shape each: an API function that takes a config (or a
run folder and overrides) and keyword options, writes its files, and returns a summary
dict. The CLI makes one stage call per command and prints what came back.

=============  ==========================================================  =========
stage          function                                                    torch?
=============  ==========================================================  =========
data           ``stages.data.synth / check_data / prepare``                 yes / no
config         ``stages.config.prepare_config(source, overrides)``            timm
train          ``stages.train.train(cfg, run)``                             yes
infer          ``stages.infer.infer(run, split)`` (pseudo-masks, ``--crf``)  yes
refine (CRF)   ``stages.refine.refine_folders(...)``, ``refine_pseudo(...)``  no
evaluate       ``stages.evaluate.evaluate(preds, gt, classes)``             no
report         ``stages.report.report(run)``                               yes
demo           ``stages.demo.demo(out)``: all of the above                  yes
=============  ==========================================================  =========

Import the modules directly (``from vitpcm.stages.refine import refine_folders``): this
package imports none of them, so the light stages stay light.
"""
