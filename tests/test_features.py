"""Frozen extractors: reference parameter names, checkpoint loading, BatchNorm modes, pixel alignment, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from networks.extractors.point_mae import (
    POINTMAE_URL, TRUST_PICKLE_ENV, Block, PointMAEConfig, PointMAEEncoder, WeightsError, _batch_norm,
    load_pointmae_weights, read_checkpoint,
)
from networks.features import PRESETS, MultimodalFeatures, ViTConfig, build_rgb_backbone, foreground_mask
from utils.data.mvtec3d import MVTec3DDataset, collate_samples
from utils.runs.pipeline import open_split

# Every parameter name and shape of the reference modules (a copy of shared/spec/reference_state_dicts.json).
REFERENCE = Path(__file__).resolve().parent / "data" / "reference_state_dicts.json"
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_extractor() -> MultimodalFeatures:
    return MultimodalFeatures("tiny", random_init=True)


@pytest.fixture(scope="module")
def tiny_batch(synthetic_root: Path):
    dataset = MVTec3DDataset(synthetic_root, "dome", "test", img_size=TINY.img_size)
    return collate_samples([dataset[i] for i in (0, 3, 6)])


# --- Point-MAE structure and weights ---------------------------------------------------------------------------------

def test_point_mae_state_dict_equals_reference():
    reference = json.loads(REFERENCE.read_text())["PointMAE_encoder"]
    encoder = PointMAEEncoder()
    assert {k: list(v.shape) for k, v in encoder.state_dict().items()} == reference["state_dict"]
    assert sum(p.numel() for p in encoder.parameters()) == reference["params"]


def public_layout_checkpoint(encoder: PointMAEEncoder) -> dict:
    """A checkpoint laid out like the Point-MAE release's pretrain.pth (DataParallel, MAE encoder + decoder)."""
    base_model = {f"module.MAE_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    base_model.update({
        "module.mask_token": torch.zeros(1, 1, 384),
        "module.decoder_pos_embed.0.weight": torch.zeros(128, 3),
        "module.MAE_decoder.blocks.0.norm1.weight": torch.ones(384),
        "module.increase_dim.0.weight": torch.zeros(96, 384, 1),
    })
    return {"base_model": base_model, "epoch": 300, "optimizer": {"state": {}}}


def test_public_checkpoint_layout_loads(tmp_path: Path):
    source = PointMAEEncoder(TINY.xyz)
    torch.save(public_layout_checkpoint(source), tmp_path / "pretrain.pth")
    target = PointMAEEncoder(TINY.xyz)
    load_pointmae_weights(target, tmp_path / "pretrain.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update({"module.MAE_encoder.cls_token": torch.zeros(1)}), "unexpected.*cls_token"),
        (lambda sd: sd.pop("module.MAE_encoder.norm.weight"), "missing.*norm.weight"),
        (lambda sd: sd.update({"module.MAE_encoder.norm.bias": torch.zeros(7)}), "wrong shape.*norm.bias"),
    ],
)
def test_checkpoint_with_wrong_keys_fails_loudly(tmp_path: Path, edit, message: str):
    checkpoint = public_layout_checkpoint(PointMAEEncoder(TINY.xyz))
    edit(checkpoint["base_model"])
    torch.save(checkpoint, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=message):
        load_pointmae_weights(PointMAEEncoder(TINY.xyz), tmp_path / "bad.pth")


def test_missing_pointmae_weights_say_where_to_get_them(tmp_path: Path):
    with pytest.raises(WeightsError, match=f"{tmp_path / 'nope.pth'}.*{POINTMAE_URL}"):
        MultimodalFeatures("tiny", random_init=False, modality="xyz", pointmae_weights=tmp_path / "nope.pth")


def test_tiny_rgb_without_random_init_is_refused():
    with pytest.raises(WeightsError, match="--random_init"):
        MultimodalFeatures("tiny", modality="rgb")


def test_paper_rgb_offline_without_file_is_a_clear_error(offline_without_weights: Path):
    with pytest.raises(WeightsError, match="dino_vitbase8_pretrain.pth.*--rgb_weights"):
        build_rgb_backbone(PRESETS["paper"], random_init=False)


def test_every_missing_weights_file_is_named_at_once(offline_without_weights: Path):
    with pytest.raises(WeightsError) as error:
        MultimodalFeatures("paper")
    message = str(error.value)
    assert message.count("\n  - ") == 2, message
    assert "vit_base_patch8_224.dino" in message and "dino_vitbase8_pretrain.pth" in message
    assert "--rgb_weights" in message and POINTMAE_URL in message and "--pointmae_weights" in message
    with pytest.raises(WeightsError, match="nope.pth: no such file"):
        MultimodalFeatures("paper", rgb_weights="nope.pth", random_init=True)


def test_weights_in_the_hub_cache_need_no_network(offline_without_weights: Path, monkeypatch: pytest.MonkeyPatch):
    from networks import features

    monkeypatch.setattr(features, "_hub_weights_cached", lambda name: True)
    assert features.missing_weights(PRESETS["paper"], "rgb", False, None, None) == []


@pytest.mark.parametrize("layout", ["timm.pth", "dino_teacher.pth", "timm.safetensors"])
def test_rgb_weights_file_loads(tmp_path: Path, layout: str):
    source = VisionTransformer(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    state = source.state_dict()
    path = tmp_path / layout
    if layout == "timm.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "dino_teacher.pth":
        torch.save({"teacher": {f"module.backbone.{k}": v for k, v in state.items()}, "epoch": 1}, path)
    else:
        torch.save(state, path)
    model = build_rgb_backbone(TINY, weights=path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_random_init_is_seeded_and_private():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = MultimodalFeatures("tiny", random_init=True)
    assert torch.equal(torch.rand(3), expected_next), "building the extractor must not consume the global RNG"
    b = MultimodalFeatures("tiny", random_init=True)
    assert a.fingerprint("rgb") == b.fingerprint("rgb") and a.fingerprint("xyz") == b.fingerprint("xyz")
    assert a.metadata["random_init"] is True


# --- Point-MAE computations ------------------------------------------------------------------------------------------

def test_sample_batch_norm_uses_the_sample_statistics():
    bn = torch.nn.BatchNorm1d(4)
    torch.nn.init.normal_(bn.weight)
    torch.nn.init.normal_(bn.bias)
    x = torch.randn(6, 4, 5, dtype=torch.float64).float()
    mean = x.double().mean(dim=(0, 2), keepdim=True)
    var = x.double().var(dim=(0, 2), unbiased=False, keepdim=True)
    expected = (x.double() - mean) / torch.sqrt(var + bn.eps) * bn.weight.double()[:, None] + bn.bias.double()[:, None]
    running_before = bn.running_mean.clone()
    torch.testing.assert_close(_batch_norm(bn, x, "sample").double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bn.running_mean, running_before), "running statistics must never be updated"
    torch.testing.assert_close(_batch_norm(bn, x, "running"), bn.eval()(x))


def test_block_matches_the_formula():
    torch.manual_seed(0)
    block = Block(dim=12, num_heads=3, mlp_ratio=2.0)
    x = torch.randn(2, 5, 12)
    h = F.layer_norm(x, (12,), block.norm1.weight, block.norm1.bias, eps=1e-5)
    q, k, v = (h @ block.attn.qkv.weight.T).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q * 4**-0.5) @ k.transpose(-2, -1), dim=-1)
    x1 = x + (attn @ v).transpose(1, 2).reshape(2, 5, 12) @ block.attn.proj.weight.T + block.attn.proj.bias
    h2 = F.layer_norm(x1, (12,), block.norm2.weight, block.norm2.bias, eps=1e-5)
    expected = x1 + F.linear(F.gelu(F.linear(h2, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                             block.mlp.fc2.weight, block.mlp.fc2.bias)
    torch.testing.assert_close(block(x), expected)
    assert block.attn.qkv.bias is None


def test_encoder_fetches_normalised_blocks():
    config = PointMAEConfig(trans_dim=12, depth=4, num_heads=2, num_group=8, group_size=4, first_conv=(8, 16),
                            second_conv_hidden=16, fetch_blocks=(1, 3))
    encoder = _seeded_encoder(config)
    neighbourhoods, centres = torch.randn(8, 4, 3), torch.randn(8, 3)
    inputs, outputs = [], []  # what each block of the running encoder received and returned (hooks, no re-run)
    for block in encoder.blocks.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
        block.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    features = encoder(neighbourhoods, centres)
    pos = encoder.pos_embed(centres)
    # the positional embedding is added before every block (the reference's x = block(x + pos))
    torch.testing.assert_close(inputs[0], encoder.encoder(neighbourhoods)[None] + pos)
    for i in range(1, config.depth):
        torch.testing.assert_close(inputs[i], outputs[i - 1] + pos)
    # the features are blocks 1 and 3 (fetch_blocks), each through the final LayerNorm, side by side
    def layer_norm(x):
        return F.layer_norm(x, (12,), encoder.norm.weight, encoder.norm.bias, eps=encoder.norm.eps)[0]
    torch.testing.assert_close(features, torch.cat([layer_norm(outputs[1]), layer_norm(outputs[3])], dim=1))
    assert features.shape == (8, config.feature_dim) and config.feature_dim == 24


@pytest.mark.parametrize("groups_per_slice", [64, 3])
@pytest.mark.parametrize("bn_mode", ["sample", "running"])
def test_token_encoder_equals_the_reference_convolutions(bn_mode: str, groups_per_slice: int,
                                                         monkeypatch: pytest.MonkeyPatch):
    """The mini-PointNet as the reference writes it — 1×1 Conv1d on (G, C, k), the global feature concatenated
    before every point's — in float64, against ours (matrix products, the concatenated layer split, the last
    layer a slice of groups at a time: 10 groups in one slice or in slices of 3, 3, 3, 1)."""
    monkeypatch.setattr("networks.extractors.point_mae._GROUPS_PER_SLICE", groups_per_slice)
    encoder = _seeded_encoder(PointMAEConfig(first_conv=(16, 32), second_conv_hidden=48, trans_dim=24))
    tokenizer = encoder.encoder
    tokenizer.bn_mode = bn_mode
    for bn in (tokenizer.first_conv[1], tokenizer.second_conv[1]):
        torch.nn.init.normal_(bn.weight), torch.nn.init.normal_(bn.bias)
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    groups = torch.randn(10, 7, 3)

    def layers(sequential, x):
        for layer in sequential:
            if isinstance(layer, torch.nn.BatchNorm1d):
                statistics = (None, None) if bn_mode == "sample" else (layer.running_mean.double(),
                                                                        layer.running_var.double())
                x = F.batch_norm(x, *statistics, layer.weight.double(), layer.bias.double(),
                                 training=bn_mode == "sample", eps=layer.eps)
            elif isinstance(layer, torch.nn.Conv1d):
                x = F.conv1d(x, layer.weight.double(), layer.bias.double())
            else:
                x = layer(x)
        return x

    feature = layers(tokenizer.first_conv, groups.double().transpose(1, 2))  # (G, c2, k)
    feature = torch.cat([feature.max(dim=2, keepdim=True).values.expand(-1, -1, 7), feature], dim=1)
    expected = layers(tokenizer.second_conv, feature).max(dim=2).values
    torch.testing.assert_close(tokenizer(groups).double(), expected, rtol=1e-5, atol=1e-5)


def test_token_encoder_does_not_depend_on_the_thread_count():
    """A feature cache filled by 1-thread workers must equal what a 2-thread process computes (BatchNorm's sums)."""
    tokenizer = _seeded_encoder(PointMAEConfig(first_conv=(64, 128), second_conv_hidden=128, trans_dim=64)).encoder
    groups = torch.randn(64, 64, 3)  # 4096 points × 128 channels: large enough for torch to split work
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tokenizer(groups)
        torch.set_num_threads(max(threads, 2))
        assert torch.equal(tokenizer(groups), one)
    finally:
        torch.set_num_threads(threads)


def _seeded_encoder(config: PointMAEConfig) -> PointMAEEncoder:
    torch.manual_seed(0)
    return PointMAEEncoder(config)


# --- MultimodalFeatures ----------------------------------------------------------------------------------------------

def test_feature_map_shapes(tiny_extractor: MultimodalFeatures, tiny_batch):
    f2d, f3d = tiny_extractor.get_features_maps(tiny_batch.rgb, tiny_batch.xyz)
    pixels = TINY.img_size**2
    assert f2d.shape == (3, pixels, TINY.rgb_dim) and f3d.shape == (3, pixels, TINY.xyz_dim)
    assert f2d.dtype == f3d.dtype == torch.float32
    valid = f3d.abs().sum(-1) != 0
    assert 0.3 < valid.float().mean() < 1.0


def test_rgb_features_are_the_upsampled_vit_tokens(tiny_extractor: MultimodalFeatures, tiny_batch):
    tokens = tiny_extractor.rgb_backbone.forward_features(tiny_batch.rgb)[:, 1:]
    side = TINY.img_size // TINY.rgb.patch_size
    grid = tokens.transpose(1, 2).reshape(3, TINY.rgb_dim, side, side)
    expected = F.interpolate(grid, size=TINY.img_size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tiny_extractor.get_features_maps(tiny_batch.rgb, None)[0], expected)


def test_batch_gives_the_per_sample_results(tiny_extractor: MultimodalFeatures, tiny_batch):
    f2d, f3d = tiny_extractor.get_features_maps(tiny_batch.rgb, tiny_batch.xyz)
    for i in range(3):
        single_2d, single_3d = tiny_extractor.get_features_maps(tiny_batch.rgb[i : i + 1], tiny_batch.xyz[i : i + 1])
        assert torch.equal(f3d[i], single_3d[0]), "the 3D branch processes samples independently, bit for bit"
        torch.testing.assert_close(f2d[i], single_2d[0], rtol=1e-5, atol=1e-5)


def test_bn_mode_of_a_configuration_is_kept_unless_asked():
    running = dataclasses.replace(PRESETS["tiny"], bn_mode="running")
    assert MultimodalFeatures(running, random_init=True, modality="xyz").config.bn_mode == "running"
    assert MultimodalFeatures(running, random_init=True, modality="xyz", bn_mode="sample").config.bn_mode == "sample"
    assert MultimodalFeatures("tiny", random_init=True, modality="xyz").config.bn_mode == "sample"


def test_bn_modes_differ_and_are_in_the_fingerprint(tiny_extractor: MultimodalFeatures, tiny_batch):
    running = MultimodalFeatures("tiny", random_init=True, bn_mode="running", modality="xyz")
    assert running.fingerprint("xyz") != tiny_extractor.fingerprint("xyz")
    assert not torch.equal(running.get_features_maps(None, tiny_batch.xyz)[1],
                           tiny_extractor.get_features_maps(None, tiny_batch.xyz)[1])


def test_single_modality_builds_one_backbone(tiny_batch):
    rgb_only = MultimodalFeatures("tiny", random_init=True, modality="rgb")
    assert rgb_only.xyz_backbone is None
    f2d, f3d = rgb_only.get_features_maps(tiny_batch.rgb, tiny_batch.xyz)
    assert f2d is not None and f3d is None


def test_too_few_valid_points(tiny_extractor: MultimodalFeatures):
    cloud = torch.zeros(1, 3, TINY.img_size, TINY.img_size)
    with pytest.raises(ValueError, match="0 valid points, fewer than the 64"):
        tiny_extractor.extract_xyz_parts(cloud)
    cloud.view(3, -1)[:, :40] = torch.rand(3, 40) + 0.1
    with pytest.raises(ValueError, match="40 valid points"):
        tiny_extractor.extract_xyz_parts(cloud)


def test_wrong_input_shape(tiny_extractor: MultimodalFeatures):
    with pytest.raises(ValueError, match=r"rgb must have shape \(B, 3, 64, 64\)"):
        tiny_extractor.extract_rgb_parts(torch.zeros(1, 3, 32, 32))


def test_unknown_preset_and_modality():
    with pytest.raises(ValueError, match="unknown preset"):
        MultimodalFeatures("huge", random_init=True)
    with pytest.raises(ValueError, match="modality"):
        MultimodalFeatures("tiny", random_init=True, modality="depth")


def test_preset_sizes_are_consistent():
    for config in PRESETS.values():
        if isinstance(config.rgb, ViTConfig):
            assert config.img_size % config.rgb.patch_size == 0
        assert (config.grid_size**2) % 32 == 0, "Decoder3D needs G² divisible by 32"
    lite = PRESETS["lite"]
    assert (lite.img_size, lite.grid_size, lite.rgb_dim, lite.xyz_dim) == (224, 56, 152, 152)
    lite_448 = PRESETS["lite_448"]  # the input doubled, the grid and the widths kept
    assert (lite_448.img_size, lite_448.grid_size, lite_448.rgb_dim, lite_448.xyz_dim) == (448, 56, 152, 152)
    lite_curvature = PRESETS["lite_curvature"]  # two geometry images through the same CNN: F3D twice as wide
    assert (lite_curvature.img_size, lite_curvature.grid_size, lite_curvature.rgb_dim, lite_curvature.xyz_dim) == (
        224, 56, 152, 304)
    lite_fpfh = PRESETS["lite_fpfh"]
    assert (lite_fpfh.img_size, lite_fpfh.grid_size, lite_fpfh.rgb_dim, lite_fpfh.xyz_dim) == (224, 56, 152, 33)
    paper = PRESETS["paper"]
    assert (paper.img_size, paper.rgb_dim, paper.xyz_dim) == (224, 768, 1152)
    assert dataclasses.replace(paper.xyz).num_group == 1024 and paper.xyz.group_size == 128


def test_foreground_mask_is_the_support_of_f3d(tiny_extractor: MultimodalFeatures, tiny_batch):
    _, f3d = tiny_extractor.get_features_maps(None, tiny_batch.xyz)
    assert torch.equal(foreground_mask(tiny_batch.xyz), (f3d != 0).any(dim=-1))


def test_random_point_mae_uses_its_own_initialisation():
    encoder = PointMAEEncoder(TINY.xyz)
    weight = encoder.blocks.blocks[0].attn.qkv.weight
    assert 0.015 < weight.std() < 0.025  # trunc_normal(std=0.02), not the much wider PyTorch default
    assert torch.all(encoder.encoder.first_conv[0].bias == 0)


@pytest.mark.parametrize("preset", ["lite", "lite_fpfh"])
def test_lite_foreground_mask_is_the_support_of_f3d_on_its_grid(synthetic_root, preset: str):
    """The 2D-only model's valid pixels on the lite presets' 56² grid are those where F3D (geometry images, FPFH)
    is non-zero."""
    extractor = MultimodalFeatures(preset, modality="xyz")
    dataset = open_split(extractor, synthetic_root, "dome", "test", "xyz")
    batch = collate_samples([dataset[0], dataset[1]])
    _, f3d = extractor.get_features_maps(None, batch.xyz)
    mask = foreground_mask(batch.xyz, extractor.grid_size)
    assert mask.shape == (2, 56 * 56) and mask.any()
    assert torch.equal(mask, (f3d != 0).any(dim=-1))


def test_lite_branches_side_by_side_give_the_sequential_maps(synthetic_root):
    """lite_fpfh computes FPFH in a side thread while the RGB backbone runs: the maps are those of one after the
    other."""
    extractor = MultimodalFeatures("lite_fpfh")
    dataset = open_split(extractor, synthetic_root, "dome", "test", "rgbxyz")
    batch = collate_samples([dataset[0], dataset[1]])
    with torch.no_grad():
        f2d, f3d = extractor.get_features_maps(batch.rgb, batch.xyz)
        assert torch.equal(f2d, extractor.rgb_maps(extractor.extract_rgb_parts(batch.rgb)))
        assert torch.equal(f3d, extractor.xyz_maps(extractor.extract_xyz_parts(batch.xyz)))


class _Pickled:  # an arbitrary Python object inside a checkpoint: unpickling it may run code
    def __init__(self) -> None:
        self.note = "not a tensor"


def test_pickled_objects_load_only_when_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "pickled.pth"
    torch.save({"weight": torch.ones(2), "extra": _Pickled()}, path)
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    with pytest.raises(WeightsError, match=f"{path}.*{TRUST_PICKLE_ENV}=1"):
        read_checkpoint(path)
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    assert torch.equal(read_checkpoint(path)["weight"], torch.ones(2))
    monkeypatch.delenv(TRUST_PICKLE_ENV)
    assert read_checkpoint(path, trust_pickle=True)["extra"].note == "not a tensor"
    torch.save({"weight": torch.ones(2)}, path)
    assert torch.equal(read_checkpoint(path)["weight"], torch.ones(2)), "tensors alone need no opt-in"
