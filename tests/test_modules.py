"""Trainable modules: reference parameter names, shapes and counts; sizes for other presets; forward shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from networks.blocks.decoders import Decoder2D, Decoder3D, WindowAttention
from networks.blocks.dropout import Dropout, keep_mask
from networks.features import PRESETS
from networks.methods.cmdr import CMDRIAD, MODULE_NAMES, MODULES_OF_MODALITY, build_module, masked_cosine_loss
from networks.methods.registry import build_detector

# Every parameter name and shape of the reference modules (a copy of shared/spec/reference_state_dicts.json).
REFERENCE = Path(__file__).resolve().parent / "data" / "reference_state_dicts.json"


@pytest.mark.parametrize("name", MODULE_NAMES)
def test_paper_modules_equal_the_reference(name: str):
    reference = json.loads(REFERENCE.read_text())[name]
    module = build_module(name, PRESETS["paper"])
    assert {k: list(v.shape) for k, v in module.state_dict().items()} == reference["state_dict"]
    assert sum(p.numel() for p in module.parameters()) == reference["params"]


def test_forward_shapes():
    config = PRESETS["tiny"]  # the paper size uses the same classes; its forward is too slow for the suite
    pixels = config.img_size**2
    f2d, f3d = torch.randn(2, pixels, config.rgb_dim), torch.randn(2, pixels, config.xyz_dim)
    model = CMDRIAD(config).eval()
    assert model.map2Dto3D(f2d).shape == f3d.shape
    assert model.map3Dto2D(f3d).shape == f2d.shape
    assert model.Dec2D(f2d).shape == f2d.shape
    assert model.Dec3D(f3d).shape == f3d.shape


def test_scan_layout_decoder():
    """The 3D-only scan pipeline's 96×96 layout uses the same class."""
    decoder = Decoder3D(out_seq_len=9216, feature_dim=1152)
    assert decoder.projection[0].in_features == 9216 and decoder.projection[0].out_features == 288
    with pytest.raises(ValueError, match="divisible by 32"):
        Decoder3D(out_seq_len=100)


@pytest.mark.parametrize("modality", sorted(MODULES_OF_MODALITY))
def test_modality_builds_only_its_modules(modality: str):
    model = CMDRIAD(PRESETS["tiny"], modality, cell_norm="off")
    assert tuple(model.trainable()) == MODULES_OF_MODALITY[modality]
    assert {name for name, _ in model.named_children()} == set(MODULES_OF_MODALITY[modality])
    # the default adds the per-pixel statistics (buffers, saved as a module file) to the 2D-only model alone
    default = CMDRIAD(PRESETS["tiny"], modality)
    extra = ("cell_statistics",) if modality == "rgb" else ()
    assert tuple(default.trainable()) == MODULES_OF_MODALITY[modality] + extra


def test_window_attention_is_local_and_pads():
    """Tokens only attend inside their window of consecutive tokens; a ragged tail is zero-padded."""
    torch.manual_seed(0)
    attention = WindowAttention(dim=8, num_heads=2, window_size=4, attn_drop=0.0, proj_drop=0.0).eval()
    x = torch.randn(1, 10, 8)
    out = attention(x)
    changed = x.clone()
    changed[0, 9] += 1.0  # in the last (padded) window: tokens 8, 9 (+2 zero tokens)
    diff = (attention(changed) - out).abs().sum(-1)[0]
    assert out.shape == (1, 10, 8)
    assert torch.all(diff[:8] == 0) and torch.all(diff[8:] > 0)
    padded = torch.cat([x, torch.zeros(1, 2, 8)], dim=1)
    torch.testing.assert_close(attention(padded)[:, :10], out)


def test_decoder2d_dropout_acts_only_in_training():
    torch.manual_seed(0)
    decoder = Decoder2D(dim=16, img_size=16, num_heads=2, window_size=128, conv_channels=(8, 4))
    x = torch.randn(2, 256, 16)
    assert not torch.equal(decoder.train()(x), decoder(x)), "dropout is active while training"
    assert torch.equal(decoder.eval()(x), decoder(x)), "and off in eval mode: inference is deterministic"


def test_masked_cosine_loss_matches_definition():
    torch.manual_seed(1)
    prediction, target = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    cosines = [
        float(torch.dot(prediction[b, p], target[b, p]) / (prediction[b, p].norm() * target[b, p].norm()))
        for b in range(2) for p in range(5) if mask[b, p]
    ]
    assert masked_cosine_loss(prediction, target, mask).item() == pytest.approx(1 - sum(cosines) / len(cosines))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_expected_fraction_scaled(p: float):
    """networks.blocks.dropout.Dropout: every element is 0 or x / (1 − p), dropped with probability round(p·2¹⁶)/2¹⁶
    (within 5 standard deviations over 2²⁰ elements), independently of its position (each of the four 16-bit
    fields of a 64-bit draw, and both halves of the tensor, drop alike); the gradient passes through the same mask;
    in eval mode it is the identity."""
    torch.manual_seed(3)
    x = torch.rand(1 << 20, dtype=torch.float64).float() + 1.0  # no zeros: a zero output means dropped
    x.requires_grad_()
    layer = Dropout(p).train()
    out = layer(x)
    dropped = out == 0
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p), rtol=1e-6, atol=0)
    expected = round(p * 65536) / 65536
    sigma = (expected * (1 - expected) / x.numel()) ** 0.5
    assert abs(dropped.double().mean().item() - expected) < 5 * sigma
    for field in dropped.reshape(-1, 4).unbind(1):
        assert abs(field.double().mean().item() - expected) < 5 * 2 * sigma
    for half in dropped.chunk(2):
        assert abs(half.double().mean().item() - expected) < 5 * 1.5 * sigma
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() / (1 - p))
    assert torch.equal(layer.eval()(x), x)


def test_dropout_masks_follow_the_global_seed():
    torch.manual_seed(5)
    first = keep_mask((7, 9), 0.1)
    torch.manual_seed(5)
    assert torch.equal(keep_mask((7, 9), 0.1), first) and first.shape == (7, 9)


@pytest.mark.parametrize("name", ["cmdr", "cfm"])
def test_pixelwise_modules_on_the_valid_rows_equal_every_pixel(name: str):
    """The mapping MLPs run on the valid pixels only (PixelwiseMixin); computing every pixel, as the exported
    graph does, gives the same losses and maps, zero on the invalid pixels."""
    config = PRESETS["tiny"]
    torch.manual_seed(2)
    model = build_detector(name, config).eval()
    pixels = config.grid_size ** 2
    f2d, f3d = torch.randn(2, pixels, config.rgb_dim), torch.randn(2, pixels, config.xyz_dim)
    mask = torch.rand(2, pixels) < 0.3
    f3d[~mask] = 0
    with torch.no_grad():
        rows_losses, rows_maps = model.losses(f2d, f3d, mask), model.distance_maps(f2d, f3d, mask)
        model.valid_rows_only = False
        full_losses, full_maps = model.losses(f2d, f3d, mask), model.distance_maps(f2d, f3d, mask)
    for key in full_losses:
        torch.testing.assert_close(rows_losses[key], full_losses[key], rtol=1e-6, atol=1e-7)
    for key in full_maps:
        torch.testing.assert_close(rows_maps[key], full_maps[key], rtol=1e-5, atol=1e-6)
        assert torch.all(rows_maps[key].reshape(2, -1)[~mask] == 0)
