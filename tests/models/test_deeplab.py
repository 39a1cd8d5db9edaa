"""DeepLab of the verification stage: output stride, ASPP, MSC, frozen BN, weights, registry."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn as nn

from vitpcm.errors import VitpcmError
from vitpcm.models.deeplab import ASPPSum, DeepLab, ResNetTrunk, predict_probs, refuse_pixel_label_weights
from vitpcm.models.registry import create_model, model_arch


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_deeplabv2_output_stride_is_8(backbone):
    model = DeepLab(3, backbone=backbone).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 3, 8, 12)
    assert model.arch["output_stride"] == 8
    # layer3 / layer4 keep their resolution: dilation replaces the stride
    strides = [m.stride for m in model.trunk.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert all(s == (1, 1) for s in strides)


def test_from_scratch_every_residual_branch_starts_at_zero():
    model = DeepLab(3, backbone="resnet18", backbone_weights=False)
    assert all(
        float(block.bn2.weight.detach().abs().max()) == 0
        for layer in (model.trunk.layer1, model.trunk.layer4)
        for block in layer
    )


def test_resnet101_trunk_is_dilated_as_torchvision_does():
    trunk = ResNetTrunk("resnet101", 8)
    # replace_stride_with_dilation=[False, True, True]: layer3 at 2, layer4 at 4 (first block: the previous)
    assert trunk.layer3[1].conv2.dilation == (2, 2) and trunk.layer4[1].conv2.dilation == (4, 4)
    assert trunk.layer3[0].conv2.stride == (1, 1) and trunk.layer4[0].conv2.dilation == (2, 2)
    assert trunk.out_channels == 2048


def test_aspp_has_four_summed_branches_with_rates_6_12_18_24():
    model = DeepLab(5, backbone="resnet18")
    aspp = model.head
    assert isinstance(aspp, ASPPSum) and len(aspp.branches) == 4
    assert [c.dilation[0] for c in aspp.branches] == [6, 12, 18, 24]
    assert [c.padding[0] for c in aspp.branches] == [6, 12, 18, 24]
    assert all(c.kernel_size == (3, 3) and c.out_channels == 5 for c in aspp.branches)
    x = torch.randn(2, 512, 9, 9)
    with torch.no_grad():
        assert torch.allclose(aspp(x), sum(c(x) for c in aspp.branches), atol=1e-6)


def test_deeplabv3plus_decodes_at_stride_4():
    model = DeepLab(4, model="deeplabv3plus", backbone="resnet18").eval()
    assert model.arch["output_stride"] == 16 and model.arch["rates"] == [6, 12, 18]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4, 16, 16)


def test_msc_returns_every_scale_and_their_max():
    model = DeepLab(3, backbone="resnet18", msc_scales=[0.5, 0.75]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x, all_scales=True)
        fused = model(x)
    assert [tuple(o.shape[-2:]) for o in outs] == [(8, 8), (4, 4), (6, 6), (8, 8)]
    assert torch.equal(outs[-1], fused)
    assert torch.all(fused >= outs[0])


def test_frozen_batch_norm_keeps_statistics_and_takes_no_gradient():
    model = DeepLab(3, backbone="resnet18")
    model.train()
    model.freeze_batch_norm()
    bns = model.trunk.batch_norms()
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(not bn.training and not bn.weight.requires_grad for bn in bns)
    assert torch.equal(bns[0].running_mean, before)
    weights, biases = model.head_parameters()
    assert len(weights) == 4 and len(biases) == 4 and all(p.grad is not None for p in weights)


@pytest.mark.parametrize(
    "spec",
    ["DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1", "COCO_WITH_VOC_LABELS_V1", "fcn_resnet50_coco-1167a1af.pth",
     "/models/deeplabv3_resnet101_coco-586e9e4e.pth", "/x/deeplabv2_resnet101_COCO_init.pth", "/x/resnet101_voc12.pth"],
)  # fmt: skip
def test_weights_trained_with_pixel_labels_are_refused(spec):
    with pytest.raises(VitpcmError, match="pixel labels"):
        refuse_pixel_label_weights(spec)
    with pytest.raises(VitpcmError, match="pixel labels"):
        DeepLab(3, backbone="resnet18", backbone_weights=spec)


def test_a_file_holding_a_segmentation_head_is_refused(tmp_path):
    state = {f"backbone.{k}": v for k, v in ResNetTrunk("resnet18").state_dict().items()}
    state["classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    path = tmp_path / "my_weights.pth"
    torch.save(state, path)
    with pytest.raises(VitpcmError, match="segmentation head"):
        DeepLab(3, backbone="resnet18", backbone_weights=str(path))


def test_a_local_resnet_file_loads(tmp_path):
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model = DeepLab(3, backbone="resnet18", backbone_weights=str(path))
    assert torch.equal(model.trunk.conv1.weight, net.conv1.weight)
    assert model.loaded == str(path)
    with pytest.raises(VitpcmError, match="does not fit resnet50"):
        DeepLab(3, backbone="resnet50", backbone_weights=str(path))


def test_imagenet_weights_offline_give_one_clear_line(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(
        VitpcmError, match=r"cannot fetch torchvision's ImageNet-1k weights for resnet18 .*backbone_weights="
    ):
        DeepLab(3, backbone="resnet18", backbone_weights=True)
    with pytest.raises(VitpcmError, match="not a file and not one of ResNet18_Weights"):
        DeepLab(3, backbone="resnet18", backbone_weights="IMAGENET22K")


def test_registry_rebuilds_the_model_and_it_predicts_the_same():
    torch.manual_seed(0)
    model = DeepLab(4, backbone="resnet18", msc_scales=[0.5]).eval()
    arch = model_arch(model, "deeplab")
    again = create_model(arch).eval()
    again.load_state_dict(model.state_dict())
    image = torch.randn(3, 40, 52)
    a = predict_probs(model, image, scales=(0.75, 1.0), flip=True)
    b = predict_probs(again, image, scales=(0.75, 1.0), flip=True)
    assert a.shape == (4, 40, 52) and torch.allclose(a.sum(0), torch.ones(40, 52), atol=1e-5)
    assert torch.equal(a, b)
    assert again.normalisation == model.normalisation
