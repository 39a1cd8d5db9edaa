"""ViT-PCM model: shapes, softmax per patch, GMP, scales, freezing, local checkpoints."""

import pytest
import timm
import torch

from vitpcm.errors import VitpcmError
from vitpcm.models.vitpcm import ViTPCM

KW = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny(**extra):
    args = dict(backbone="vit_tiny_patch16_224", num_classes=4, pretrained=False, img_size=32,
                lstm_hidden=8, backbone_kwargs=KW)  # fmt: skip
    args.update(extra)
    return ViTPCM(**args)


def test_forward_shapes_and_pooling():
    model = tiny().eval()
    out = model(torch.randn(2, 3, 32, 48))
    assert out["probs"].shape == (2, 4, 4, 6)
    assert out["logits"].shape == (2, 4, 4, 6)
    assert torch.allclose(out["probs"].sum(1), torch.ones(2, 4, 6), atol=1e-5)
    assert torch.allclose(out["pooled"], out["probs"].amax(dim=(2, 3)))


def test_runs_at_train_and_test_scales_with_one_set_of_weights():
    model = tiny().eval()
    small = model(torch.randn(1, 3, 32, 32))["probs"]
    large = model(torch.randn(1, 3, 96, 96))["probs"]  # pos-embed interpolated to 12 x 12
    assert small.shape[-1] == 4 and large.shape[-1] == 12


def test_cls_token_is_dropped_and_hv_features_are_4x_hidden():
    model = tiny()
    tokens = model.patch_tokens(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 4, 4, 32)
    assert model.conditioning.out_dim == 32 and model.classifier.weight.shape == (4, 32)
    assert model.classifier.linear.bias is None


def test_classifier_init_std():
    torch.manual_seed(0)
    model = ViTPCM("vit_tiny_patch16_224", num_classes=50, pretrained=False, img_size=32,
                   lstm_hidden=192, backbone_kwargs=KW)  # fmt: skip
    assert abs(model.classifier.weight.std().item() - 0.05) < 0.005


def test_without_hv_lstm_the_classifier_reads_tokens():
    model = tiny(hv_lstm=False)
    assert model.conditioning is None and model.classifier.weight.shape == (4, 32)
    assert model(torch.randn(1, 3, 32, 32))["probs"].shape == (1, 4, 4, 4)


def test_patch_conditioning_mixes_rows_and_columns_only():
    """A change at patch (0, 0) reaches row 0 and column 0 through the HV-BiLSTM, nothing else."""
    model = tiny(hv_lstm=True).eval()
    feats = torch.randn(1, 4, 4, 32)
    base = model.conditioning(feats)
    feats2 = feats.clone()
    feats2[0, 0, 0] += 1.0
    diff = (model.conditioning(feats2) - base).abs().sum(-1)[0]
    assert diff[0].min() > 0 and diff[:, 0].min() > 0
    assert diff[1:, 1:].max() == 0


def test_freezing_schedule():
    model = tiny()
    model.set_backbone_trainable(0)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    model.set_backbone_trainable(1)
    assert all(p.requires_grad for p in model.backbone.blocks[-1].parameters())
    assert all(p.requires_grad for p in model.backbone.norm.parameters())
    assert not any(p.requires_grad for p in model.backbone.blocks[0].parameters())
    assert not model.backbone.pos_embed.requires_grad
    model.set_backbone_trainable(-1)
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_local_checkpoint_is_loaded(tmp_path):
    """pretrained='file' loads a timm state dict, resampling position embeddings when sizes differ."""
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, **KW)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    model = tiny(pretrained=str(path), img_size=64)
    assert torch.equal(model.backbone.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    resized = tiny(pretrained=str(path), img_size=32)  # 8x8 -> 4x4 position grid
    assert resized.backbone.pos_embed.shape[1] == 1 + 16
    assert torch.equal(resized.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_missing_checkpoint_and_unknown_backbone_are_clear_errors(tmp_path):
    with pytest.raises(VitpcmError, match="not found"):
        tiny(pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(VitpcmError, match="unknown backbone"):
        tiny(backbone="vit_does_not_exist")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VitpcmError, match="cannot load backbone weights"):
        tiny(pretrained=str(bad))
