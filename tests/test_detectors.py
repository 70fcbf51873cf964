"""Every registered detection method: shapes, gradients, checkpoints, determinism, identity; CFM and MAFR
against plain re-computations of their definitions (../shared/spec/peers.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.blocks.fusion import box_filter
from networks.features import PRESETS
from networks.methods.cfm import CFM
from networks.methods.detector import DETECTORS, MemoryBankDetector
from networks.methods.mafr import MAFR, TokenCBAM, census_loss, smoothness_loss, znssd_loss
from networks.methods.registry import build_detector, detector_names, parse_model_options
from train import make_optimizers
from utils.runs.checkpoints import CheckpointError, load_modules, save_modules

TINY = PRESETS["tiny"]
CASES = [(name, modality) for name in sorted(DETECTORS) for modality in DETECTORS[name].modalities]
TRAINED = [(n, m) for n, m in CASES if not issubclass(DETECTORS[n], MemoryBankDetector)]  # gradient-trained
FITTED = [(n, m) for n, m in CASES if issubclass(DETECTORS[n], MemoryBankDetector)]  # memory-bank methods
QUICK = {"shape_guided": {"expert_steps": 3}, "m3dm": {"coreset": 1.0}}  # short fits; every seen patch kept


def features(config=TINY, batch: int = 2, seed: int = 0):
    """Random features on the grid, a few pixels invalid (zero F3D rows) as in real data."""
    generator = torch.Generator().manual_seed(seed)
    pixels = config.grid_size**2
    f2d = torch.randn(batch, pixels, config.rgb_dim, generator=generator)
    f3d = torch.randn(batch, pixels, config.xyz_dim, generator=generator)
    mask = torch.rand(batch, pixels, generator=generator) > 0.2
    return f2d, f3d * mask[..., None], mask


def inputs(model, f2d, f3d):
    return (f2d if "2d" in model.branches else None), (f3d if "3d" in model.branches else None)


def clouds(config=TINY, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Organized clouds (B, 3, S, S) of smooth random surfaces, every pixel valid (no zero coordinate)."""
    generator = torch.Generator().manual_seed(seed)
    size = config.img_size
    yy, xx = torch.meshgrid(torch.linspace(1, 2, size), torch.linspace(1, 2, size), indexing="ij")
    phase = torch.rand(batch, 1, 1, generator=generator) * 6
    z = 1 + 0.1 * torch.sin(4 * xx + phase) * torch.cos(3 * yy)
    return torch.stack([xx.expand_as(z), yy.expand_as(z), z], dim=1)


def tiny(name: str):
    """The tiny extractors a method runs on: its own (M3DM replicates the RGB tokens 2 × 2) or the shared."""
    return DETECTORS[name].presets.get("tiny", TINY)


def fit(model, seed: int = 5):
    """Fit a memory-bank method on one batch of random features and clouds."""
    f2d, f3d, mask = features(model.config, seed=seed)
    return model.fit([(*inputs(model, f2d, f3d), mask, clouds(seed=seed))])


def test_registry_names_the_flagship_first():
    assert detector_names()[0] == "cmdr" and {"cfm", "mafr"} <= set(detector_names())
    with pytest.raises(ValueError, match="unknown model"):
        build_detector("nope", TINY)


@pytest.mark.parametrize(("name", "modality"), TRAINED)
def test_forward_backward_every_parameter_gets_a_gradient(name: str, modality: str):
    torch.manual_seed(0)
    model = build_detector(name, TINY, modality).train()
    f2d, f3d, mask = features()
    losses = model.losses(*inputs(model, f2d, f3d), mask)
    assert losses and all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    for module_name, module in model.trainable().items():
        for key, parameter in module.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), f"{module_name}.{key}"
            assert parameter.grad.abs().sum() > 0, f"{module_name}.{key} gets no gradient"
    groups = model.optimizer_groups()
    covered = [m for group in groups.values() for m in group.modules]
    with_parameters = [name for name, module in model.trainable().items()
                       if next(module.parameters(), None) is not None]
    assert sorted(covered) == sorted(with_parameters), "every module with parameters in exactly one optimiser group"

    model.eval()
    with torch.no_grad():
        maps = model.distance_maps(*inputs(model, f2d, f3d), mask)
        psi = model.anomaly_map(*inputs(model, f2d, f3d), mask)
    size = TINY.grid_size
    assert all(m.shape == (2, size, size) for m in maps.values())
    assert all((m.reshape(2, -1)[~mask] == 0).all() for m in maps.values()), "distance maps zero where invalid"
    assert psi.shape == (2, TINY.img_size, TINY.img_size) and (psi >= 0).all() and psi.sum() > 0


@pytest.mark.parametrize(("name", "modality"), CASES)
def test_checkpoint_round_trip_and_identity(name: str, modality: str, tmp_path):
    torch.manual_seed(0)
    model = build_detector(name, tiny(name), modality, **QUICK.get(name, {})).eval()
    if isinstance(model, MemoryBankDetector):
        fit(model)
    identity = {"model": name, "modality": modality, "model_options": model.options()}
    save_modules(model.trainable(), tmp_path, "dome", 3, 2, sidecar=identity)
    torch.manual_seed(1)
    loaded = build_detector(name, tiny(name), modality, **QUICK.get(name, {})).eval()
    load_modules(loaded.trainable(), tmp_path, "dome", 3, 2, expected=identity)
    f2d, f3d, mask = features(tiny(name))
    with torch.no_grad():
        first, second = (m.predict(*inputs(m, f2d, f3d), mask, xyz=clouds(seed=1)) for m in (model, loaded))
    assert torch.equal(first.maps, second.maps) and torch.equal(first.image_scores, second.image_scores)
    other = next(n for n in DETECTORS if n != name)
    with pytest.raises(CheckpointError, match=f"model: checkpoint '{name}' vs now '{other}'"):
        load_modules(loaded.trainable(), tmp_path, "dome", 3, 2, expected={**identity, "model": other})


@pytest.mark.parametrize(("name", "modality"), TRAINED)
def test_a_seed_gives_the_same_weights_and_steps(name: str, modality: str):
    def one_step() -> dict[str, torch.Tensor]:
        torch.manual_seed(115)
        model = build_detector(name, TINY, modality).train()
        optimizers = make_optimizers(model)
        f2d, f3d, mask = features()
        sum(model.losses(*inputs(model, f2d, f3d), mask).values()).backward()
        for optimizer in optimizers.values():
            optimizer.step()
        return {f"{m}.{k}": v for m, module in model.trainable().items() for k, v in module.state_dict().items()}

    first, second = one_step(), one_step()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_model_options_are_checked():
    assert parse_model_options("mafr", ["smoothness=all"]) == {"smoothness": "all"}
    with pytest.raises(ValueError, match="reference|all"):
        parse_model_options("mafr", ["smoothness=some"])
    with pytest.raises(ValueError, match="cfm has the options none"):
        parse_model_options("cfm", ["smoothness=all"])


# --- CFM ------------------------------------------------------------------------------------------------------

def test_cfm_structure_and_single_optimizer():
    paper = CFM(PRESETS["paper"])
    linears = [m for m in paper.map2Dto3D.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 960), (960, 960), (960, 1152)]
    assert not [m for m in paper.modules() if isinstance(m, (nn.LayerNorm, nn.Dropout))]
    assert list(paper.optimizer_groups()) == ["cfm"]
    assert paper.optimizer_groups()["cfm"].modules == ("map2Dto3D", "map3Dto2D")


def test_cfm_anomaly_map_is_the_smoothed_product_of_the_cosine_distances():
    torch.manual_seed(0)
    model = CFM(TINY).eval()
    f2d, f3d, mask = features(batch=1)
    with torch.no_grad():
        psi = model.anomaly_map(f2d, f3d, mask)[0].double()
        pred3d, pred2d = model.map2Dto3D(f2d)[0].double(), model.map3Dto2D(f3d)[0].double()
    f2d, f3d, mask = f2d[0].double(), f3d[0].double(), mask[0]
    product = torch.zeros(f2d.shape[0], dtype=torch.float64)
    for p in range(f2d.shape[0]):  # per pixel, by the definition
        if mask[p]:
            d3 = (pred3d[p] / max(pred3d[p].norm(), 1e-12) - f3d[p] / max(f3d[p].norm(), 1e-12)).norm()
            d2 = (pred2d[p] / max(pred2d[p].norm(), 1e-12) - f2d[p] / max(f2d[p].norm(), 1e-12)).norm()
            product[p] = d2 * d3
    size = TINY.grid_size
    expected = box_filter(box_filter(product.reshape(size, size), 5, 5), 7, 3)
    torch.testing.assert_close(psi, expected, rtol=1e-5, atol=1e-6)


# --- MAFR -----------------------------------------------------------------------------------------------------

def test_mafr_parameter_counts_at_paper_size():
    model = MAFR(PRESETS["paper"])
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.trainable().items()}
    assert round(counts["encoder"] / 1e6, 2) == 3.69
    assert round(counts["decoder2d"] / 1e6, 2) == 3.32
    assert round(counts["decoder3d"] / 1e6, 2) == 6.37


def test_token_cbam_equals_cbam_on_1x1_maps():
    torch.manual_seed(0)
    cbam = TokenCBAM(32)
    x = torch.randn(5, 32)
    image = x[:, :, None, None]  # CBAM as written for maps: pools, a 1×1 "fc", a 7×7 convolution
    fc = cbam.channel_fc

    def channel_fc(v):
        return fc(v.flatten(1))

    channel = torch.sigmoid(channel_fc(F.adaptive_avg_pool2d(image, 1)) + channel_fc(F.adaptive_max_pool2d(image, 1)))
    gated = image * channel[:, :, None, None]
    stats = torch.cat([gated.mean(dim=1, keepdim=True), gated.amax(dim=1, keepdim=True)], dim=1)
    spatial = torch.sigmoid(cbam.spatial(stats))
    expected = (gated * spatial).flatten(1)
    torch.testing.assert_close(cbam(x), expected)


def _znorm(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / math.sqrt(((v - v.mean()) ** 2).mean() + 1e-8)


def test_mafr_losses_against_plain_loops():
    rng = np.random.default_rng(0)
    batch, channels, size = 2, 5, 6
    restored, target = rng.normal(size=(2, batch, channels, size, size))
    # ZNSSD over the pixels' channel vectors
    total, count = 0.0, 0
    for b in range(batch):
        for y in range(size):
            for x in range(size):
                diff = _znorm(restored[b, :, y, x]) - _znorm(target[b, :, y, x])
                total, count = total + (diff**2).sum(), count + channels
    as_tokens = [torch.from_numpy(a).flatten(2).transpose(1, 2) for a in (restored, target)]
    assert znssd_loss(*as_tokens).item() == pytest.approx(total / count, rel=1e-10)

    def smoothness(n_channels: int) -> float:
        residual, image = restored - target, target.mean(axis=1)
        sx, sy = [], []
        for b in range(batch):
            for c in range(n_channels):
                for y in range(size - 1):
                    for x in range(size - 1):
                        sx.append(abs(residual[b, c, y, x + 1] - residual[b, c, y, x])
                                  * math.exp(-abs(image[b, y, x + 1] - image[b, y, x])))
                        sy.append(abs(residual[b, c, y + 1, x] - residual[b, c, y, x])
                                  * math.exp(-abs(image[b, y + 1, x] - image[b, y, x])))
        return float(np.mean(sx) + np.mean(sy))

    grids = [torch.from_numpy(a) for a in (restored, target)]
    assert smoothness_loss(*grids, channels=2).item() == pytest.approx(smoothness(2), rel=1e-10)
    assert smoothness_loss(*grids, channels=None).item() == pytest.approx(smoothness(channels), rel=1e-10)

    padded = [np.pad(a, ((0, 0), (0, 0), (3, 3), (3, 3))) for a in (restored, target)]
    census = [abs(padded[1][b, c, y:y + 7, x:x + 7].mean() - padded[0][b, c, y:y + 7, x:x + 7].mean())
              for b in range(batch) for c in range(channels) for y in range(size) for x in range(size)]
    assert census_loss(*grids).item() == pytest.approx(float(np.mean(census)), rel=1e-10)


@pytest.mark.parametrize("smoothness", ["reference", "all"])
def test_mafr_training_losses_and_map(smoothness: str):
    torch.manual_seed(0)
    model = MAFR(TINY, smoothness=smoothness).eval()
    f2d, f3d, mask = features(batch=1)
    losses = model.losses(f2d, f3d, mask)
    assert sorted(losses) == sorted(f"{kind}{b}" for kind in ("znssd", "smoothness", "census") for b in ("2d", "3d"))
    size = TINY.grid_size
    with torch.no_grad():
        restored2d, restored3d = model.restore(f2d, f3d)
        grid = restored3d.transpose(1, 2).reshape(1, -1, size, size), f3d.transpose(1, 2).reshape(1, -1, size, size)
        channels = 2 if smoothness == "reference" else None
        assert losses["smoothness3d"].item() == pytest.approx(smoothness_loss(*grid, channels).item())
        r2 = (restored2d - f2d).norm(dim=-1) * mask
        r3 = (restored3d - f3d).norm(dim=-1) * mask
        expected = box_filter(box_filter((r2 * r3).reshape(1, size, size), 5, 5), 7, 3)
        torch.testing.assert_close(model.anomaly_map(f2d, f3d, mask), expected)
    assert model.options() == {"smoothness": smoothness}


@pytest.mark.parametrize(("name", "modality"), FITTED)
def test_memory_bank_method_fits_and_predicts(name: str, modality: str):
    model = build_detector(name, tiny(name), modality, **QUICK.get(name, {})).eval()
    assert model.optimizer_groups() == {}
    with pytest.raises(TypeError, match="fitted"):
        model.losses(*features(model.config))
    f2d, f3d, mask = features(model.config, seed=5)
    statistics = fit(model)
    assert statistics["bank_megabytes"] > 0
    with torch.no_grad():
        prediction = model.predict(*inputs(model, f2d, f3d), mask, xyz=clouds(seed=5))
        other = model.predict(*inputs(model, *features(model.config, seed=6)[:2]), mask, xyz=clouds(seed=6))
    size = TINY.img_size
    assert prediction.maps.shape == prediction.pixel_scores.shape == (2, size, size)
    assert prediction.image_scores.shape == (2,) and torch.isfinite(prediction.image_scores).all()
    assert (other.image_scores > prediction.image_scores.max()).all(), "unseen features score above seen ones"
