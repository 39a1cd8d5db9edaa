"""The Keras side of the import check: ViT-PCM built as the authors build it, random weights.

Runs in its own environment (``requirements.txt`` here: tensorflow-cpu, tf-keras, h5py),
never in vitpcm's. ``check.py`` calls it; by hand::

    /tmp/tfvenv/bin/python benchmarks/keras_reference/keras_vitpcm.py --arch s \\
        --h5 /tmp/vitpcm_s.h5 --npz /tmp/vitpcm_s_ref.npz --sizes 384 960

It builds the network of deepplants/ViT-PCM (``model.py``: ``get_model``, ``HVBiLSTM``,
``PC``) on the backbone of their vit-keras fork (rossettisimone/vit-keras: ``ClassToken``,
``AddPositionEmbs`` with its bicubic position-embedding resize, ``MultiHeadSelfAttention``,
``TransformerBlock``, ``build_model``), written here from their structure with the same
layer and weight names, so ``save_weights`` writes the same HDF5 layout as their
``ModelCheckpoint(save_weights_only=True)``. Every weight is then randomised (biases,
LayerNorm and the CLS token too, so that a swapped or transposed tensor cannot hide behind
an init of zeros or ones), the weights are saved as ``.h5``, and the model's per-patch
probabilities on fixed normalised inputs ((x - 127.5) / 127.5 of random smooth uint8
images) are saved to ``.npz`` with the inputs.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

PATCH = 16
IMAGE = 384  # the authors build the ViT at 384: a 24 x 24 position-embedding grid

ARCHS = {
    # narrow and shallow: the committed test fixture
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, lstm_hidden=8),
    # vit-keras CONFIG_S / CONFIG_B, the authors' MODEL.HIDDEN_SIZE 192
    "s": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536, lstm_hidden=192),
    "b": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, lstm_hidden=192),
}


# --- the backbone (vit-keras fork) ---------------------------------------------------------


class ClassToken(keras.layers.Layer):
    """Prepends a learned CLS token: variable ``cls`` [1, 1, width]."""

    def build(self, input_shape):
        self.width = int(input_shape[-1])
        self.cls = tf.Variable(name="cls", initial_value=tf.zeros((1, 1, self.width)), trainable=True)

    def call(self, x):
        token = tf.broadcast_to(self.cls, [tf.shape(x)[0], 1, self.width])
        return tf.concat([tf.cast(token, x.dtype), x], axis=1)


class AddPositionEmbs(keras.layers.Layer):
    """Learned position embedding ``pos_embedding`` [1, 1 + g*g, width] for the build size;
    at another (square) size the g x g patch part is resized with tf.image.resize BICUBIC."""

    def __init__(self, image_size, patch_size, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.pe_shape = (1, 1 + (image_size // patch_size) ** 2, hidden_size)

    def build(self, input_shape):
        self.pe = tf.Variable(
            name="pos_embedding",
            initial_value=tf.random_normal_initializer(stddev=0.06)(shape=self.pe_shape),
            dtype="float32",
            trainable=True,
        )

    def call(self, x):
        return x + tf.cast(self.resized(x), x.dtype)

    def resized(self, x):
        m = tf.shape(x)[1] - 1
        n = tf.shape(self.pe)[1] - 1

        def resize():
            width = tf.shape(x)[-1]
            new = tf.cast(tf.math.sqrt(tf.cast(m, tf.float32)), tf.int32)
            old = tf.cast(tf.math.sqrt(tf.cast(n, tf.float32)), tf.int32)
            grid = tf.reshape(self.pe[:, 1:], (1, old, old, width))
            grid = tf.image.resize(grid, (new, new), method=tf.image.ResizeMethod.BICUBIC)
            return tf.concat([self.pe[:, :1], tf.reshape(grid, (1, -1, width))], axis=1)

        return tf.cond(tf.equal(m, n), lambda: self.pe, resize)


class MultiHeadSelfAttention(keras.layers.Layer):
    """Dense query / key / value / out ([in, out] kernels), heads split as column
    head * head_dim + d, scaled dot product with 1 / sqrt(head_dim)."""

    def __init__(self, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.width, self.head_dim = width, width // self.num_heads
        self.query_dense = keras.layers.Dense(width, name="query")
        self.key_dense = keras.layers.Dense(width, name="key")
        self.value_dense = keras.layers.Dense(width, name="value")
        self.combine_heads = keras.layers.Dense(width, name="out")

    def heads(self, x, batch):
        return tf.transpose(tf.reshape(x, (batch, -1, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def call(self, x):
        batch = tf.shape(x)[0]
        q = self.heads(self.query_dense(x), batch)
        k = self.heads(self.key_dense(x), batch)
        v = self.heads(self.value_dense(x), batch)
        score = tf.matmul(q, k, transpose_b=True) / tf.math.sqrt(tf.cast(self.head_dim, x.dtype))
        out = tf.matmul(tf.nn.softmax(score, axis=-1), v)
        out = tf.reshape(tf.transpose(out, (0, 2, 1, 3)), (batch, -1, self.width))
        return self.combine_heads(out)


class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: LayerNorm_0 -> attention -> dropout -> +; LayerNorm_2 -> MlpBlock_3
    (Dense_0, exact GELU, dropout, Dense_1, dropout) -> +. LayerNorm eps 1e-6."""

    def __init__(self, num_heads, mlp_dim, dropout, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.mlp_dim, self.dropout = num_heads, mlp_dim, dropout

    def build(self, input_shape):
        width = int(input_shape[-1])
        self.att = MultiHeadSelfAttention(num_heads=self.num_heads, name="MultiHeadDotProductAttention_1")
        self.mlpblock = keras.Sequential(
            [
                keras.layers.Dense(self.mlp_dim, name=f"{self.name}/Dense_0"),
                keras.layers.Lambda(lambda t: keras.activations.gelu(t, approximate=False)),
                keras.layers.Dropout(self.dropout),
                keras.layers.Dense(width, name=f"{self.name}/Dense_1"),
                keras.layers.Dropout(self.dropout),
            ],
            name="MlpBlock_3",
        )
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6, name="LayerNorm_0")
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6, name="LayerNorm_2")
        self.dropout_layer = keras.layers.Dropout(self.dropout)

    def call(self, x, training=None):
        y = self.dropout_layer(self.att(self.layernorm1(x)), training=training)
        x = x + y
        return x + self.mlpblock(self.layernorm2(x), training=training)


def build_backbone(arch: dict, dropout: float = 0.1) -> keras.Model:
    """vit-keras ``build_model(include_top=False)`` at 384, CLS dropped after encoder_norm
    (the authors' ``ViT``), as a Model named ``patch_encoder``. ``dropout``: of every block
    (vit-keras: 0.1; ``keras_train_step.py`` sets 0)."""
    width = arch["hidden_size"]
    inputs = keras.layers.Input(shape=(None, None, 3))
    y = keras.layers.Conv2D(width, PATCH, strides=PATCH, padding="valid", name="embedding")(inputs)
    y = keras.layers.Reshape((-1, width))(y)
    y = ClassToken(name="class_token")(y)
    y = AddPositionEmbs(IMAGE, PATCH, width, name="Transformer/posembed_input")(y)
    for n in range(arch["num_layers"]):
        y = TransformerBlock(arch["num_heads"], arch["mlp_dim"], dropout, name=f"Transformer/encoderblock_{n}")(y)
    y = keras.layers.LayerNormalization(epsilon=1e-6, name="Transformer/encoder_norm")(y)
    return keras.Model(inputs=inputs, outputs=y[:, 1:], name="patch_encoder")


# --- the head (deepplants/ViT-PCM model.py) ------------------------------------------------


class HVBiLSTM(keras.layers.Layer):
    """Dropout, then a BiLSTM along every row (over the width) and one along every column;
    output [rows_fwd, rows_bwd, cols_fwd, cols_bwd] per patch."""

    def __init__(self, hidden_dim, dropout, **kwargs):
        super().__init__(**kwargs)
        self.drop = keras.layers.Dropout(dropout)

        def bilstm(axis):
            lstm = keras.layers.LSTM(hidden_dim, dropout=dropout, return_sequences=True, name=f"lstm_{axis}")
            return keras.layers.TimeDistributed(
                keras.layers.Bidirectional(lstm, name=f"bidirection_{axis}"), name=f"temporal_{axis}"
            )

        self.HBiLSTM, self.VBiLSTM = bilstm("rows"), bilstm("cols")

    def build(self, input_shape):
        self.HBiLSTM.build(input_shape)
        self.VBiLSTM.build(input_shape)

    def call(self, x, training=None):
        x = self.drop(x, training=training)
        rows = self.HBiLSTM(x)
        cols = tf.transpose(self.VBiLSTM(tf.transpose(x, (0, 2, 1, 3))), (0, 2, 1, 3))
        return tf.concat([rows, cols], axis=-1)


class PC(keras.layers.Layer):
    """Patch classifier: dropout, bias-free Dense ``classifier``, softmax, global max pooling."""

    def __init__(self, num_categories, dropout, **kwargs):
        super().__init__(**kwargs)
        self.drop = keras.layers.Dropout(dropout)
        self.layer = keras.layers.Dense(
            num_categories, use_bias=False, name="classifier",
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.05),
        )  # fmt: skip

    def build(self, input_shape):
        self.layer.build(input_shape)

    def call(self, x, training=None):
        logits = self.layer(self.drop(x, training=training))
        preds = tf.nn.softmax(logits, axis=-1)
        return dict(logits=logits, preds=preds, pooled_preds=tf.reduce_max(preds, axis=(1, 2)))


def p2i(x):
    """Patch sequence [B, P, C] -> square grid [B, G, G, C]."""
    grid = tf.cast(tf.math.sqrt(tf.cast(tf.shape(x)[-2], tf.float32)), tf.int32)
    return tf.reshape(x, (-1, grid, grid, tf.shape(x)[-1]))


def build_vitpcm(arch: dict, num_classes: int) -> keras.Model:
    """The authors' ``get_model``: backbone output -> p2i -> patch_conditioning -> patch_classifier."""
    backbone = build_backbone(arch)
    features = p2i(backbone.output)
    features = HVBiLSTM(arch["lstm_hidden"], 0.2, name="patch_conditioning")(features)
    out = PC(num_classes, 0.2, name="patch_classifier")(features)
    return keras.Model(inputs=backbone.input, outputs=out, name="vit_pcm")


# --- the authors' own modules (deepplants/ViT-PCM, from a path; never copied here) -------


def import_authors(path: str):
    """The authors' ``model``, ``utils`` and ``dataloader`` modules from their checkout at
    ``path``, with ``vit_keras`` (their ViT: :func:`build_backbone` stands in) and
    ``tensorflow_addons`` (dead on TF 2.21; ``VITPCM.__init__`` builds two F1 metrics) stubbed.
    Returns ``(model, utils, dataloader)``."""
    import sys
    import types
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(path).resolve()))
    vit_keras = types.ModuleType("vit_keras")
    vit_keras.vit = types.ModuleType("vit_keras.vit")
    sys.modules.setdefault("vit_keras", vit_keras)
    sys.modules.setdefault("vit_keras.vit", vit_keras.vit)
    tfa = types.ModuleType("tensorflow_addons")
    tfa.metrics = types.SimpleNamespace(F1Score=lambda *a, **k: None)
    sys.modules.setdefault("tensorflow_addons", tfa)
    import dataloader as authors_data  # their dataloader.py
    import model as authors_model  # their model.py
    import utils as authors_utils  # their utils.py

    return authors_model, authors_utils, authors_data


def build_authors_vitpcm(authors_model, authors_utils, arch: dict, config, dropout: float,
                         backbone_dropout: float = 0.1):  # fmt: skip
    """Their ``get_model`` (``VITPCM`` of their ``HVBiLSTM`` and ``PC``, ``dropout`` in the
    head) on :func:`build_backbone` (``backbone_dropout``, vit-keras's 0.1) instead of their
    vit_keras ``ViT()``."""
    backbone = build_backbone(arch, dropout=backbone_dropout)
    features = authors_utils.p2i(backbone.output)
    features = authors_model.HVBiLSTM(hidden_dim=arch["lstm_hidden"], dropout=dropout,
                                      name="patch_conditioning")(features)  # fmt: skip
    output = authors_model.PC(num_categories=config.DATASET.NUM_CLASSES, dropout=dropout,
                              name="patch_classifier")(features)  # fmt: skip
    model = authors_model.VITPCM(inputs=backbone.input, outputs=output, config=config, name="vit_pcm")
    model.show = lambda: None  # (their summary printout after (un)freezing)
    return model


# --- weights, inputs, reference outputs ----------------------------------------------------


def randomise(model: keras.Model, seed: int, classifier_std: float) -> None:
    """Perturb every weight: zero/one inits get noise, kernels keep their init plus noise."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = w.numpy()
        name = w.name
        if name.startswith("patch_classifier/"):
            new = rng.normal(0.0, classifier_std, value.shape)  # peaked distributions: a stricter check
        elif "cls" in name.split("/")[-1]:
            new = rng.normal(0.0, 0.5, value.shape)
        else:
            new = value + rng.normal(0.0, 0.1 if value.ndim == 1 else 0.02, value.shape)
        w.assign(new.astype(np.float32))


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 images: random colour blobs (a coarse grid, upsampled) + noise."""
    coarse = rng.uniform(0, 255, (n, 6, 6, 3)).astype(np.float32)
    up = tf.image.resize(coarse, (size, size), method="bilinear").numpy()
    noisy = up + rng.normal(0, 12, up.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--sizes", type=int, nargs="+", default=[384, 960])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier-std", type=float, default=0.2)
    p.add_argument("--h5", required=True, help="where save_weights writes the weights")
    p.add_argument("--npz", required=True, help="inputs and Keras outputs")
    args = p.parse_args()

    tf.random.set_seed(args.seed)
    keras.utils.set_random_seed(args.seed)
    arch = ARCHS[args.arch]
    model = build_vitpcm(arch, args.classes)
    randomise(model, args.seed, args.classifier_std)
    model.save_weights(args.h5)  # a .h5 name: the legacy Keras-2 HDF5 format of ModelCheckpoint

    rng = np.random.default_rng(args.seed + 1)
    out = {"arch": np.array(args.arch), "num_classes": np.array(args.classes),
           "weight_names": np.array([w.name for w in model.weights])}  # fmt: skip
    for size in args.sizes:
        images = smooth_images(rng, args.batch, size)
        x = (images.astype(np.float32) - 127.5) / 127.5  # the authors' normalisation
        y = model(x, training=False)
        out[f"images_{size}"] = images  # uint8: the other side normalises them the same way
        for key in ("logits", "preds", "pooled_preds"):
            out[f"{key}_{size}"] = y[key].numpy()
    # TF's bicubic resize itself, for the resize unit test
    grid = rng.standard_normal((1, 24, 24, 4)).astype(np.float32)
    out["tf_resize_in"] = grid
    for h, w in ((60, 60), (7, 5)):
        out[f"tf_resize_out_{h}x{w}"] = tf.image.resize(grid, (h, w), method="bicubic").numpy()
    np.savez_compressed(args.npz, **out)
    print(f"{args.h5}: {len(model.weights)} weights; {args.npz}: sizes {args.sizes}")


if __name__ == "__main__":
    main()
