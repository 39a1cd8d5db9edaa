"""The Keras side of the inference check: the authors' ``main.py test``, loop body by loop body.

Runs in the TensorFlow environment (``requirements.txt`` here, plus scikit-image, scikit-learn,
matplotlib, omegaconf, pillow and tqdm, which the authors' ``utils.py`` / ``dataloader.py``
import), never in vitpcm's, with the authors' repository checked out somewhere
(deepplants/ViT-PCM @ 1fea66f; nothing of it is copied here: ``--authors`` is put on
``sys.path``). ``infer_check.py`` calls it; by hand::

    TF_USE_LEGACY_KERAS=1 /tmp/tfvenv/bin/python benchmarks/keras_reference/keras_infer.py \\
        --authors /tmp/authors --arch tiny --data /tmp/voc_photos --split val \\
        --h5 /tmp/tiny.h5 --out /tmp/keras_infer_tiny.npz

What it runs, as the authors' ``main.py test`` does (``main.py:175-259``):

* the model of their ``get_model`` (``model.py:31-48``): their ``VITPCM``, ``HVBiLSTM`` and
  ``PC`` on the backbone of their vit-keras fork rebuilt by ``keras_vitpcm.build_backbone``
  (same layer and weight names; ``vit_keras`` and ``tensorflow_addons`` are stubbed in
  ``sys.modules``). Random weights (``keras_vitpcm.randomise``) saved with ``save_weights``
  to ``--h5``, or, with ``--h5-in``, weights read from an existing file; either way a second
  model is built and loads the file as ``get_model`` does (``load_weights(by_name=True,
  skip_mismatch=True)``), and every one of its weights is checked to have been loaded;
* their input pipeline: the split of the VOC-layout folder ``--data`` is written as a TFRecord
  with the keys of their ``build_data.image_seg_to_tfexample`` (the JPEG and the class-index
  PNG bytes as they are on disk, height and width from ``decode_jpeg``), read back by their
  own ``DatasetVITPCMDistributed(CONFIG, 'test', 1).get_dataset()`` with their
  ``configs/voc12.yaml`` (``IMAGE.SIZE.TEST`` = ``--size``): ``_parse_function``
  (``decode_jpeg`` / ``decode_png``) and ``_preprocess_image`` (``resize`` to the test size
  with ``align_corners=True``, the mask resized nearest and its values as the tags:
  ``seg2multihot``; ``pil2vit``);
* per image, their loop body: ``model.infer(image, class_labels)`` (merged with the tags),
  ``preds2dict`` saved with ``np.save`` and read back (``np.load(...).item()``), ``tf.argmax(
  resize(preds, (H, W)))`` (the mask they write to ``segs/``), and the CRF input of their
  ``--crf`` branch: ``resize(dict2preds(...), (H, W))`` (``resize`` of a numpy array is
  scikit-image's, ``utils.py:255-259``).

Writes ``--out`` (npz), per image ``i`` (``names`` in the dataset's order): ``name_i``,
``original_i`` (the decoded uint8 image), ``input_i`` (the model input ``[S, S, 3]``),
``tags_i`` (their class labels), ``grid_i`` (the merged predictions ``[h, w, C]``),
``present_i`` (the classes in the saved dict), ``probs_i`` (``resize(preds, (H, W))`` of the
present classes, ``[P, H, W]``), ``seg_i`` (their mask), ``crf_in_i`` (the CRF input of the
present classes ``[P, H, W]``) and ``crf_absent_max_i`` (the largest value of the other
channels of the CRF input: 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tensorflow.keras -> tf_keras, as Keras 2 of their TF 2.9.1

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def write_records(data: Path, split: str, records: Path) -> None:
    """The split as ``records/SPLIT-00000-of-00001.tfrecord``, with ``build_data``'s keys."""

    def feature(value):
        if isinstance(value, int):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    names = [n.strip() for n in (data / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split() if n.strip()]
    records.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(records / f"{split}-00000-of-00001.tfrecord")) as writer:
        for name in names:
            image_data = (data / "JPEGImages" / f"{name}.jpg").read_bytes()
            seg_data = (data / "SegmentationClass" / f"{name}.png").read_bytes()
            # read_image_dims (their ImageReader decodes; decode_image: a PNG behind a .jpg name too)
            height, width = (int(v) for v in tf.io.decode_image(image_data, channels=3).shape[:2])
            example = tf.train.Example(features=tf.train.Features(feature={
                "image/encoded": feature(image_data),
                "image/filename": feature(name.encode()),
                "image/format": feature(b"jpeg"),
                "image/height": feature(height),
                "image/width": feature(width),
                "image/channels": feature(3),
                "image/segmentation/class/encoded": feature(seg_data),
                "image/segmentation/class/format": feature(b"png"),
            }))  # fmt: skip
            writer.write(example.SerializeToString())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", required=True, help="a checkout of deepplants/ViT-PCM")
    p.add_argument("--arch", required=True, help="keras_vitpcm.ARCHS key: tiny, s, b")
    p.add_argument(
        "--data", required=True, help="VOC-layout folder: JPEGImages/, SegmentationClass/ (class indices), ImageSets/"
    )
    p.add_argument("--split", default="val", help="one of their voc12 split names (val, train, ...)")
    p.add_argument("--size", type=int, default=None, help="IMAGE.SIZE.TEST (default: their configs/voc12.yaml)")
    p.add_argument("--h5", help="where the random weights are saved")
    p.add_argument("--h5-in", help="use these weights (save_weights .h5) instead of random ones")
    p.add_argument("--out", required=True, help="npz of the per-image results (module docstring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-std", type=float, default=0.2)
    args = p.parse_args()
    if not (args.h5 or args.h5_in):
        sys.exit("give --h5 (random weights written there) or --h5-in (weights read from there)")

    import keras_vitpcm as kv  # noqa: E402  (beside this script)

    authors_model, U, D = kv.import_authors(args.authors)
    import tf_keras as keras  # noqa: E402
    from omegaconf import OmegaConf  # noqa: E402

    # their config, pointed at the records of --data
    config = OmegaConf.load(Path(args.authors) / "configs" / "voc12.yaml")
    scratch = tempfile.TemporaryDirectory(prefix="keras_infer_")  # the TFRecord and their preds/ files
    records = Path(scratch.name) / "records"
    write_records(Path(args.data), args.split, records)
    config.DATASET.ROOT = str(records)
    config.DATASET.SPLIT.TEST = args.split
    config.DATALOADER.NUM_WORKERS = 1
    if args.size:
        config.IMAGE.SIZE.TEST = args.size
    num_classes = int(config.DATASET.NUM_CLASSES)
    arch = kv.ARCHS[args.arch]

    tf.random.set_seed(1234)  # main.py test
    keras.utils.set_random_seed(args.seed)
    h5 = args.h5_in
    if not h5:
        made = kv.build_authors_vitpcm(authors_model, U, arch, config, dropout=config.SOLVER.DROPOUT)
        kv.randomise(made, args.seed, args.classifier_std)
        made.save_weights(args.h5)
        h5 = args.h5
    model = kv.build_authors_vitpcm(authors_model, U, arch, config, dropout=config.SOLVER.DROPOUT)
    before = [w.numpy().copy() for w in model.weights]
    model.load_weights(h5, by_name=True, skip_mismatch=True)  # get_model
    model.trainable = False
    # every weight of the network loaded (the metric's confusion matrix is no weight of the file)
    unloaded = [w.name for w, b in zip(model.weights, before)
                if np.array_equal(w.numpy(), b) and "confusion_matrix" not in w.name]  # fmt: skip
    if unloaded:
        sys.exit(
            f"load_weights(by_name=True, skip_mismatch=True) left {len(unloaded)} weights untouched: {unloaded[:5]}"
        )

    data_set = D.DatasetVITPCMDistributed(config, "test", 1).get_dataset()
    out = {"arch": np.array(args.arch), "size": np.array(int(config.IMAGE.SIZE.TEST)),
           "num_classes": np.array(num_classes)}  # fmt: skip
    names = []
    preds_dir = Path(scratch.name) / "preds"
    preds_dir.mkdir()
    for i, data in enumerate(data_set):
        # --- main.py:208-215, the loop body (files to preds_dir; the mask kept)
        image_name = str(data.get(D.IMAGE_NAME).numpy()[0].decode("UTF-8"))
        labels = data.get(D.CLASS_LABELS)
        preds = model.infer(data.get(D.IMAGE), labels)
        np.save(preds_dir / f"{image_name}.npy", U.preds2dict(preds.numpy()[0], labels.numpy()[0]), allow_pickle=True)
        height, width = data.get(D.HEIGHT)[0], data.get(D.WIDTH)[0]
        full = U.resize(preds, (height, width))
        seg_preds = tf.argmax(full, axis=-1)
        # --- main.py:243-246, the CRF branch's input
        saved = np.load(preds_dir / f"{image_name}.npy", allow_pickle=True).item()
        crf_in = U.resize(U.dict2preds(saved, num_classes), (int(height), int(width)))
        present = np.array(sorted(int(k) for k in saved), dtype=np.int64)
        absent = np.setdiff1d(np.arange(num_classes), present)
        names.append(image_name)
        out[f"name_{i}"] = np.array(image_name)
        out[f"original_{i}"] = data.get(D.ORIGINAL_IMAGE).numpy()[0].astype(np.uint8)
        out[f"input_{i}"] = data.get(D.IMAGE).numpy()[0]
        out[f"tags_{i}"] = labels.numpy()[0]
        out[f"grid_{i}"] = preds.numpy()[0]
        out[f"present_{i}"] = present
        out[f"probs_{i}"] = np.transpose(full.numpy()[0], (2, 0, 1))[present].astype(np.float32)
        out[f"seg_{i}"] = seg_preds.numpy()[0].astype(np.uint8)
        out[f"crf_in_{i}"] = np.transpose(crf_in, (2, 0, 1))[present].astype(np.float32)
        out[f"crf_absent_max_{i}"] = np.array(float(np.abs(crf_in[..., absent]).max()) if absent.size else 0.0)
        print(f"{image_name}: {int(height)} x {int(width)}, tags {present.tolist()}", flush=True)
    out["count"] = np.array(len(names))
    np.savez(args.out, **out)
    scratch.cleanup()
    print(f"{args.out}: {len(names)} images at {int(config.IMAGE.SIZE.TEST)}; weights {h5}")


if __name__ == "__main__":
    main()
