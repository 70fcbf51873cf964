"""M3DM (networks/methods/m3dm.py) against plain float64 re-computations of ../shared/spec/peers.md ("M3DM"): the banks'
standardisation, nearest-neighbour scores, re-weighting and maps; the Decision Layer Fusion against
scikit-learn's SGDOneClassSVM directly; the coreset sizes; the UFF's loss, key names, scrambled pairs and its
resumable training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import SGDOneClassSVM

from networks.extractors.point_mae import WeightsError
from networks.methods.m3dm import (
    M3DM, M3DM_PRESETS, FeatureFusionBlock, load_uff_checkpoint, native_rgb, scrambled_rgb_index,
    uff_cosine_schedule, uff_training_pairs,
)
from networks.methods.registry import build_detector, extractor_config, parse_model_options

TINY = M3DM_PRESETS["tiny"]  # 64² inputs, 16² grid, 8² RGB tokens


def tiny_features(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F2D replicated 2 × 2 from 8² tokens (as the nearest upsampling makes it), F3D with some zero rows."""
    generator = torch.Generator().manual_seed(seed)
    grid, tokens = TINY.grid_size, TINY.grid_size // 2
    native = torch.randn(samples, TINY.rgb_dim, tokens, tokens, generator=generator) * 2 + 1
    f2d = F.interpolate(native, size=(grid, grid), mode="nearest").flatten(2).transpose(1, 2)
    f3d = torch.randn(samples, grid * grid, TINY.xyz_dim, generator=generator) + 0.5
    mask = torch.rand(samples, grid * grid, generator=generator) > 0.1
    return f2d, f3d * mask[..., None], mask


def brute_scores(patches: np.ndarray, bank: np.ndarray, divisor: float) -> tuple[np.ndarray, float]:
    """Patch distances to the nearest bank row and the re-weighted image score, by plain loops in float64."""
    distances = np.array([min(np.linalg.norm(p - b) for b in bank) for p in patches])
    worst = int(np.argmax(distances))
    nearest = min(range(len(bank)), key=lambda j: np.linalg.norm(patches[worst] - bank[j]))
    around = sorted(range(len(bank)), key=lambda j: np.linalg.norm(bank[nearest] - bank[j]))[1:3]
    root = math.sqrt(patches.shape[1])
    s = distances[worst] / divisor
    weight = 1 - math.exp(s / root) / sum(math.exp(np.linalg.norm(patches[worst] - bank[j]) / divisor / root)
                                          for j in around)
    return distances, weight * s


def reference_map(distances: np.ndarray, grid: int) -> np.ndarray:
    """Bilinear (align_corners=False) to 64², then scipy's Gaussian (σ 4, truncate 4, edges extended)."""
    upsampled = F.interpolate(torch.from_numpy(distances).reshape(1, 1, grid, grid), size=(64, 64),
                              mode="bilinear", align_corners=False)[0, 0].numpy()
    return gaussian_filter(upsampled, sigma=4, mode="nearest", truncate=4)


def test_two_bank_scores_and_maps_against_float64_loops():
    model = M3DM(TINY, "rgbxyz", coreset=1.0).eval()
    f2d, f3d, mask = tiny_features(3, seed=0)
    with torch.no_grad():
        model.fit([(f2d, f3d, mask, None)])
    xyz = f3d.double().numpy()
    rgb = native_rgb(f2d, TINY.grid_size).double().numpy()
    mean, std = xyz.mean(), rgb.std(ddof=1)  # the point bank's mean, the RGB bank's std: for every bank
    assert float(model.xyz_bank.mean) == pytest.approx(mean, rel=1e-6)
    assert float(model.rgb_bank.std) == pytest.approx(std, rel=1e-6)
    rows = ((xyz - mean) / std).reshape(-1, xyz.shape[-1])
    xyz_bank = np.concatenate([rows[(rows != 0).all(axis=1)], np.zeros((1, rows.shape[1]))])
    rgb_bank = ((rgb - mean) / std).reshape(-1, rgb.shape[-1])
    np.testing.assert_allclose(model.xyz_bank.features.numpy(), xyz_bank, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.rgb_bank.features.numpy(), rgb_bank, rtol=1e-5, atol=1e-5)
    t2d, t3d, _ = tiny_features(2, seed=1)
    with torch.no_grad():
        banks = model._bank_scores(model.raw_patches(t2d, t3d))
    test_rgb = native_rgb(t2d, TINY.grid_size).double().numpy()
    for i in range(2):  # two banks: distances divided by 1000 before the re-weighting
        d_xyz, s_xyz = brute_scores((t3d[i].double().numpy() - mean) / std, xyz_bank, 1000)
        d_rgb, s_rgb = brute_scores((test_rgb[i] - mean) / std, rgb_bank, 1000)
        assert float(banks["xyz"].image[i]) == pytest.approx(s_xyz, rel=1e-5)
        assert float(banks["rgb"].image[i]) == pytest.approx(s_rgb, rel=1e-5)
        # torch.cdist's matrix-product path (the reference's too) puts the distance of identical rows — the
        # empty cells, zero in both — at up to ≈5e-3 instead of 0: the maps agree to that
        np.testing.assert_allclose(banks["xyz"].maps[i].numpy(), reference_map(d_xyz, 16), rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(banks["rgb"].maps[i].numpy(), reference_map(d_rgb, 8), rtol=1e-4, atol=1e-5)


def test_decision_layer_fusion_is_scikit_learns_one_class_svms():
    """D_a and D_s: SGDOneClassSVM(nu 0.5, 1000 iterations, seed 42) fitted on the in-sample training scores
    [s_xyz, 0.1 s_rgb] and the pixels [map_xyz, 0.1 map_rgb]; the final score and map are its score_samples."""
    model = M3DM(TINY, "rgbxyz", coreset=0.5).eval()
    f2d, f3d, mask = tiny_features(3, seed=0)
    with torch.no_grad():
        model.fit([(f2d, f3d, mask, None)])

    def inputs(g2d: torch.Tensor, g3d: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            banks = model._bank_scores(model.raw_patches(g2d, g3d))
        image = np.stack([banks["xyz"].image.double().numpy(), 0.1 * banks["rgb"].image.double().numpy()], 1)
        pixels = np.stack([banks["xyz"].maps.double().numpy(), 0.1 * banks["rgb"].maps.double().numpy()], -1)
        return image, pixels

    train = [inputs(f2d[i : i + 1], f3d[i : i + 1]) for i in range(3)]
    image_svm = SGDOneClassSVM(nu=0.5, max_iter=1000, random_state=42).fit(np.concatenate([t[0] for t in train]))
    pixel_svm = SGDOneClassSVM(nu=0.5, max_iter=1000, random_state=42).fit(
        np.concatenate([t[1].reshape(-1, 2) for t in train]))
    np.testing.assert_allclose(model.dlf.image_coef.numpy(), image_svm.coef_, rtol=1e-6)
    np.testing.assert_allclose(model.dlf.pixel_coef.numpy(), pixel_svm.coef_, rtol=1e-6)
    t2d, t3d, tmask = tiny_features(2, seed=1)
    image, pixels = inputs(t2d, t3d)
    with torch.no_grad():
        prediction = model.predict(t2d, t3d, tmask)
    np.testing.assert_allclose(prediction.image_scores.numpy(), image_svm.score_samples(image), rtol=1e-5)
    np.testing.assert_allclose(prediction.maps.numpy(), pixel_svm.score_samples(pixels.reshape(-1, 2))
                               .reshape(2, 64, 64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("modality", ["rgb", "xyz"])
def test_single_bank_modes_score_as_their_bank(modality: str):
    """RGB alone: standardised by its own mean and std; points alone: not standardised; no DLF, divisor 1."""
    model = M3DM(TINY, modality, coreset=1.0).eval()
    f2d, f3d, mask = tiny_features(2, seed=2)
    inputs = (f2d, None) if modality == "rgb" else (None, f3d)
    with torch.no_grad():
        model.fit([(*inputs, mask, None)])
    raw = (native_rgb(f2d, TINY.grid_size) if modality == "rgb" else f3d).double().numpy()
    mean, std = (raw.mean(), raw.std(ddof=1)) if modality == "rgb" else (0.0, 1.0)
    bank = ((raw - mean) / std).reshape(-1, raw.shape[-1])
    assert model.dlf is None and model.divisor == 1.0
    t2d, t3d, tmask = tiny_features(1, seed=3)
    test = (native_rgb(t2d, TINY.grid_size) if modality == "rgb" else t3d).double().numpy()[0]
    with torch.no_grad():
        prediction = model.predict(t2d if modality == "rgb" else None, t3d if modality == "xyz" else None, tmask)
    distances, score = brute_scores((test - mean) / std, bank, 1.0)
    assert float(prediction.image_scores[0]) == pytest.approx(score, rel=1e-5)
    grid = 8 if modality == "rgb" else 16
    np.testing.assert_allclose(prediction.maps[0].numpy(), reference_map(distances, grid), rtol=1e-4, atol=1e-5)


def test_coreset_sizes_chain_from_the_point_coreset_unless_per_bank():
    f2d, f3d, mask = tiny_features(4, seed=4)  # 4 × 256 point patches, 4 × 64 RGB tokens
    for sizes, rgb_rows in (("reference", int(0.1 * int(0.1 * 1024))), ("per_bank", int(0.1 * 256))):
        model = M3DM(TINY, "rgbxyz", coreset=0.1, coreset_sizes=sizes)
        with torch.no_grad():
            statistics = model.fit([(f2d, f3d, mask, None)])
        assert statistics["rgb_bank_size"] == rgb_rows
        assert statistics["xyz_bank_size"] == int(0.1 * 1024) + 1  # + the reference's appended zero row


def test_per_bank_normalization_and_add_decision():
    f2d, f3d, mask = tiny_features(2, seed=5)
    model = M3DM(TINY, "rgbxyz", coreset=1.0, normalization="per_bank", decision="add").eval()
    with torch.no_grad():
        model.fit([(f2d, f3d, mask, None)])
        banks = model._bank_scores(model.raw_patches(f2d, f3d))
        prediction = model.predict(f2d, f3d, mask)
    assert float(model.rgb_bank.mean) == pytest.approx(float(native_rgb(f2d, 16).double().mean()), rel=1e-5)
    assert float(model.xyz_bank.std) == pytest.approx(float(f3d.double().std()), rel=1e-5)
    assert model.dlf is None
    torch.testing.assert_close(prediction.image_scores, banks["xyz"].image + banks["rgb"].image)
    torch.testing.assert_close(prediction.maps, banks["xyz"].maps + banks["rgb"].maps)


def test_presets_options_and_refusals():
    assert extractor_config("lite", "m3dm") is M3DM_PRESETS["lite"]
    assert M3DM_PRESETS["paper"].grid_size == 56 and M3DM_PRESETS["paper"].rgb_upsampling == "nearest"
    # the DLF's RGB score weight: the reference's 0.1 on DINO, 1 on the CNN presets; the map weight 0.1 on both
    paper, lite = M3DM(M3DM_PRESETS["paper"]).options(), M3DM(M3DM_PRESETS["lite"]).options()
    assert (paper["rgb_s_lambda"], lite["rgb_s_lambda"]) == (0.1, 1.0)
    assert paper["rgb_smap_lambda"] == lite["rgb_smap_lambda"] == 0.1
    assert parse_model_options("m3dm", ["rgb_s_lambda=1", "decision=add"]) == {"rgb_s_lambda": 1.0, "decision": "add"}
    with pytest.raises(ValueError, match="M3DM_PRESETS"):
        build_detector("m3dm", extractor_config("lite", "cmdr"))
    with pytest.raises(ValueError, match="rgbxyz"):
        M3DM(TINY, "rgb", uff="uff.pth")


def test_scrambled_pairs_are_the_reference_dump_and_almost_never_aligned():
    index = scrambled_rgb_index(56 * 56, 28 * 28)
    rows, cols = np.divmod(np.arange(56 * 56), 56)
    aligned = (rows // 2) * 28 + cols // 2  # the token over the same place
    assert round(100 * float(np.mean(index.numpy() == aligned)), 2) == 0.26  # spec: 0.26 % of positions
    assert sorted(np.bincount(index.numpy(), minlength=784)) == [4] * 784  # every token used 4 times
    f2d, f3d, _ = tiny_features(1, seed=6)
    xyz, rgb = uff_training_pairs(f3d, f2d, 16, "aligned")
    assert rgb is f2d and xyz is f3d
    _, scrambled = uff_training_pairs(f3d, f2d, 16, "scrambled")
    torch.testing.assert_close(scrambled[0, 5], native_rgb(f2d, 16)[0, int(scrambled_rgb_index(256, 64)[5])])


def test_uff_loss_against_a_plain_loop_and_reference_key_names(tmp_path):
    torch.manual_seed(0)
    block = FeatureFusionBlock(12, 8)
    assert set(block.state_dict()) == {
        f"{m}_{part}.{p}" for m in ("xyz", "rgb") for part, ps in
        (("norm", ("weight", "bias")), ("mlp", ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
         ("head", ("weight", "bias"))) for p in ps}
    xyz, rgb = torch.randn(2, 10, 12), torch.randn(2, 10, 8)
    xyz[0, 3, 5] = 0  # a patch with one zero entry is background
    loss = block.contrastive_loss(xyz, rgb)
    keep = [(b, p) for b in range(2) for p in range(10) if (xyz[b, p] != 0).all()]
    with torch.no_grad():
        q = [F.normalize(block.rgb_head(block.rgb_mlp(block.rgb_norm(rgb[b, p]))), dim=0).double() for b, p in keep]
        k = [F.normalize(block.xyz_head(block.xyz_mlp(block.xyz_norm(xyz[b, p]))), dim=0).double() for b, p in keep]
    expected = np.mean([-(q[i] @ k[i]).item() + math.log(sum(math.exp((q[i] @ k[j]).item()) for j in range(len(k))))
                        for i in range(len(q))]) * 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.save({"model": block.state_dict(), "epoch": 3}, tmp_path / "checkpoint-0.pth")
    loaded = FeatureFusionBlock(12, 8)
    load_uff_checkpoint(loaded, tmp_path / "checkpoint-0.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), block.state_dict().values()))
    with pytest.raises(WeightsError, match="wrong shape"):
        load_uff_checkpoint(FeatureFusionBlock(16, 8), tmp_path / "checkpoint-0.pth")


def test_uff_schedule_warms_up_then_follows_a_half_cosine():
    assert uff_cosine_schedule(0, 10, 1, 3) == 0
    assert uff_cosine_schedule(5, 10, 1, 3) == pytest.approx(0.5)
    assert uff_cosine_schedule(10, 10, 1, 3) == pytest.approx(1.0)
    assert uff_cosine_schedule(20, 10, 1, 3) == pytest.approx(0.5)
    assert uff_cosine_schedule(30, 10, 1, 3) == pytest.approx(0.0)


def test_uff_training_over_all_classes_resumes_bit_for_bit(synthetic_root, tmp_path, monkeypatch):
    """scripts/train_uff.py on every class of the synthetic set (tiny preset): interrupted after its first
    epoch and run again, it ends with the weights of an uninterrupted run; the file loads into the method."""
    from scripts import train_uff

    common = ["--dataset_path", str(synthetic_root), "--preset", "tiny", "--random_init", "--device", "cpu",
              "--cache_dir", str(tmp_path / "cache"), "--epochs", "2", "--batch_size", "2", "--accum_iter", "1"]
    assert train_uff.main([*common, "--out", str(tmp_path / "whole.pth")]) == 0

    calls = {"n": 0}
    pairs = train_uff.uff_training_pairs

    def interrupt_in_the_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > batches_per_epoch:
            raise KeyboardInterrupt
        return pairs(*args, **kwargs)

    whole = torch.load(tmp_path / "whole.pth", weights_only=True)
    batches_per_epoch = whole["identity"]["samples"] // 2
    assert whole["identity"]["classes"] == sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())
    monkeypatch.setattr(train_uff, "uff_training_pairs", interrupt_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_uff.main([*common, "--out", str(tmp_path / "resumed.pth")])
    assert (tmp_path / "resumed.pth.resume").is_file() and not (tmp_path / "resumed.pth").exists()
    monkeypatch.setattr(train_uff, "uff_training_pairs", pairs)
    assert train_uff.main([*common, "--out", str(tmp_path / "resumed.pth")]) == 0
    resumed = torch.load(tmp_path / "resumed.pth", weights_only=True)
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert not (tmp_path / "resumed.pth.resume").exists()
    block = FeatureFusionBlock(TINY.xyz_dim, TINY.rgb_dim)
    load_uff_checkpoint(block, tmp_path / "whole.pth")
    with pytest.raises(SystemExit, match="accum_iter"):
        train_uff.main([*common[:-2], "--accum_iter", "1000", "--out", str(tmp_path / "never.pth")])


def test_an_m3dm_run_is_calibrated_predicted_and_reported_like_the_others(synthetic_root, tmp_path):
    """train.py fits m3dm (tiny preset), inference.py scores it (with its report), and the predictor,
    calibrate.py and predict.py (with its overlays) serve the run with the scores of inference."""
    import csv
    import json

    import calibrate
    import inference
    import predict
    import train
    from utils.station.predictor import Predictor

    common = ["--dataset_path", str(synthetic_root), "--model", "m3dm", "--preset", "tiny", "--random_init",
              "--cache_dir", str(tmp_path / "cache"), "--device", "cpu", "--epochs_no", "1", "--batch_size", "2"]
    run = tmp_path / "ckpt"
    assert train.main([*common, "--class_name", "dome", "--checkpoint_savepath", str(run)]) == 0
    assert inference.main([*common, "--class_names", "dome", "--checkpoint_folder", str(run), "--results_dir",
                           str(tmp_path / "results"), "--run_name", "m3dm"]) == 0
    expected = {row["sample"]: float(row["image_score"]) for row in
                csv.DictReader((tmp_path / "results" / "m3dm" / "scores" / "dome.csv").open())}
    assert calibrate.main(["--checkpoint_folder", str(run / "m3dm_rgbxyz_seed115"), "--class_name", "dome",
                           "--dataset_path", str(synthetic_root), "--device", "cpu"]) == 0
    part = synthetic_root / "dome" / "test" / "crack"
    stem = sorted(p.stem for p in (part / "rgb").glob("*.png"))[0]
    predictor = Predictor.load(run / "m3dm_rgbxyz_seed115", "dome", device="cpu")
    result = predictor(rgb=part / "rgb" / f"{stem}.png", xyz=part / "xyz" / f"{stem}.tiff")
    assert result.error is None and result.decision in ("good", "anomalous")
    assert result.score == pytest.approx(expected[f"crack/{stem}"], rel=1e-5)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint_folder", str(run / "m3dm_rgbxyz_seed115"), "--class_name", "dome",
                         "--rgb", str(part / "rgb"), "--xyz", str(part / "xyz"), "--out", str(out),
                         "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == len(list((part / "rgb").iterdir())) and not any(line["error"] for line in lines)
    assert len(list((out / "overlays").glob("*.png"))) == len(lines)
    assert (tmp_path / "results" / "m3dm" / "report.html").is_file()
