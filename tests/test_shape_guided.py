"""Shape-Guided's pieces against plain re-computations of ../shared/spec/peers.md: patches, covered cells, the
expert's structure, initialisation and checkpoint names, Neural-Pull queries and projection, the alignment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from networks.features import PRESETS
from networks.methods.registry import build_detector
from networks.methods.shape_guided import (
    EXPERTS, SG_PRESETS, ShapeGuided, SDFExpert, convert_shape_guided_checkpoint, covered_cells, cut_patches,
    load_expert_checkpoint, neural_pull_queries,
)


def test_patches_follow_the_definition():
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.uniform([0, 0, 0.5], [2, 1, 0.7], size=(1234, 3))).float()
    patches, groups = cut_patches(points, group_mul=10, size=100)
    assert patches.shape == (round(1234 * 10 / 100), 100, 3) == (123, 100, 3)
    # plain re-computation: normalise the cloud, FPS from index 0, the 100 nearest points of each centre
    cloud = points.double().numpy()
    cloud = (cloud - cloud.min(0)) / (cloud[:, 0].max() - cloud[:, 0].min())
    chosen, distance = [0], np.linalg.norm(cloud - cloud[0], axis=1)
    while len(chosen) < 123:
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(cloud - cloud[chosen[-1]], axis=1))
    for g in (0, 57, 122):
        nearest = np.argsort(np.linalg.norm(cloud - cloud[chosen[g]], axis=1), kind="stable")[:100]
        assert set(groups[g].tolist()) == set(nearest.tolist())
        patch = cloud[groups[g].numpy()] - cloud[groups[g].numpy()].mean(0)
        patch /= (patch.max(0) - patch.min(0)).max()
        assert np.allclose(patches[g].numpy(), patch, atol=1e-6)
    with pytest.raises(ValueError, match="too few valid points"):
        cut_patches(points[:99], size=100)


def test_covered_cells_dilate_without_wrapping():
    img, grid = 224, 28
    pixels = torch.tensor([0 * img + 0, 9 * img + 223])  # cells (0, 0) and (1, 27)
    expected = set()
    for row, col in ((0, 0), (1, 27)):
        for dr, dc in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)):
            if 0 <= row + dr < grid and 0 <= col + dc < grid:
                expected.add((row + dr) * grid + col + dc)
    assert set(covered_cells(pixels, img, grid).tolist()) == expected
    assert 29 not in expected and 27 + 2 not in covered_cells(pixels, img, grid).tolist()  # no row wrap


def reference_key_names(layers: int = 7) -> set[str]:
    """The parameter and buffer names of the authors' SDF_Model (encoder_BN + local_NIF, old weight norm)."""
    names = {f"encoder.{layer}.{p}" for layer in ("conv1", "conv2", "conv3", "fc1", "fc2") for p in ("weight", "bias")}
    names |= {f"encoder.bn{i}.{p}" for i in range(1, 6)
              for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    names |= {f"NIF.{layer}.{p}" for layer in ("fc1", "fc2", "fc3", "fc5") for p in ("weight", "bias")}
    names |= {f"NIF.fc4{i}.{p}" for i in range(layers) for p in ("weight_g", "weight_v", "bias")}
    return names


def test_the_authors_checkpoint_names_load(tmp_path):
    torch.manual_seed(0)
    source = SDFExpert(EXPERTS["paper"]).eval()
    state = {k.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v"): v for k, v in source.state_dict().items()}
    assert set(state) == reference_key_names(), "the paper expert has the reference's structure"
    path = tmp_path / "ckpt_000601.pth"
    torch.save({"sdf_model": state, "epoch": 601}, path)
    loaded = SDFExpert(EXPERTS["paper"]).eval()
    load_expert_checkpoint(loaded, path)
    patches, queries = torch.rand(2, 50, 3), torch.rand(2, 50, 3)
    with torch.no_grad():
        assert torch.equal(source.sdf(source.encoder(patches), queries), loaded.sdf(loaded.encoder(patches), queries))
    assert set(convert_shape_guided_checkpoint({"sdf_model": state})) == set(source.state_dict())
    with pytest.raises(Exception, match="ckpt_000601"):
        load_expert_checkpoint(SDFExpert(EXPERTS["lite"]), path)  # another size: a clear error naming the file


def test_geometric_initialisation():
    torch.manual_seed(0)
    decoder = SDFExpert(EXPERTS["paper"]).NIF
    assert decoder.fc5.bias.item() == -0.5
    assert decoder.fc5.weight.mean().item() == pytest.approx(2 * math.sqrt(math.pi) / math.sqrt(512), rel=1e-4)
    assert decoder.fc3.weight.std().item() == pytest.approx(math.sqrt(2) / math.sqrt(512), rel=0.02)
    assert (decoder.fc40.bias == 0).all()


def test_neural_pull_queries_and_projection():
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand(3, 120, 3, generator=generator)
    queries, targets = neural_pull_queries(patches, generator)
    for b in range(3):  # targets are the nearest patch points (brute force)
        distance = ((queries[b, :, None] - patches[b, None]) ** 2).sum(-1)
        assert torch.equal(targets[b], patches[b][distance.argmin(1)])
    # noise scale: σ·s with σ = distance to the 51st nearest point (itself first), s 0.5 for 62.5 % of points
    offsets = (queries - patches).norm(dim=-1)
    sigma = torch.cdist(patches, patches).sort(dim=-1).values[..., 50]
    ratio = (offsets / sigma).flatten()
    assert 0.3 < ratio.median() < 1.5 and ratio.max() < 6
    expert = SDFExpert(EXPERTS["lite"]).eval()
    codes = torch.randn(3, 128)
    pulled = expert.pull(codes, queries.clone())
    q = queries.clone().requires_grad_(True)  # plain re-computation of q − f(q)·∇f/‖∇f‖
    distance = expert.sdf(codes, q)
    gradient = torch.autograd.grad(distance.sum(), q)[0]
    expected = q - distance[..., None] * gradient / gradient.norm(dim=-1, keepdim=True)
    assert torch.allclose(pulled, expected, atol=1e-5)


def test_expert_size_follows_the_preset_and_options():
    assert build_detector("shape_guided", SG_PRESETS["paper"]).expert_size == "paper"
    assert build_detector("shape_guided", SG_PRESETS["lite"]).expert_size == "lite"
    assert build_detector("shape_guided", PRESETS["tiny"], expert="paper").expert_size == "paper"
    model = ShapeGuided(SG_PRESETS["lite"], expert_steps=7)
    assert model.options() == {"expert": "lite", "expert_steps": 7, "expert_source": "trained", "blur": "exact"}
    assert SG_PRESETS["paper"].rgb_dim == 768 and SG_PRESETS["paper"].grid_size == 28


def test_sdf_checkpoint_flag_is_the_model_option():
    import argparse
    from pathlib import Path

    from utils.runs.pipeline import RunConfig, add_run_arguments, parse_run_args

    parser = argparse.ArgumentParser()
    add_run_arguments(parser, training=True)
    args = parse_run_args(parser, ["--dataset_path", "d", "--model", "shape_guided", "--sdf_checkpoint", "x.pth"])
    assert RunConfig.from_args(args).model_options == {"sdf_checkpoint": Path("x.pth")}
    with pytest.raises(SystemExit):  # cmdr has no such option: a usage error
        parse_run_args(parser, ["--dataset_path", "d", "--sdf_checkpoint", "x.pth"])
