"""The pieces of the memory-bank methods (PatchCore's recipe, as BTF, Shape-Guided and M3DM use it).

The banks are data-sized buffers of :class:`MemoryBank` modules, saved and loaded like any module's weights; the
methods derive from :class:`networks.methods.detector.MemoryBankDetector`. The pieces are plain functions, each
checked in the tests against a brute-force computation:

* :func:`greedy_coreset` — greedy k-center selection on a sparse random projection (PatchCore; BTF's
  ``get_coreset_idx_randomp``), starting from index 0;
* :func:`nearest_neighbours` — exact k-nearest-neighbour search, in chunks of the bank to bound memory;
* :func:`reweighted_image_score` — PatchCore's re-weighting of the largest patch distance;
* :func:`orthogonal_matching_pursuit` — sparse codes over per-signal dictionaries (Shape-Guided's rebuilds), as
  scikit-learn's ``sparse_encode(algorithm="omp")``;
* :func:`gaussian_blur` — the σ = 4 blur of the maps (exact float), and :func:`pil_blur_8bit`, the references'
  blur through an 8-bit PIL image (an option: it rounds the map to 256 levels and creates ties).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.random_projection import SparseRandomProjection
from torch import nn
from tqdm import tqdm


logger = logging.getLogger(__name__)

PROJECTION_EPS = 0.9  # PatchCore's Johnson-Lindenstrauss eps for the coreset's random projection
PROJECTION_SEED = 0  # the reference leaves the projection unseeded; fixed here so that runs repeat
NEIGHBOUR_CHUNK = 16384  # bank rows per distance block: bounds the block at queries × chunk floats
BLUR_SIGMA = 4.0
BLUR_TRUNCATE = 4.0  # kernel radius = truncate × σ, as scipy.ndimage.gaussian_filter


class MemoryBank(nn.Module):
    """Data-sized buffers — a bank of feature vectors ``features`` (N, D) and whatever a subclass adds: saved in
    the module's checkpoint file, and given the stored number of rows when loaded (:meth:`resize_like`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.zeros(0, dim))

    @property
    def rows(self) -> int:
        """Entries in the bank (not ``__len__``: an empty module must not be falsy)."""
        return self.features.shape[0]

    def fill(self, features: torch.Tensor) -> None:
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise ValueError(f"bank features must be (N, {self.features.shape[1]}), got {tuple(features.shape)}")
        self.features = features.to(self.features.device, torch.float32).contiguous()

    def resize_like(self, state: Mapping[str, torch.Tensor]) -> None:
        """Give every buffer the row count stored in ``state`` (the other dimensions must match: they are checked
        when the state is loaded)."""
        for name, buffer in self.named_buffers(recurse=False):
            stored = state.get(name)
            if stored is not None and stored.ndim == buffer.ndim and stored.shape[1:] == buffer.shape[1:]:
                setattr(self, name, buffer.new_zeros(stored.shape))


def random_projection(features: torch.Tensor, eps: float = PROJECTION_EPS, seed: int = PROJECTION_SEED
                      ) -> torch.Tensor:
    """scikit-learn's SparseRandomProjection (n_components from the Johnson-Lindenstrauss bound for ``eps``) of
    (N, D) features; the features themselves when that bound exceeds D (as the reference falls back)."""
    try:
        projector = SparseRandomProjection(eps=eps, random_state=seed)
        return torch.from_numpy(projector.fit_transform(features.cpu().numpy())).float()
    except ValueError:
        logger.info("coreset: the projection for eps %.2f would not reduce %d dimensions; using the features",
                    eps, features.shape[1])
        return features.float().cpu()


def greedy_coreset(features: torch.Tensor, fraction: float, eps: float = PROJECTION_EPS,
                   seed: int = PROJECTION_SEED, progress: bool = True) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``int(fraction · N)`` rows (at least 1) of (N, D) ``features``
    (:func:`greedy_coreset_of_size`); ``fraction`` ≥ 1 keeps every row."""
    return greedy_coreset_of_size(features, max(1, int(fraction * len(features))), eps, seed, progress)


def greedy_coreset_of_size(features: torch.Tensor, n: int, eps: float = PROJECTION_EPS,
                           seed: int = PROJECTION_SEED, progress: bool = True) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``n`` rows of (N, D) ``features`` (every row when n ≥ N).

    Start at index 0; repeatedly add the row farthest (Euclidean, in the random projection) from the rows chosen
    so far (the first such row on a tie): :func:`greedy_k_center`.

    Returns:
        (n,) int64 indices in selection order.
    """
    count = len(features)
    n = max(1, n)
    if n >= count:
        return torch.arange(count)
    return greedy_k_center(random_projection(features, eps, seed), n, progress)


# greedy_k_center: candidates taken per round, and rows per distance block of the round's update.
ROUND_CANDIDATES = 512
UPDATE_CHUNK = 16384


def _first_occurrences(points: torch.Tensor) -> torch.Tensor:
    """The index of the first row of every distinct row of ``points``, ascending."""
    _, inverse = torch.unique(points, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(points), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(points)), "amin")
    return first.sort().values


def greedy_k_center(points: torch.Tensor, n: int, progress: bool = True) -> torch.Tensor:
    """Greedy k-center selection of ``n`` of the (N, D) ``points``: start at index 0, then repeatedly the point
    farthest from the chosen ones (the lowest index on a tie); squared distances as ‖x‖² − 2 x·c + ‖c‖².

    The same selection as one pass over all N points per chosen point (what it replaces: 50 minutes for M3DM's
    10 % of 700k patches on 2 cores), computed in rounds of matrix products:

    * duplicate rows (the background's zero 3D features: 80 % of a real class's patches) are one point: a chosen
      point's duplicates are at distance 0 and never chosen after it;
    * a round takes the :data:`ROUND_CANDIDATES` farthest points. Distances only shrink, so while a candidate,
      updated against the round's new centres, is still farther than every non-candidate was (the threshold), it
      is the farthest point of all: it is chosen without touching the others. A round ends when no candidate is;
    * then every point's distance is updated against the round's centres at once (a matrix product instead of
      one pass per centre). A point x at distance r from the chosen set cannot come closer to a new centre c at
      distance ≥ R from it unless r > R / 2 (‖x − c‖ ≥ R − r): points nearer than half the round's smallest R are
      skipped (with a margin for rounding).

    Where ``n`` exceeds the distinct rows, the remaining rows follow in index order.

    Returns:
        (n,) int64 indices in selection order.
    """
    points = points.float().cpu()
    count = len(points)
    n = max(1, min(n, count))
    rows = _first_occurrences(points)  # distinct rows, in index order: index 0 first, ties resolved alike
    distinct = points.index_select(0, rows)
    chosen = _k_center_of_distinct(distinct, min(n, len(rows)), progress)
    selected = rows.index_select(0, chosen)
    if n > len(rows):  # only duplicates of chosen rows are left
        rest = torch.ones(count, dtype=torch.bool)
        rest[selected] = False
        selected = torch.cat([selected, torch.nonzero(rest).squeeze(1)[: n - len(rows)]])
    return selected


def _k_center_of_distinct(points: torch.Tensor, n: int, progress: bool) -> torch.Tensor:
    """:func:`greedy_k_center` of distinct (N, D) float32 rows."""
    count = len(points)
    norms = points.square().sum(dim=1)
    current = (norms - 2 * (points @ points[0]) + norms[0]).clamp_min_(0)  # squared distance to the chosen set
    selected = [0]
    # disable only when asked: an explicit disable=False would override the user's TQDM_DISABLE
    bar = tqdm(total=n, initial=1, desc="coreset", unit="row", leave=False, mininterval=1.0,
               **({} if progress else {"disable": True}))
    while len(selected) < n:
        k = min(ROUND_CANDIDATES, count - 1)
        values, candidates = torch.topk(current, k + 1)
        threshold = values[k]  # no point outside the candidates is farther than this, now or later
        candidates = candidates[:k]
        distances = current.index_select(0, candidates)
        candidate_points, candidate_norms = points.index_select(0, candidates), norms.index_select(0, candidates)
        new = [int(torch.argmax(current))]  # the farthest point, the lowest index on a tie
        while len(selected) + len(new) < n:
            centre = new[-1]
            torch.minimum(distances, (candidate_norms - 2 * (candidate_points @ points[centre]) + norms[centre]
                                      ).clamp_min_(0), out=distances)
            peak = distances.max()
            if not peak > threshold:  # a point outside the candidates may be as far: update them all first
                break
            new.append(int(candidates[distances == peak].min()))
        selected += new
        bar.update(len(new))
        centres = torch.tensor(new)
        centre_points, centre_norms = points.index_select(0, centres), norms.index_select(0, centres)
        nearest = float(current.index_select(0, centres).min())
        movable = torch.nonzero(current > nearest / 4 * (1 - 1e-3)).squeeze(1)
        for start in range(0, len(movable), UPDATE_CHUNK):
            chunk = movable[start : start + UPDATE_CHUNK]
            squared = (norms.index_select(0, chunk)[:, None] - 2 * (points.index_select(0, chunk) @ centre_points.T)
                       + centre_norms[None, :]).clamp_min_(0)
            current.index_copy_(0, chunk, torch.minimum(current.index_select(0, chunk), squared.min(dim=1).values))
    bar.close()
    return torch.tensor(selected[:n])


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = NEIGHBOUR_CHUNK
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of every query (Euclidean), ascending.

    Args:
        queries: (Q, D). bank: (N, D), N ≥ k.

    Returns:
        distances (Q, k) and bank indices (Q, k).
    """
    best_distances, best_indices = None, None
    for start in range(0, len(bank), chunk):
        distances = torch.cdist(queries, bank[start : start + chunk])
        values, indices = torch.topk(distances, min(k, distances.shape[1]), dim=1, largest=False)
        indices = indices + start
        if best_distances is not None:
            values, order = torch.topk(torch.cat([best_distances, values], 1), k, dim=1, largest=False)
            indices = torch.gather(torch.cat([best_indices, indices], 1), 1, order)
        best_distances, best_indices = values, indices
    return best_distances, best_indices


def reweighted_image_score(patches: torch.Tensor, patch_distances: torch.Tensor, nearest: torch.Tensor,
                           bank: torch.Tensor, neighbours: int = 3, divisor: float = 1.0) -> torch.Tensor:
    """PatchCore's image score w · s* of one image.

    s* = the largest patch distance, m_test its patch, m* = its nearest bank row; N_b = the ``neighbours``
    nearest bank rows of m*, the first (m* itself) dropped; w = 1 − exp(s*/√D) / Σ_{b∈N_b} exp(‖m_test − b‖/√D).

    Args:
        patches: (P, D) the image's patch features. patch_distances: (P,) distance to the nearest bank row.
        nearest: (P,) that row's index. bank: (N, D).
        divisor: s* and the ‖m_test − b‖ divided by it first (M3DM's two-bank mode divides by 1000).
    """
    worst = torch.argmax(patch_distances)
    s_star = patch_distances[worst] / divisor
    m_test = patches[worst]
    _, around = nearest_neighbours(bank[nearest[worst]][None], bank, k=min(neighbours, len(bank)))
    others = bank[around[0, 1:]] if len(bank) > 1 else bank
    scale = math.sqrt(patches.shape[1])
    knn_distances = torch.linalg.vector_norm(m_test - others, dim=1) / divisor
    weight = 1 - torch.exp(s_star / scale) / torch.exp(knn_distances / scale).sum()
    return weight * s_star


def orthogonal_matching_pursuit(signals: torch.Tensor, dictionaries: torch.Tensor, n_nonzero: int) -> torch.Tensor:
    """Sparse codes of each signal over its own dictionary by orthogonal matching pursuit (float64), as
    scikit-learn's ``sparse_encode(algorithm="omp", n_nonzero_coefs=n)`` computes them (``orthogonal_mp_gram``).

    Per step: the atom with the largest |correlation| with the residual joins the support, then the coefficients
    are the least-squares fit on the support. A signal stops early when that atom is already in the support, its
    correlation is ~0, or it is linearly dependent on the support (Schur complement of the Gram matrix ≤ tiny).

    Args:
        signals: (B, D). dictionaries: (B, K, D), atoms in rows (not normalised, as the references pass them).
        n_nonzero: the largest support.

    Returns:
        (B, K) float64 codes; ``codes[b] @ dictionaries[b]`` is the sparse reconstruction.
    """
    x, atoms = signals.double(), dictionaries.double()
    batch, count, _ = atoms.shape
    gram = atoms @ atoms.transpose(1, 2)  # (B, K, K)
    correlation = (atoms @ x[..., None])[..., 0]  # (B, K)
    device = atoms.device
    rows = torch.arange(batch, device=device)
    support = torch.zeros(batch, 0, dtype=torch.long, device=device)
    coefficients = torch.zeros(batch, 0, dtype=torch.float64, device=device)
    residual_correlation = correlation.clone()
    running = torch.ones(batch, dtype=torch.bool, device=device)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(min(n_nonzero, count)):
        candidate = residual_correlation.abs().argmax(dim=1)
        repeated = (support == candidate[:, None]).any(dim=1)
        vanishing = residual_correlation[rows, candidate] ** 2 < tiny
        trial = torch.cat([support, candidate[:, None]], dim=1)
        sub_gram = gram[rows[:, None, None], trial[:, :, None], trial[:, None, :]]
        if support.shape[1]:  # Schur complement of the support's Gram block: the new atom's independent part
            cross = sub_gram[:, :-1, -1:]
            schur = sub_gram[:, -1, -1] - (cross.transpose(1, 2) @ torch.linalg.pinv(sub_gram[:, :-1, :-1])
                                           @ cross)[:, 0, 0]
        else:
            schur = sub_gram[:, 0, 0]
        running = running & ~repeated & ~vanishing & (schur > tiny)
        if not running.any():
            break
        # stopped signals keep their support: repeat its last atom with a zero coefficient slot
        trial = torch.where(running[:, None], trial, torch.cat([support, support[:, -1:]], dim=1)
                            if support.shape[1] else trial)
        sub_gram = gram[rows[:, None, None], trial[:, :, None], trial[:, None, :]]
        solved = torch.linalg.lstsq(sub_gram, correlation.gather(1, trial)[..., None]).solution[..., 0]
        previous = torch.cat([coefficients, torch.zeros(batch, 1, dtype=torch.float64, device=device)], dim=1)
        coefficients = torch.where(running[:, None], solved, previous)
        support = trial
        residual_correlation = correlation - (gram.gather(1, support[:, :, None].expand(-1, -1, count))
                                              * coefficients[..., None]).sum(dim=1)
    codes = torch.zeros(batch, count, dtype=torch.float64, device=device)
    if support.shape[1]:
        codes.scatter_add_(1, support, coefficients)
    return codes


def gaussian_blur(maps: torch.Tensor, sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps: kernel radius round(truncate · σ), edges extended (replicate).

    The float counterpart of the references' PIL blur (which also extends the edges).
    """
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype).to(maps.device)
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def pil_blur_8bit(maps: torch.Tensor, radius: float = BLUR_SIGMA) -> torch.Tensor:
    """The references' blur: each map divided by its maximum, cut to 8 bits (``ToPILImage``: ×255, truncated),
    PIL ``GaussianBlur(radius)``, back to [0, 1] (÷255) and multiplied by the maximum. (B, H, W) → (B, H, W)."""
    from PIL import Image, ImageFilter

    blurred = []
    for heat in maps.detach().cpu().float():
        peak = float(heat.max())
        if peak <= 0:
            blurred.append(torch.zeros_like(heat))
            continue
        image = Image.fromarray((heat / peak * 255).to(torch.uint8).numpy(), mode="L")
        filtered = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=radius)), dtype=np.float32)
        blurred.append(torch.from_numpy(filtered / 255.0) * peak)
    return torch.stack(blurred).to(maps.device)
