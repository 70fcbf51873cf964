"""Geometry images (networks/extractors/geometry_images.py): normals, curvature and depth against analytic surfaces and
float64 solvers; invariance; masking; the extractor, its fingerprint and its cache entries."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from networks.extractors.efficientnet_lite import EfficientNetLiteConfig
from networks.extractors.geometry_images import (
    GRAZING_COSINE, LINE_RATIO, GeometryImagesConfig, _towards_sensor, depth_above_plane, estimate_normals,
    render_geometry_images, smallest_eigenvector, symmetric_eigenvalues, window_covariance,
)
from networks.features import PRESETS, ExtractorConfig, GridParts, MultimodalFeatures

PCA, CENTRAL = GeometryImagesConfig(normals="pca"), GeometryImagesConfig(normals="central")
SIDE = 40
PITCH = 2e-4  # metres per pixel, as the synthetic scenes
FOCAL = 0.5 / PITCH


def organised(depth: np.ndarray) -> torch.Tensor:
    """A pinhole camera at the origin looking along +z: the (1, 3, S, S) float64 cloud of a depth image."""
    rows, cols = np.mgrid[: depth.shape[0], : depth.shape[1]].astype(float)
    centre = (depth.shape[0] - 1) / 2
    xyz = np.stack([(cols - centre) * depth / FOCAL, (rows - centre) * depth / FOCAL, depth])
    return torch.from_numpy(xyz)[None]


def angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between (…, 3) unit vectors, in degrees."""
    return torch.rad2deg(torch.arccos((a * b).sum(-1).clamp(-1, 1)))


def rays() -> np.ndarray:
    """(3, S, S) viewing rays of the pixels (z = 1)."""
    rows, cols = np.mgrid[:SIDE, :SIDE].astype(float)
    centre = (SIDE - 1) / 2
    return np.stack([(cols - centre) / FOCAL, (rows - centre) / FOCAL, np.ones_like(rows)])


def sphere(radius: float = 0.02, distance: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The visible cap of a sphere centred on the optical axis: its cloud and its exact outward normals."""
    ray = rays()
    ray /= np.linalg.norm(ray, axis=0)
    c = np.array([0.0, 0.0, distance])[:, None, None]
    # the nearer intersection of the ray t · ray with |p − c| = R
    b = (ray * c).sum(0)
    t = b - np.sqrt(b**2 - (distance**2 - radius**2))
    points = t * ray
    return torch.from_numpy(points)[None], torch.from_numpy((points - c) / radius).permute(1, 2, 0)[None]


def cylinder(radius: float = 0.01, distance: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A cylinder along the image rows (axis parallel to y) seen from the side, and its exact outward normals."""
    ray = rays()
    # intersection in the x-z plane: (t·rx)² + (t·rz − d)² = R²
    a = ray[0] ** 2 + ray[2] ** 2
    b = ray[2] * distance
    t = (b - np.sqrt(b**2 - a * (distance**2 - radius**2))) / a
    points = t * ray
    normals = np.stack([points[0], np.zeros_like(t), points[2] - distance]) / radius
    return torch.from_numpy(points)[None], torch.from_numpy(normals).permute(1, 2, 0)[None]


def all_valid(points: torch.Tensor) -> torch.Tensor:
    return torch.ones(points.shape[0], *points.shape[2:], dtype=torch.bool)


# --- the closed-form eigen solution against LAPACK in float64 ---------------------------------------------------


def test_closed_form_eigenproblem_matches_lapack_in_float64():
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(500, 3, 3, generator=generator, dtype=torch.float64)
    spd = random @ random.transpose(1, 2)
    rank2 = random[:, :, :2] @ random[:, :, :2].transpose(1, 2)  # a plane of points: smallest eigenvalue 0
    rank1 = random[:, :, :1] @ random[:, :, :1].transpose(1, 2)
    repeated = torch.diag_embed(torch.tensor([[1e-6, 4e-6, 4e-6], [3.0, 3.0, 5.0]], dtype=torch.float64))
    scaled = spd * 1e-8  # covariances of millimetre neighbourhoods in metres
    # near a repeated eigenvalue the cubic's solution is only √ε-accurate (a collinear neighbourhood, rank1: no
    # normal exists there anyway); elsewhere it is accurate to rounding
    for matrices, accuracy in ((spd, 1e-12), (rank2, 1e-12), (rank1, 1e-7), (repeated, 1e-7), (scaled, 1e-12)):
        expected = torch.linalg.eigvalsh(matrices)
        np.testing.assert_allclose(symmetric_eigenvalues(matrices).numpy(), expected.numpy(), rtol=0,
                                   atol=accuracy * float(expected.abs().max()))
    for matrices in (spd, rank2, scaled, repeated[:1]):  # a simple smallest eigenvalue: a unique direction
        values, vectors = torch.linalg.eigh(matrices)
        ours = smallest_eigenvector(matrices, values[:, 0])
        np.testing.assert_allclose((ours * vectors[..., 0]).sum(-1).abs().numpy(), 1.0, atol=1e-9)


def test_isotropic_matrix_has_no_preferred_direction():
    identity = torch.eye(3, dtype=torch.float64)[None] * 2.0
    assert torch.equal(smallest_eigenvector(identity, symmetric_eigenvalues(identity)[:, 0]), torch.zeros(1, 3,
                                                                                                          dtype=torch.float64))


def test_window_covariance_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(2, 3, 9, 11, generator=generator, dtype=torch.float64) + 0.5
    valid = torch.rand(2, 9, 11, generator=generator) > 0.3
    cov, count = window_covariance(points, valid, 5)
    for b in range(2):
        for r in range(9):
            for c in range(11):
                window = [points[b, :, i, j].numpy() for i in range(r - 2, r + 3) for j in range(c - 2, c + 3)
                          if 0 <= i < 9 and 0 <= j < 11 and valid[b, i, j]]
                assert count[b, r, c] == len(window)
                if window:
                    expected = np.cov(np.array(window).T, bias=True).reshape(3, 3)
                    np.testing.assert_allclose(cov[b, r, c].numpy(), expected, atol=1e-13)


def test_window_covariance_in_float32_keeps_a_real_surfaces_noise():
    """At MVTec 3D-AD's scale — a surface 0.5 m from the camera, 0.2 mm between points, 10 µm of noise — the
    float32 covariances (their moments summed in float64 about the centroid) give the smallest eigenvalue (the
    noise, ≈10⁻¹⁰ m²) and the normal of a float64 computation about each window's own centre, which is what the
    earlier form (float32, relative to the centre point) approximated."""
    generator = torch.Generator().manual_seed(3)
    rows, cols = torch.meshgrid(torch.arange(40, dtype=torch.float64), torch.arange(40, dtype=torch.float64),
                                indexing="ij")
    surface = torch.stack((cols * 2e-4 - 0.004, rows * 2e-4 + 0.01, 0.5 + 0.002 * torch.sin(cols / 9) + rows * 1e-4))
    points = (surface + torch.randn(3, 40, 40, generator=generator, dtype=torch.float64) * 1e-5)[None]
    valid = torch.rand(1, 40, 40, generator=generator) > 0.1
    cov32, _ = window_covariance(points.float(), valid, 5)
    for r, c in ((5, 5), (20, 31), (37, 2)):
        window = torch.stack([points[0, :, i, j] for i in range(r - 2, r + 3) for j in range(c - 2, c + 3)
                              if 0 <= i < 40 and 0 <= j < 40 and valid[0, i, j]])
        centred = window - window[0]  # about a point of the window, in float64
        expected = (centred.T @ centred) / len(window) - torch.outer(centred.mean(0), centred.mean(0))
        values, vectors = torch.linalg.eigh(expected)
        got_values, got_vectors = torch.linalg.eigh(cov32[0, r, c].double())
        assert abs(got_values[0] - values[0]) < 1e-2 * values[0], (r, c)
        assert abs(abs(float(got_vectors[:, 0] @ vectors[:, 0])) - 1) < 1e-6, (r, c)


# --- normals of analytic surfaces ----------------------------------------------------------------------------------


def test_windows_of_points_on_a_line_get_no_normal():
    """Collinear windows (λ1 ≤ LINE_RATIO · λ2) have no plane: normal 0. Their would-be normal is rounding noise,
    which onnxruntime resolves differently from PyTorch (tests/test_export.py)."""
    columns = torch.linspace(-0.01, 0.01, SIDE, dtype=torch.float64)
    direction = torch.tensor([0.6, 0.3, 0.2], dtype=torch.float64)
    line = (torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)[:, None, None]
            + direction[:, None, None] * columns[None, None, :]).expand(3, SIDE, SIDE)[None].contiguous()
    normals, _ = estimate_normals(line, all_valid(line), PCA)
    assert torch.equal(normals, torch.zeros_like(normals))
    # a thin strip of two point rows is a plane (λ1 / λ2 ≈ 0.3 in its windows): normals everywhere
    strip = line.clone()
    strip[0, 1, 1::2] += 0.0005
    normals, _ = estimate_normals(strip, all_valid(strip), PCA)
    eigenvalues = symmetric_eigenvalues(window_covariance(strip, all_valid(strip), 5)[0])
    assert (eigenvalues[..., 1] > LINE_RATIO * eigenvalues[..., 2]).all()
    np.testing.assert_allclose(normals.norm(dim=1).numpy(), 1.0, atol=1e-9)


def test_orientation_towards_the_sensor_fades_edge_on_normals_continuously():
    """A plain float64 loop: n · clip(cos / GRAZING_COSINE, −1, 1), cos = n · (s − p) / |s − p|; n and −n alike."""
    generator = torch.Generator().manual_seed(3)
    points = torch.rand(1, 3, 6, 7, generator=generator, dtype=torch.float64) + torch.tensor([0, 0, 0.5],
                                                                                                dtype=torch.float64
                                                                                                )[:, None, None]
    normals = torch.nn.functional.normalize(torch.randn(1, 3, 6, 7, generator=generator, dtype=torch.float64), dim=1)
    view = -points[0, :, 0, 0] / points[0, :, 0, 0].norm()  # pixel (0, 0): a normal edge-on to the view
    edge_on = torch.linalg.cross(view, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    normals[0, :, 0, 0] = edge_on / edge_on.norm() + 0.01 * view  # cos ≈ 0.01, inside the fading band
    oriented = _towards_sensor(normals, points, (0.0, 0.0, 0.0))
    assert torch.equal(oriented, _towards_sensor(-normals, points, (0.0, 0.0, 0.0)))
    for r in range(6):
        for c in range(7):
            n, p = normals[0, :, r, c].numpy(), points[0, :, r, c].numpy()
            cosine = float(n @ -p) / float(np.linalg.norm(p))
            expected = n * min(max(cosine / GRAZING_COSINE, -1.0), 1.0)
            np.testing.assert_allclose(oriented[0, :, r, c].numpy(), expected, rtol=0, atol=1e-12)
    faded = oriented[0, :, 0, 0].norm()
    assert 0.1 < faded < 0.3  # cos ≈ 0.01 / 0.05


@pytest.mark.parametrize("config", [PCA, CENTRAL], ids=["pca", "central"])
def test_tilted_plane_normals_are_exact(config: GeometryImagesConfig):
    normal = np.array([0.3, -0.2, -1.0]) / np.linalg.norm([0.3, -0.2, -1.0])  # towards the camera
    ray = rays()
    points = ray * (-0.5 / np.tensordot(normal, ray, axes=1))  # n · p = −0.5: the plane 0.5 m away
    plane = torch.from_numpy(points)[None]
    normals, _ = estimate_normals(plane, all_valid(plane), config)
    np.testing.assert_allclose(normals[0].permute(1, 2, 0).numpy(), np.broadcast_to(normal, (SIDE, SIDE, 3)),
                               atol=1e-9)


@pytest.mark.parametrize("config", [PCA, CENTRAL], ids=["pca", "central"])
@pytest.mark.parametrize("surface", [sphere, cylinder])
def test_curved_surface_normals_match_the_analytic_ones(config: GeometryImagesConfig, surface):
    points, exact = surface()
    normals, _ = estimate_normals(points, all_valid(points), config)
    # outward normals of a convex surface seen from outside point towards the camera
    error = angles_deg(normals[0].permute(1, 2, 0), exact[0])
    inner = error[4:-4, 4:-4]  # away from the silhouette, where the window reaches past the visible cap
    assert inner.max() < 0.5, float(inner.max())


def test_pca_normals_resist_sensor_noise_better_than_central_differences():
    """The synthetic scenes' depth noise (0.02 mm at 0.2 mm pitch) on a sphere: PCA over 5 × 5 averages it."""
    points, exact = sphere()
    noisy = points * (1 + torch.randn(points.shape[2:], generator=torch.Generator().manual_seed(2),
                                      dtype=torch.float64) * 2e-5 / 0.5)
    errors = {}
    for name, config in (("pca", PCA), ("central", CENTRAL)):
        normals, _ = estimate_normals(noisy, all_valid(noisy), config)
        errors[name] = float(angles_deg(normals[0].permute(1, 2, 0), exact[0])[4:-4, 4:-4].median())
    assert errors["pca"] < 0.6 * errors["central"], errors


@pytest.mark.parametrize("config", [PCA, CENTRAL], ids=["pca", "central"])
def test_invalid_pixels_are_skipped_and_never_leak(config: GeometryImagesConfig):
    points, exact = sphere()
    valid = all_valid(points).clone()
    valid[0, 10:14, 5:30] = False
    valid[0, 25, 25] = False
    garbage = points.clone()
    garbage[0, :, ~valid[0]] = torch.tensor([7.0, -3.0, float("inf")], dtype=torch.float64)[:, None]
    clean = torch.where(valid[:, None], points, 0.0)
    normals, curvature = estimate_normals(garbage, valid, config)
    reference, reference_curvature = estimate_normals(clean, valid, config)
    assert torch.equal(normals, reference) and torch.isfinite(normals).all()
    assert (normals[0, :, ~valid[0]] == 0).all()
    error = angles_deg(normals[0].permute(1, 2, 0), exact[0])[4:-4, 4:-4][valid[0, 4:-4, 4:-4]]
    assert error.max() < 1.0  # one-sided windows beside the holes: a little more than the 0.5° of a full one
    if curvature is not None:
        assert torch.equal(curvature, reference_curvature)


@pytest.mark.parametrize("config", [PCA, CENTRAL], ids=["pca", "central"])
def test_normals_are_translation_invariant(config: GeometryImagesConfig):
    points, _ = sphere()
    shift = torch.tensor([0.03, -0.02, 0.1], dtype=torch.float64)
    moved = points + shift[None, :, None, None]
    normals, curvature = estimate_normals(points, all_valid(points), config)
    shifted_config = dataclasses.replace(config, sensor=tuple(shift.tolist()))
    moved_normals, moved_curvature = estimate_normals(moved, all_valid(moved), shifted_config)
    np.testing.assert_allclose(moved_normals.numpy(), normals.numpy(), atol=1e-9)
    if curvature is not None:
        np.testing.assert_allclose(moved_curvature.numpy(), curvature.numpy(), atol=1e-9)


def test_float32_normals_do_not_lose_precision_to_the_distance_from_the_camera():
    points, exact = sphere(distance=0.5)
    normals, _ = estimate_normals(points.float(), all_valid(points), PCA)
    error = angles_deg(normals[0].permute(1, 2, 0).double(), exact[0])[4:-4, 4:-4]
    assert error.max() < 0.5


def test_curvature_and_depth_images():
    points, _ = sphere()
    plane = organised(np.full((SIDE, SIDE), 0.5))
    config = GeometryImagesConfig(images=("normals", "curvature", "depth"))
    _, flat = estimate_normals(plane, all_valid(plane), config)
    _, curved = estimate_normals(points, all_valid(points), config)
    assert flat.abs().max() < 1e-12 and curved[0, 4:-4, 4:-4].min() > 1e-6
    depth = depth_above_plane(points, all_valid(points), (0.0, 0.0, 0.0))
    assert depth.min() == 0.0 and depth.max() == 1.0
    # the sphere's cap is highest (nearest the camera) in its middle
    assert depth[0, SIDE // 2, SIDE // 2] > depth[0, 2, 2]
    images = render_geometry_images(points, all_valid(points), config)
    assert [tuple(i.shape) for i in images] == [(1, 3, SIDE, SIDE)] * 3
    assert all(float(i.min()) >= 0.0 and float(i.max()) <= 1.0 for i in images)


def test_configuration_is_checked():
    with pytest.raises(ValueError, match="window"):
        GeometryImagesConfig(window=4)
    with pytest.raises(ValueError, match="normals"):
        GeometryImagesConfig(normals="sobel")
    with pytest.raises(ValueError, match="images"):
        GeometryImagesConfig(images=("depth",))


# --- the extractor ---------------------------------------------------------------------------------------------------

GEOMETRY = ExtractorConfig(img_size=64, feature_size=16, rgb=EfficientNetLiteConfig("lite0", (2, 4)),
                           xyz=GeometryImagesConfig(cnn=EfficientNetLiteConfig("lite0", (2, 4))))


def dome_cloud(side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A dome on an invalid background, (1, 3, S, S) float32, and its valid mask."""
    rows, cols = np.mgrid[:side, :side].astype(float)
    r2 = ((rows - side / 2) ** 2 + (cols - side / 2) ** 2) / (0.35 * side) ** 2
    depth = 0.5 - 0.004 * np.sqrt(np.clip(1 - r2, 0, None))
    cloud = organised(depth).float()
    valid = torch.from_numpy(r2 < 1)[None]
    return torch.where(valid[:, None], cloud, 0.0), valid


@pytest.fixture(scope="module")
def extractor() -> MultimodalFeatures:
    return MultimodalFeatures(GEOMETRY, modality="xyz")


def test_extractor_features_are_masked_like_the_other_3d_features(extractor: MultimodalFeatures):
    cloud, valid = dome_cloud()
    f3d = extractor.get_features_maps(None, cloud)[1]
    assert f3d.shape == (1, 16 * 16, GEOMETRY.xyz_dim) and GEOMETRY.xyz_dim == 152
    footprint = torch.nn.functional.adaptive_avg_pool2d(
        torch.nn.functional.avg_pool2d(valid[:, None].float(), 3, stride=1), 16).flatten(1) > 0
    assert torch.equal((f3d != 0).any(-1), footprint)
    # whatever the invalid pixels hold, the features stay the same (the reference rule: (0, 0, 0) is missing)
    garbage = cloud.clone()
    garbage[0, :, ~valid[0]] = 5.0
    assert torch.equal(extractor.get_features_maps(None, cloud)[1],
                       extractor.get_features_maps(None, torch.where(valid[:, None], cloud, 0.0))[1])
    assert torch.equal(extractor.xyz_maps(extractor.extract_xyz_parts(garbage, valid)), f3d)


def test_extractor_sees_a_dent(extractor: MultimodalFeatures):
    """A 1 mm dent changes the features where it is, far more than anywhere else."""
    cloud, valid = dome_cloud()
    dented = cloud.clone()
    rows, cols = np.mgrid[:64, :64]
    spot = torch.from_numpy((rows - 24) ** 2 + (cols - 36) ** 2 < 16)
    dented[0, 2, spot] += 0.001
    change = (extractor.get_features_maps(None, dented)[1] - extractor.get_features_maps(None, cloud)[1]).norm(dim=-1)
    change = change.reshape(16, 16)
    assert change[5:7, 8:10].max() > 5 * change[12:, :4].max()


def test_too_few_points_is_an_error(extractor: MultimodalFeatures):
    with pytest.raises(ValueError, match="valid points"):
        extractor.extract_xyz_parts(torch.zeros(1, 3, 64, 64))


def test_fingerprints_follow_the_configuration():
    def fingerprint(xyz) -> str:
        config = dataclasses.replace(GEOMETRY, xyz=xyz)
        return MultimodalFeatures(config, modality="xyz").fingerprint("xyz")

    base = fingerprint(GEOMETRY.xyz)
    assert base == fingerprint(GeometryImagesConfig(cnn=EfficientNetLiteConfig("lite0", (2, 4))))
    assert base != fingerprint(dataclasses.replace(GEOMETRY.xyz, window=7))
    assert base != fingerprint(dataclasses.replace(GEOMETRY.xyz, normals="central"))
    assert base != fingerprint(dataclasses.replace(GEOMETRY.xyz, images=("normals", "depth")))


def test_grid_parts_rebuild_the_features(extractor: MultimodalFeatures):
    cloud, _ = dome_cloud()
    parts = extractor.extract_xyz_parts(cloud)
    assert isinstance(parts[0], GridParts) and parts[0].features.shape == (152, 8, 8)
    assert torch.equal(extractor.xyz_maps(parts), extractor.get_features_maps(None, cloud)[1])


def test_geometry_images_refuse_pointmae_weights(tmp_path):
    from networks.extractors.point_mae import WeightsError

    with pytest.raises(WeightsError, match="pointmae_weights"):
        MultimodalFeatures(GEOMETRY, modality="xyz", pointmae_weights=tmp_path / "pretrain.pth")


def test_lite_presets_choose_their_3d_branch():
    """lite reads geometry images (lite_curvature one more); lite_fpfh keeps FPFH; BTF and Shape-Guided keep FPFH on
    lite, as they define."""
    from networks.methods.btf import BTF_PRESETS
    from networks.extractors.fpfh import FPFHConfig
    from networks.methods.shape_guided import SG_PRESETS

    assert PRESETS["lite"].xyz == GeometryImagesConfig()
    assert PRESETS["lite"].xyz.cnn == PRESETS["lite"].rgb, "the images go through the RGB branch's network"
    assert isinstance(PRESETS["lite_fpfh"].xyz, FPFHConfig)
    assert dataclasses.replace(PRESETS["lite_fpfh"], xyz=PRESETS["lite"].xyz) == PRESETS["lite"]
    curvature = GeometryImagesConfig(images=("normals", "curvature"))  # lite_curvature: lite plus that image
    assert dataclasses.replace(PRESETS["lite"], xyz=curvature) == PRESETS["lite_curvature"]
    for presets in (BTF_PRESETS, SG_PRESETS):
        assert isinstance(presets["lite"].xyz, FPFHConfig) and presets["lite"] == presets["lite_fpfh"]
