"""Backbones as adapters: every supported timm family trains a step and infers at another size.

Random init, tiny widths (backbone_kwargs), small images, CPU, no network. For each backbone:
the config resolves ``input.mean/std: auto`` to the timm pretrained config, a training step
(TrainTransform -> ET views tiled 2 x 2 -> forward -> L_MCE -> backward) updates exactly the
unfrozen parts, and inference at a second, non-square size gives the H/d x W/d grid.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from omegaconf import OmegaConf

from vitpcm.config import check_sizes, load_config
from vitpcm.data.transforms import TrainTransform, collate, tile_views
from vitpcm.errors import VitpcmError
from vitpcm.losses import mce_loss
from vitpcm.models.backbone import BackboneAdapter, create_backbone, describe_backbone
from vitpcm.models.vitpcm import ViTPCM
from vitpcm.stages.config import resolve_config

HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TINY_KW = {"embed_dim": 32, "depth": 2, "num_heads": 2}

# name, patch side, prefix tokens, register tokens, (mean, std) of its pretrained config
MATRIX = [
    ("vit_base_patch16_384.orig_in21k_ft_in1k", 16, 1, 0, (HALF, HALF)),  # the authors' backbone
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", 16, 1, 0, (HALF, HALF)),
    ("vit_base_patch8_224.augreg2_in21k_ft_in1k", 8, 1, 0, (HALF, HALF)),
    ("deit_tiny_patch16_224", 16, 1, 0, IMAGENET),
    ("deit_tiny_distilled_patch16_224", 16, 2, 0, IMAGENET),  # CLS + distillation token
    ("vit_small_patch16_224.dino", 16, 1, 0, IMAGENET),
    ("vit_small_patch8_224.dino", 8, 1, 0, IMAGENET),
    ("vit_small_patch14_dinov2", 14, 1, 0, IMAGENET),
    ("vit_small_patch14_reg4_dinov2", 14, 5, 4, IMAGENET),  # CLS + 4 registers
    ("vit_base_patch16_clip_224.openai", 16, 1, 0, CLIP),  # pre-norm (norm_pre) in the stem
    ("vit_base_patch16_clip_224.laion2b", 16, 1, 0, CLIP),
    ("eva02_tiny_patch14_224.mim_in22k", 14, 1, 0, CLIP),  # rotary position embeddings
]

NUM_CLASSES = 3


def tiny_config(name: str, d: int):
    """The synthetic preset on ``name``: a 4 x 4 patch training grid, 6 x 6 at inference."""
    kwargs = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_KW.items()) + "}"
    return load_config(
        "synthetic",
        [f"model.backbone={name}", f"model.backbone_kwargs={kwargs}", "model.lstm_hidden=8",
         f"input.train_size={4 * d}", f"input.et_scale={2 * d}", f"input.et_crop={2 * d}", f"infer.scale={6 * d}"],
    )  # fmt: skip


def build(cfg) -> ViTPCM:
    m = cfg.model
    return ViTPCM(
        backbone=m.backbone, num_classes=NUM_CLASSES, pretrained=False, img_size=cfg.input.train_size,
        lstm_hidden=m.lstm_hidden, backbone_kwargs=OmegaConf.to_container(m.backbone_kwargs),
    )  # fmt: skip


def trainable_names(module: torch.nn.Module) -> set:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, d, prefix, registers, norm", MATRIX, ids=[m[0] for m in MATRIX])
def test_backbone_trains_a_step_and_infers_at_another_size(name, d, prefix, registers, norm):
    torch.manual_seed(0)
    cfg = resolve_config(tiny_config(name, d))
    mean, std = norm
    assert list(cfg.input.mean) == pytest.approx(mean) and list(cfg.input.std) == pytest.approx(std)

    model = build(cfg)
    adapter = model.adapter
    assert adapter.patch_size == model.patch_size == d
    assert (adapter.num_prefix_tokens, adapter.num_register_tokens) == (prefix, registers)
    assert model.normalisation == (pytest.approx(mean), pytest.approx(std))
    assert all(k.startswith(("backbone.", "conditioning.", "classifier.")) for k in model.state_dict())

    # Phase 2 freezing: exactly the last block and the final norm of the backbone train.
    model.set_backbone_trainable(1)
    last = len(adapter.blocks) - 1
    norm_name = "norm" if adapter.final_norm is model.backbone.norm else "fc_norm"
    expected = {n for n, _ in model.backbone.named_parameters() if n.startswith((f"blocks.{last}.", f"{norm_name}."))}
    assert expected and trainable_names(model.backbone) == expected
    assert any(n.startswith(f"{norm_name}.") for n in expected)

    # One training step: both views through the transforms, ET views tiled 2 x 2 into one n x n input.
    n = cfg.input.train_size
    aug = OmegaConf.structured(cfg.augment)
    transform = TrainTransform(n, cfg.input.et_crop, cfg.input.et_scale, d, aug, mean=cfg.input.mean, std=cfg.input.std)
    labels = torch.tensor([1.0, 1.0, 0.0])
    samples = [transform({"image": torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8), "labels": labels,
                          "name": f"x{i}", "size": (50, 60)}) for i in range(4)]  # fmt: skip
    batch = collate(samples)
    tiled, count = tile_views(batch["image_et"])
    assert tiled.shape == (1, 3, n, n) and count == 4
    model.train()
    out = model(torch.cat([batch["image"], tiled]))
    assert out["probs"].shape == (5, NUM_CLASSES, n // d, n // d)
    loss = mce_loss(out["pooled"][:4], batch["labels"])
    loss.backward()
    grads = {n for n, p in model.backbone.named_parameters() if p.grad is not None}
    assert grads == expected  # the frozen parts get no gradient
    assert model.classifier.linear.weight.grad is not None

    # Inference at a second, non-square size: position embeddings follow the grid.
    model.eval()
    with torch.no_grad():
        probs = model(torch.randn(1, 3, 6 * d, 5 * d))["probs"]
        tokens = model.patch_tokens(torch.randn(1, 3, 6 * d, 5 * d))
    assert probs.shape == (1, NUM_CLASSES, 6, 5)
    assert torch.allclose(probs.sum(1), torch.ones(1, 6, 5), atol=1e-5)
    assert tokens.shape == (1, 6, 5, TINY_KW["embed_dim"])

    model.set_backbone_trainable(0)
    assert not trainable_names(model.backbone)
    model.set_backbone_trainable(-1)
    assert trainable_names(model.backbone) == {n for n, _ in model.backbone.named_parameters()}


def test_prefix_tokens_are_what_the_adapter_drops():
    """The patch tokens are forward_features minus the CLS and register tokens, normed, on their grid."""
    torch.manual_seed(0)
    model = ViTPCM("vit_small_patch14_reg4_dinov2", num_classes=2, pretrained=False, img_size=56,
                   lstm_hidden=4, backbone_kwargs=TINY_KW).eval()  # fmt: skip
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        full = model.backbone.forward_features(x)
        tokens = model.patch_tokens(x)
    assert full.shape[1] == 5 + 3 * 4
    assert torch.equal(tokens.reshape(1, 12, -1), full[:, 5:])


def test_eva02_mim_final_norm_is_fc_norm():
    """timm keeps the EVA-02 MIM encoder's final norm as fc_norm; the adapter applies it to every patch."""
    torch.manual_seed(0)
    model = ViTPCM("eva02_tiny_patch14_224.mim_in22k", num_classes=2, pretrained=False, img_size=56,
                   lstm_hidden=4, backbone_kwargs=TINY_KW).eval()  # fmt: skip
    assert isinstance(model.backbone.norm, torch.nn.Identity)
    assert model.adapter.final_norm is model.backbone.fc_norm
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        tokens = model.patch_tokens(x)
        ref = model.backbone.fc_norm(model.backbone.forward_features(x)[:, 1:])
    assert torch.equal(tokens.reshape(1, 6, -1), ref)


@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "vit_base_r50_s16_384"])
def test_non_vit_backbones_are_one_clear_error(name):
    with pytest.raises(
        VitpcmError, match=f"backbone '{name}' is not a supported vision transformer: vitpcm takes .*DeiT.*EVA-02"
    ) as err:
        create_backbone(name)
    assert "\n" not in str(err.value)
    with pytest.raises(VitpcmError, match="not a supported vision transformer"):
        resolve_config(load_config("synthetic", [f"model.backbone={name}"]))


def test_adapter_refuses_a_module_it_cannot_serve():
    with pytest.raises(VitpcmError, match="not a supported vision transformer"):
        BackboneAdapter(torch.nn.Linear(2, 2), "linear")
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **TINY_KW)
    with pytest.raises(VitpcmError, match="dynamic_img_size"):
        BackboneAdapter(fixed, "vit_tiny_patch16_224")


# Keys of the tiny model as the code before the adapters saved them (a checkpoint of that shape must load).
OLD_TINY_KEYS = sorted(
    ["backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"]
    + [f"backbone.blocks.{i}.{p}" for i in range(2) for p in (
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    + ["backbone.norm.weight", "backbone.norm.bias"]
    + [f"conditioning.{lstm}.{w}_{k}_l0{r}" for lstm in ("rows", "cols") for r in ("", "_reverse")
       for w in ("weight", "bias") for k in ("ih", "hh")]
    + ["classifier.linear.weight"]
)  # fmt: skip


def test_state_dict_keys_and_old_checkpoints_are_unchanged():
    kw = {"patch_size": 8, **TINY_KW}
    model = ViTPCM(
        "vit_tiny_patch16_224", num_classes=4, pretrained=False, img_size=32, lstm_hidden=8, backbone_kwargs=kw
    )
    assert sorted(model.state_dict()) == OLD_TINY_KEYS
    # An old checkpoint: the plain timm module's state dict under backbone.*, plus the head.
    timm_module = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, **kw)
    old = {f"backbone.{k}": v for k, v in timm_module.state_dict().items()}
    old.update({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")})
    again = ViTPCM.from_arch(model.arch)
    again.load_state_dict(old, strict=True)
    assert torch.equal(again.backbone.blocks[1].attn.qkv.weight, timm_module.blocks[1].attn.qkv.weight)
    # The authors' ViT-B/16: the backbone's keys are timm's own (built on the meta device, no memory).
    with torch.device("meta"):
        ours = create_backbone("vit_base_patch16_384.orig_in21k_ft_in1k", img_size=384)
        plain = timm.create_model("vit_base_patch16_384.orig_in21k_ft_in1k", num_classes=0, img_size=384)
    assert list(ours.state_dict()) == list(plain.state_dict())


def test_describe_backbone_without_memory_or_network():
    adapter = describe_backbone("vit_small_patch14_reg4_dinov2", img_size=518)
    assert (adapter.patch_size, adapter.num_prefix_tokens, adapter.depth, adapter.embed_dim) == (14, 5, 12, 384)
    assert adapter.mean == pytest.approx(IMAGENET[0])


def test_explicit_mean_std_win_over_auto():
    cfg = resolve_config(load_config("synthetic", ["input.mean=[0.1,0.2,0.3]"]))
    assert list(cfg.input.mean) == pytest.approx([0.1, 0.2, 0.3]) and list(cfg.input.std) == pytest.approx(HALF)
    assert OmegaConf.select(load_config("synthetic"), "input.mean") == "auto"  # load_config stays timm-free


def test_switching_the_backbone_on_the_synthetic_preset_resets_its_kwargs(caplog):
    with caplog.at_level(logging.INFO, logger="vitpcm.config"):
        cfg = load_config("synthetic", ["model.backbone=vit_small_patch14_dinov2"])
    assert OmegaConf.to_container(cfg.model.backbone_kwargs) == {}
    assert any("backbone_kwargs" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)
    # Overridden kwargs apply alone (the preset's patch_size 8 must not leak into DINOv2).
    cfg = load_config("synthetic", ["model.backbone=vit_small_patch14_dinov2", "model.backbone_kwargs.depth=2"])
    assert OmegaConf.to_container(cfg.model.backbone_kwargs) == {"depth": 2}
    # Same backbone, or no preset kwargs: nothing changes.
    same = load_config("synthetic", ["model.backbone=vit_tiny_patch16_224"])
    assert same.model.backbone_kwargs.patch_size == 8
    assert load_config("synthetic").model.backbone_kwargs.patch_size == 8


def test_a_size_that_is_not_a_multiple_of_the_patch_is_one_clear_error():
    cfg = load_config("voc12", ["model.backbone=vit_small_patch14_dinov2", "input.train_size=392", "input.et_scale=196",
                                "input.et_crop=126", "infer.scale=961"])  # fmt: skip
    with pytest.raises(VitpcmError) as err:
        resolve_config(cfg)
    assert (
        str(err.value)
        == "infer.scale=961 is not a multiple of the patch size 14 of vit_small_patch14_dinov2: use 952 or 966"
    )
    # train_size needs twice the patch: its half is the ET view's side.
    cfg = load_config("voc12", ["input.train_size=400", "input.et_scale=200"])
    with pytest.raises(
        VitpcmError,
        match=r"input.train_size=400 \(of 32, as input.et_scale = train_size / 2\): use 384 or 416; input.et_scale=200: use 192 or 208$",
    ):
        check_sizes(cfg, 16)
    # The voc12 preset on DINOv2 as is: every wrong key in one message.
    with pytest.raises(
        VitpcmError,
        match=r"patch size 14 .*input.train_size=384 .*use 364 or 392.*input.et_crop=128: use 126 or 140.*infer.scale=960: use 952 or 966",
    ):
        resolve_config(load_config("voc12", ["model.backbone=vit_small_patch14_dinov2"]))
    check_sizes(load_config("voc12"), 16)  # the presets are valid
    check_sizes(load_config("synthetic"), 8)
