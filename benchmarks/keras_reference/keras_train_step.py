"""The Keras side of the train-step check: the authors' own ``VITPCM.train_step``, K steps.

Runs in the TensorFlow environment (``requirements.txt`` here), never in vitpcm's, with the
authors' repository checked out somewhere (deepplants/ViT-PCM @ 1fea66f; nothing of it is
copied here: ``--authors`` is put on ``sys.path``). ``train_step_check.py`` calls it; by hand::

    git clone https://github.com/deepplants/ViT-PCM /tmp/authors && git -C /tmp/authors checkout 1fea66f
    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python benchmarks/keras_reference/keras_train_step.py \\
        --authors /tmp/authors --arch tiny --batch-npz /tmp/batch.npz --out /tmp/keras_steps \\
        --warmup-steps 2 --finetune-steps 3 --unfreeze 1

(``--batch-npz``: what ``train_step_check.py`` writes: ``images`` uint8 [N, H, W, 3] of any
size, resized to ``--size`` by their ``resize``; ``labels`` [N, C]; ``affine``, ``affine_et``
[N, 9].) On 2 busy CPU cores the tiny model took 5 to 14 minutes, nearly all of it tracing
the replicated step once per phase; ViT-S 28 minutes.

What it runs, as the authors' ``main.py train`` does:

* their ``VITPCM`` (``model.py``), with their ``HVBiLSTM`` and ``PC`` heads, on the backbone of
  their vit-keras fork rebuilt by ``keras_vitpcm.build_backbone`` (same layer and weight
  names; ``vit_keras`` and ``tensorflow_addons`` are stubbed in ``sys.modules``: the first is
  not needed, the second does not import on TF 2.21; ``metrics_list`` is emptied, so their
  ``compute_metrics`` does nothing). Dropout rates 0 everywhere. Random weights
  (``keras_vitpcm.randomise``), saved with ``save_weights`` as ``init.h5``;
* the inputs made by their own ``resize``, ``apply_affine_transform`` and ``pil2vit`` from
  the uint8 images and the transform records of ``--batch-npz`` (their AFFINE layout
  ``[fliplr, flipud, transpose, y1, x1, y2, x2, resize_h, resize_w]``; colour jitter off);
* a ``tf.distribute.MirroredStrategy`` over ``--replicas`` logical CPU devices, each replica
  getting its contiguous share of the global batch (``strategy.run(model.train_step)`` in a
  ``tf.function``, which is what ``model.fit`` runs), so ``apply_gradients`` all-reduces
  (SUMs) the replicas' gradients of their mean losses, as on the authors' 4 GPUs;
* ``--warmup-steps`` steps after their ``warmup()`` with a legacy Keras ``Adam(lr_warmup)``
  (``tf_keras.optimizers.legacy.Adam``: ``tensorflow.keras.optimizers.Adam`` of their TF
  2.9.1), then their ``unfreeze()`` (``MODEL.NUM_BLOCK_UNFREEZE`` = ``--unfreeze``) and a fresh
  ``Adam(lr)`` for ``--finetune-steps`` steps (their ``model.compile`` per phase).

Writes into ``--out``: ``init.h5``; per step k (1-based) ``weights_k.h5`` (all weights after
the step) and ``grads_k.h5`` (the SUM over replicas of the gradients that ``apply_gradients``
received, in the same layout, zeros for frozen weights), and ``steps.npz``: the per-replica
loss terms of every step (``bce_loss``, ``reg_loss``, ``cce_loss``, ``loss``), the inputs it
built (``image``, ``image_et``, ``merged``: the 2 x 2 tiles of each replica), and before step 1
the plain view's ``preds`` and the ET targets as their ``compute_cce_loss`` makes them
(``et_targets``, merged with the tags).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tensorflow.keras -> tf_keras, as Keras 2 of their TF 2.9.1

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

LOSS_KEYS = ("bce_loss", "reg_loss", "cce_loss", "loss")


def logical_cpus(n: int) -> list:
    """``n`` logical CPU devices (must run before TensorFlow initialises its context)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", required=True, help="a checkout of deepplants/ViT-PCM (model.py, utils.py)")
    p.add_argument("--arch", required=True, help="keras_vitpcm.ARCHS key: tiny, s, b")
    p.add_argument("--batch-npz", required=True, help="images uint8 [N,H,W,3], labels [N,C], affine, affine_et [N,9]")
    p.add_argument("--out", required=True, help="folder for init.h5, weights_k.h5, grads_k.h5, steps.npz")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=3)
    p.add_argument("--lr-warmup", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--unfreeze", type=int, default=5, help="MODEL.NUM_BLOCK_UNFREEZE")
    p.add_argument("--size", type=int, default=384, help="IMAGE.SIZE.TRAIN: the images are resized to it")
    p.add_argument("--scale", type=int, default=192, help="IMAGE.SIZE.SCALE: side of an ET view")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-std", type=float, default=0.2)
    args = p.parse_args()

    devices = logical_cpus(args.replicas)
    import keras_vitpcm as kv  # noqa: E402

    authors_model, U, _ = kv.import_authors(args.authors)
    import tf_keras as keras  # noqa: E402
    from omegaconf import OmegaConf  # noqa: E402

    batch = dict(np.load(args.batch_npz))
    images, labels = batch["images"], batch["labels"].astype(np.int32)
    affine, affine_et = batch["affine"].astype(np.float32), batch["affine_et"].astype(np.float32)
    n, size, classes = images.shape[0], args.size, labels.shape[1]
    if n % args.replicas or (n // args.replicas) % 4:
        sys.exit(f"the global batch ({n}) must split into {args.replicas} replicas of a multiple of 4 images")
    per = n // args.replicas
    arch = kv.ARCHS[args.arch]
    config = OmegaConf.create({
        "DATASET": {"NUM_CLASSES": classes, "IGNORE_LABEL": 255},
        "SOLVER": {"LOSS_MCE": True, "LOSS_REG": True, "LOSS_ET": True, "DROPOUT": 0.0},
        "MODEL": {"PATCH_SIZE": kv.PATCH, "NUM_BLOCK_UNFREEZE": args.unfreeze, "HIDDEN_SIZE": arch["lstm_hidden"]},
        "IMAGE": {"SIZE": {"TRAIN": size, "SCALE": args.scale}},
    })  # fmt: skip

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tf.random.set_seed(args.seed)
    keras.utils.set_random_seed(args.seed)
    strategy = tf.distribute.MirroredStrategy(devices=devices)

    with strategy.scope():
        # their get_model, on build_backbone instead of their vit_keras ViT(); dropout 0
        model = kv.build_authors_vitpcm(authors_model, U, arch, config, dropout=0.0, backbone_dropout=0.0)
        model.metrics_list = []  # their compute_metrics: nothing to update
    kv.randomise(model, args.seed, args.classifier_std)
    model.save_weights(str(out / "init.h5"))

    # --- the inputs, with their own helpers (dataloader.py _preprocess_image, jitter off)
    def view(i: int, rec: np.ndarray) -> np.ndarray:
        image = U.resize(tf.cast(images[i], tf.float32), U.imsize(size))  # bilinear, align_corners=True
        return U.pil2vit(U.apply_affine_transform(image, tf.constant(rec))).numpy()

    x = np.stack([view(i, affine[i]) for i in range(n)])
    x_et = np.stack([view(i, affine_et[i]) for i in range(n)])
    data = {"image": x, "image_et": x_et, "class_label": labels, "affine": affine, "affine_et": affine_et}
    saved = {"image": x, "image_et": x_et}
    d = args.scale
    saved["merged"] = np.concatenate(
        [
            U.extract_nonoverlapping_patches_inverse(
                tf.ones((per // 4, d * 2, d * 2, 3)), tf.constant(x_et[r * per : r * per + per]), size=d
            ).numpy()
            for r in range(args.replicas)
        ]
    )  # fmt: skip  (what their merged_step feeds the model, replica by replica)

    # the plain view's predictions and their ET targets (compute_cce_loss's target side), before step 1
    outputs = model(x, training=False)
    saved["preds"] = outputs["preds"].numpy()
    patch = kv.PATCH
    mapped = U.apply_affine_transform_batch(
        U.revert_affine_transform_batch(outputs["preds"], U.affine_patch_level(tf.constant(affine), patch)),
        U.affine_patch_level(tf.constant(affine_et), patch),
    )
    saved["et_targets"] = authors_model.merge_class_labels(mapped, tf.constant(labels)).numpy()

    def per_replica(ctx):  # a tf.distribute.experimental.ValueContext
        r = ctx.replica_id_in_sync_group
        return {k: tf.constant(v[r * per : (r + 1) * per]) for k, v in data.items()}

    dist_data = strategy.experimental_distribute_values_from_function(per_replica)

    # --- Adam of their TF 2.9.1 that also keeps each replica's gradients (sync-on-read, summed)
    from tf_keras.optimizers.legacy import Adam

    class RecordingAdam(Adam):
        def apply_gradients(self, grads_and_vars, name=None, experimental_aggregate_gradients=True):
            grads_and_vars = list(grads_and_vars)
            for g, v in grads_and_vars:
                STORE[v.name].assign(tf.convert_to_tensor(g))
            return super().apply_gradients(grads_and_vars, name, experimental_aggregate_gradients)

    STORE: dict = {}
    names = [w.name for w in model.weights]
    assert len(set(names)) == len(names), "weight names are not unique"
    with strategy.scope():
        for w in model.weights:
            STORE[w.name] = tf.Variable(
                tf.zeros(w.shape, w.dtype), trainable=False, name="grad_store",
                synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM,
            )  # fmt: skip

    losses = {k: [] for k in LOSS_KEYS}
    lrs, phases, trainable_counts, seconds = [], [], [], []
    step_fn = None
    total = args.warmup_steps + args.finetune_steps
    for k in range(1, total + 1):
        if k == 1 or k == args.warmup_steps + 1:
            warm = k == 1 and args.warmup_steps > 0
            with strategy.scope():
                if warm:
                    model.warmup()
                else:
                    model.unfreeze()
                lr = args.lr_warmup if warm else args.lr
                model.compile(RecordingAdam(learning_rate=lr, name="adam"))

            @tf.function
            def step_fn(d):
                return strategy.run(model.train_step, args=(d,))

            phase = "warmup" if warm else "finetune"
        for v in STORE.values():
            v.assign(tf.zeros(v.shape, v.dtype))
        start = time.time()
        record = step_fn(dist_data)
        seconds.append(time.time() - start)
        for key in LOSS_KEYS:
            losses[key].append([float(t.numpy()) for t in strategy.experimental_local_results(record[key])])
        lrs.append(lr)
        phases.append(phase)
        trainable_counts.append(len(model.trainable_variables))
        model.save_weights(str(out / f"weights_{k}.h5"))
        # the summed gradients in the weights' layout: assign, save, restore
        now = [w.numpy() for w in model.weights]
        for w in model.weights:
            parts = strategy.experimental_local_results(STORE[w.name])
            w.assign(np.sum([p.numpy().astype(np.float64) for p in parts], axis=0).astype(np.float32))
        model.save_weights(str(out / f"grads_{k}.h5"))
        for w, value in zip(model.weights, now):
            w.assign(value)
        print(f"step {k} ({phase}, lr {lr:g}, {trainable_counts[-1]} trainable): "
              + " ".join(f"{key} {np.mean(losses[key][-1]):.7f}" for key in LOSS_KEYS)
              + f" ({seconds[-1]:.1f} s)", flush=True)  # fmt: skip

    np.savez_compressed(
        out / "steps.npz",
        **saved,
        **{key: np.array(v, dtype=np.float64) for key, v in losses.items()},
        lr=np.array(lrs), phase=np.array(phases), trainable=np.array(trainable_counts),
        seconds=np.array(seconds), replicas=np.array(args.replicas), weight_names=np.array(names),
        versions=np.array([tf.__version__, keras.__version__]),
    )  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
