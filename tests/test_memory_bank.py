"""Memory-bank pieces (coreset, neighbours, re-weighting, blur, bank checkpoints) against brute-force
re-computations, and the CNN stage features BTF and Shape-Guided read (../shared/spec/peers.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from scipy import ndimage
from sklearn.random_projection import SparseRandomProjection

from networks.blocks.memory_bank import (
    MemoryBank, gaussian_blur, greedy_coreset, greedy_k_center, nearest_neighbours, orthogonal_matching_pursuit,
    pil_blur_8bit, reweighted_image_score,
)
from networks.extractors.fpfh import FPFHConfig
from networks.extractors.resnet import ResNetConfig, combine_stages
from networks.features import PRESETS, ExtractorConfig, MultimodalFeatures
from networks.methods.btf import BTF, BTF_PRESETS
from networks.methods.registry import extractor_config, parse_model_options
from utils.runs.checkpoints import load_modules, save_modules


def brute_force_k_center(points: np.ndarray, n: int) -> list[int]:
    """Greedy k-center from index 0 with a plain loop over candidates (float64)."""
    chosen = [0]
    while len(chosen) < n:
        best, best_distance = -1, -1.0
        for candidate in range(len(points)):
            distance = min(math.dist(points[candidate], points[c]) for c in chosen)
            if distance > best_distance:
                best, best_distance = candidate, distance
        chosen.append(best)
    return chosen


def test_greedy_coreset_equals_brute_force_k_center_on_the_projection():
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(300, 2000))).float()  # wide enough for the eps-0.9 projection
    selected = greedy_coreset(features, 0.1, progress=False)
    projected = SparseRandomProjection(eps=0.9, random_state=0).fit_transform(features.numpy())
    assert projected.shape[1] < 2000, "the test must exercise the projection"
    assert selected.tolist() == brute_force_k_center(projected.astype(np.float64), 30)


def test_greedy_coreset_without_projection_and_edge_cases():
    rng = np.random.default_rng(1)
    points = torch.from_numpy(rng.normal(size=(120, 5))).float()  # 5-d: the projection cannot reduce it
    assert greedy_coreset(points, 0.25, progress=False).tolist() == brute_force_k_center(points.double().numpy(), 30)
    assert greedy_coreset(points, 1.0).tolist() == list(range(120))
    assert greedy_coreset(points, 1e-6, progress=False).tolist() == [0]


def one_pass_per_centre_k_center(points: torch.Tensor, n: int) -> list[int]:
    """Greedy k-center as it was computed before the rounds: every point's distance updated by every new centre
    (float64, first index on a tie)."""
    x = points.double()
    current = ((x - x[0]) ** 2).sum(dim=1)
    chosen = [0]
    while len(chosen) < n:
        chosen.append(int(torch.argmax(current)))
        current = torch.minimum(current, ((x - x[chosen[-1]]) ** 2).sum(dim=1))
    return chosen


@pytest.mark.parametrize("candidates", [4, 64, 512])
def test_k_center_in_rounds_equals_one_pass_per_centre(monkeypatch: pytest.MonkeyPatch, candidates: int):
    """Many rounds (few candidates each), clustered points of several scales, and duplicate rows (a background's
    identical features) that must be chosen at most once, at their first index."""
    monkeypatch.setattr("networks.blocks.memory_bank.ROUND_CANDIDATES", candidates)
    generator = torch.Generator().manual_seed(7)
    centres = torch.randn(40, 12, generator=generator) * 5
    points = centres[torch.randint(0, 40, (3000,), generator=generator)] \
        + torch.randn(3000, 12, generator=generator) * torch.rand(3000, 1, generator=generator)
    points[1000:1800] = points[5]  # 800 duplicates of one row, after its first occurrence
    points[2500:] = 0  # and of the zero row, whose first occurrence comes late
    selected = greedy_k_center(points, 400, progress=False).tolist()
    assert selected == one_pass_per_centre_k_center(points, 400)
    assert len(set(selected)) == 400 and 2500 in selected and not set(selected) & set(range(1000, 1800))


def test_k_center_beyond_the_distinct_rows_adds_the_rest_in_order():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    assert greedy_k_center(points, 3, progress=False).tolist() == [0, 3, 1]
    assert greedy_k_center(points, 5, progress=False).tolist() == [0, 3, 1, 2, 4]


def test_nearest_neighbours_in_chunks_equals_brute_force():
    rng = np.random.default_rng(2)
    queries, bank = (torch.from_numpy(rng.normal(size=s)).float() for s in ((37, 6), (101, 6)))
    distances, indices = nearest_neighbours(queries, bank, k=3, chunk=16)
    full = np.linalg.norm(queries.double().numpy()[:, None] - bank.double().numpy()[None], axis=-1)
    expected = np.argsort(full, axis=1)[:, :3]
    assert np.array_equal(indices.numpy(), expected)
    assert np.allclose(distances.numpy(), np.take_along_axis(full, expected, 1), atol=1e-5)


def test_reweighted_image_score_follows_the_patchcore_formula():
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(50, 8))
    patches = rng.normal(size=(20, 8)) * 1.5
    distances = np.linalg.norm(patches[:, None] - bank[None], axis=-1)
    nearest = distances.argmin(1)
    patch_distances = distances.min(1)
    # plain re-computation: the worst patch, its nearest bank entry m*, m*'s 3 nearest entries without m* itself
    worst = int(np.argmax(patch_distances))
    m_star = bank[nearest[worst]]
    around = np.argsort(np.linalg.norm(bank - m_star, axis=1))[1:3]
    knn = [np.linalg.norm(patches[worst] - bank[b]) for b in around]
    d = math.sqrt(8)
    expected = (1 - math.exp(patch_distances[worst] / d) / sum(math.exp(k / d) for k in knn)) * patch_distances[worst]
    as_tensor = lambda a: torch.from_numpy(a).float()  # noqa: E731
    score = reweighted_image_score(as_tensor(patches), as_tensor(patch_distances), torch.from_numpy(nearest),
                                   as_tensor(bank))
    assert score.item() == pytest.approx(expected, rel=1e-5)


def test_gaussian_blur_equals_scipy_with_extended_edges():
    rng = np.random.default_rng(4)
    maps = rng.random(size=(2, 56, 56))
    blurred = gaussian_blur(torch.from_numpy(maps)).numpy()
    for i in range(2):
        assert np.allclose(blurred[i], ndimage.gaussian_filter(maps[i], sigma=4, mode="nearest", truncate=4.0),
                           atol=1e-12)


def test_pil_8bit_blur_is_the_references_round_trip():
    rng = np.random.default_rng(5)
    heat = torch.from_numpy(rng.random(size=(1, 32, 32)) * 3).float()
    peak = heat.max()
    quantised = Image.fromarray((heat[0] / peak * 255).to(torch.uint8).numpy(), mode="L")
    expected = np.asarray(quantised.filter(ImageFilter.GaussianBlur(4)), dtype=np.float32) / 255 * peak.item()
    assert np.allclose(pil_blur_8bit(heat)[0].numpy(), expected, atol=1e-6)
    assert len(np.unique(pil_blur_8bit(heat).numpy())) <= 256, "8 bits: at most 256 levels"
    assert (pil_blur_8bit(torch.zeros(1, 8, 8)) == 0).all()


def test_memory_bank_checkpoint_keeps_its_data_sized_rows(tmp_path):
    stored = MemoryBank(4)
    stored.fill(torch.arange(12.0).reshape(3, 4))
    save_modules({"bank": stored}, tmp_path, "dome", 1, 2, sidecar={"model": "btf"})
    loaded = MemoryBank(4)
    load_modules({"bank": loaded}, tmp_path, "dome", 1, 2, expected={"model": "btf"})
    assert torch.equal(loaded.features, stored.features)
    with pytest.raises(Exception, match="features"):  # another width is not resized: a clear shape error
        load_modules({"bank": MemoryBank(5)}, tmp_path, "dome", 1, 2, expected={"model": "btf"})


def test_combine_stages_avg3_pools_every_stage_to_the_grid():
    fine, coarse = torch.randn(1, 2, 28, 28), torch.randn(1, 3, 14, 14)
    combined = combine_stages([fine, coarse], "avg3", 28)
    assert combined.shape == (1, 5, 28, 28)
    # AvgPool 3 (no padding) then adaptive pooling, written out for the coarse stage: output cell i averages the
    # input cells floor(i·12/28) .. ceil((i+1)·12/28) − 1
    pooled = F.avg_pool2d(coarse, 3, stride=1)[0].double()
    bins = [range(i * 12 // 28, -(-(i + 1) * 12 // 28)) for i in range(28)]
    expected = torch.tensor([[[float(np.mean([pooled[c, y, x] for y in rows for x in cols])) for cols in bins]
                              for rows in bins] for c in range(3)], dtype=torch.float64)
    assert torch.allclose(combined[0, 2:].double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown stage pooling"):
        combine_stages([fine], "max", 28)


def test_resnet_stage_features_from_a_weights_file(tmp_path):
    """A ResNet weights file (timm/torchvision key names) loads strictly; features come from the asked stages."""
    import timm

    network = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(network.state_dict(), path)
    config = ExtractorConfig(img_size=64, feature_size=8, rgb=ResNetConfig("resnet18", (2, 3)), xyz=FPFHConfig(),
                             stage_pooling="avg3")
    extractor = MultimodalFeatures(config, rgb_weights=path, modality="rgb")
    rgb = torch.randn(1, 3, 64, 64)
    grid = extractor.extract_rgb_parts(rgb)[0]
    assert grid.shape == (128 + 256, 8, 8) == (config.rgb_dim, 8, 8)
    with torch.no_grad():
        stages = timm.create_model("resnet18", features_only=True, out_indices=(2, 3))
        stages.load_state_dict(network.state_dict(), strict=False)
        expected = combine_stages(stages.eval()(rgb), "avg3", 8)[0]
    assert torch.allclose(grid, expected, atol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(Exception, match="bad.pth"):
        MultimodalFeatures(config, rgb_weights=bad, modality="rgb")


def test_btf_presets_and_options():
    assert extractor_config("paper", "btf") is BTF_PRESETS["paper"]
    assert extractor_config("paper", "cmdr") is PRESETS["paper"]
    assert extractor_config("tiny", "btf") is PRESETS["tiny"]
    paper = BTF_PRESETS["paper"]
    assert (paper.grid_size, paper.rgb_dim, paper.xyz_dim) == (28, 1536, 33)
    assert BTF(paper, "rgbxyz").bank.features.shape[1] == 1569
    assert BTF(paper, "xyz").bank.features.shape[1] == 33
    assert parse_model_options("btf", ["coreset=0.25", "blur=pil8bit"]) == {"coreset": 0.25, "blur": "pil8bit"}
    with pytest.raises(ValueError, match="float"):
        parse_model_options("btf", ["coreset=many"])
    with pytest.raises(ValueError, match="fraction"):
        BTF(paper, coreset=0.0)


def test_orthogonal_matching_pursuit_equals_scikit_learn():
    import warnings

    from sklearn.decomposition import sparse_encode

    rng = np.random.default_rng(6)
    # a known 3-sparse code over orthonormal atoms (where OMP must recover it exactly)
    orthonormal = np.stack([np.linalg.qr(rng.normal(size=(16, 10)))[0].T for _ in range(40)])
    truth = np.zeros((40, 10))
    for row in truth:
        row[rng.choice(10, 3, replace=False)] = rng.normal(size=3)
    signals = np.einsum("bk,bkd->bd", truth, orthonormal)
    codes = orthogonal_matching_pursuit(torch.from_numpy(signals), torch.from_numpy(orthonormal), 3).numpy()
    assert np.allclose(codes, truth, atol=1e-10), "recovers the known sparse signal"
    dictionaries = rng.normal(size=(40, 10, 16))
    noisy = signals + 0.3 * rng.normal(size=signals.shape)
    dependent = dictionaries.copy()
    dependent[:20, 1] = 2 * dependent[:20, 0]  # linearly dependent atoms: OMP stops early
    for atoms, x in ((dictionaries, noisy), (dependent, dependent[:, 0] * 3)):
        ours = orthogonal_matching_pursuit(torch.from_numpy(x), torch.from_numpy(atoms), 3).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn warns about the early stop
            expected = np.stack([sparse_encode(x[i : i + 1], atoms[i], algorithm="omp", n_nonzero_coefs=3)[0]
                                 for i in range(len(x))])
        assert np.allclose(ours, expected, atol=1e-10)


def test_btf_paper_preset_runs_from_a_user_weights_file(synthetic_root, tmp_path, offline_without_weights, caplog):
    """BTF at paper size (Wide-ResNet-50-2 layer 2 + 3 + FPFH) from a weights file the user gives, end to end; the
    same command without the file, offline, fails at once naming what is missing and the flag."""
    import json as json_module

    import timm

    import inference
    import train

    weights = tmp_path / "wide_resnet50_2.pth"
    torch.save(timm.create_model("wide_resnet50_2", pretrained=False).state_dict(), weights)
    common = ["--dataset_path", str(synthetic_root), "--model", "btf", "--preset", "paper", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache")]
    assert train.main([*common, "--class_name", "dome", "--rgb_weights", str(weights),
                       "--checkpoint_savepath", str(tmp_path / "ckpt")]) == 0
    sidecar = json_module.loads(next((tmp_path / "ckpt" / "btf_rgbxyz_seed115" / "dome").glob("*.json")).read_text())
    assert sidecar["extractor_config"]["rgb"]["architecture"] == "wide_resnet50_2"
    assert sidecar["extractor"]["rgb_weights"] == str(weights)
    assert inference.main([*common, "--class_names", "dome", "--checkpoint_folder", str(tmp_path / "ckpt"),
                           "--results_dir", str(tmp_path / "r"), "--run_name", "paper"]) == 0  # weights adopted
    assert (tmp_path / "r" / "paper" / "metrics.json").is_file()
    assert train.main([*common, "--class_name", "dome", "--checkpoint_savepath", str(tmp_path / "other")]) == 1
    assert "wide_resnet50_2.racm_in1k" in caplog.text and "--rgb_weights FILE" in caplog.text
