"""The second look at the lungs: blob candidates, classified on a finer grid, painted into the nodule channel.

The segmentation network works on a 2 mm grid. There a 6–10 mm nodule is three to five voxels across,
and one that touches a vessel or the pleura, or one of ground glass, can get a probability near 0: a
vessel crossing looks the same at that resolution. The candidate stage looks again where the first
stage found nothing:

1. `detect_candidates`: on the network's input grid, bright blobs in (and next to) the lungs, by a
   multi-scale Hessian "dot" filter (Li, Sone and Doi, Med. Phys. 2003: at a bright sphere all three
   eigenvalues of the Hessian are negative and alike, along a vessel one is near zero). Local maxima
   of its response, strongest first, at most ``max_candidates``; those the first stage already
   covers (nodule probability ≥ ``skip_probability`` near them) are left out.
2. `sample_patches`: a cube around each candidate, resampled from the *source* image at the stage's
   finer spacing (1.25 mm for the default model), in HU.
3. `score_candidates`: a small 3-D classifier (`models.networks.PatchClassifier3D`) gives each one a
   nodule probability.
4. `paint_candidates`: a candidate the classifier accepts becomes a ball of its scale's radius in the
   nodule channel on the source grid, with its probability (the other channels giving way to it),
   so that postprocessing treats it like any other component: the peak threshold, the minimum size,
   the half-maximum edge on the source image, and the measurements.

Pure numpy/scipy/torch; the manifest's ``[candidates]`` table (`models.spec.CandidateStageSpec`) holds
the settings, `models.train_candidates` trains and calibrates the classifier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.types import Volume

#: Voxels of dilation of the lung mask where candidates may lie (nodules on the pleura sit at its edge).
LUNG_MARGIN_VOXELS = 2


@dataclass(frozen=True, slots=True)
class Candidate:
    """A bright blob: its centre in LPS mm, the filter scale (mm) that answered most, and the response."""

    center_lps_mm: tuple[float, float, float]
    scale_mm: float
    response: float

    @property
    def radius_mm(self) -> float:
        """The radius of a ball whose dot-filter response peaks at this scale (σ·√3)."""
        return self.scale_mm * math.sqrt(3.0)


def symmetric_eigenvalues(a11: NDArray[Any], a22: NDArray[Any], a33: NDArray[Any], a12: NDArray[Any],
                          a13: NDArray[Any], a23: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """Eigenvalues ``λ1 ≤ λ2 ≤ λ3`` of many symmetric 3×3 matrices given by their six entries, in closed
    form (the trigonometric solution of the characteristic cubic; Smith, CACM 1961): several times
    faster than `numpy.linalg.eigvalsh` on stacked matrices."""
    a11, a22, a33, a12, a13, a23 = (np.asarray(v, dtype=np.float64) for v in (a11, a22, a33, a12, a13, a23))
    q = (a11 + a22 + a33) / 3.0
    off = a12 * a12 + a13 * a13 + a23 * a23
    b11, b22, b33 = a11 - q, a22 - q, a33 - q
    p = np.sqrt((b11 * b11 + b22 * b22 + b33 * b33 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    c11, c22, c33, c12, c13, c23 = b11 / safe, b22 / safe, b33 / safe, a12 / safe, a13 / safe, a23 / safe
    det = c11 * (c22 * c33 - c23 * c23) - c12 * (c12 * c33 - c23 * c13) + c13 * (c12 * c23 - c22 * c13)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    return smallest, 3.0 * q - largest - smallest, largest


def dot_filter(image_zyx: NDArray[np.floating[Any]], sigma_voxels: float, region: NDArray[np.bool_]) -> NDArray[np.float32]:
    """Scale-normalised Hessian dot response ``λ3² / |λ1|`` where all eigenvalues are negative, else 0.

    The image is smoothed once with a Gaussian of ``sigma_voxels``; the Hessian is the central difference
    of the central differences of the smoothed image, taken at the voxels of ``region`` only (times σ², the scale
    normalisation), and only where the Laplacian is negative (bright structures).
    """
    smooth = np.pad(ndimage.gaussian_filter(np.asarray(image_zyx, dtype=np.float32), sigma_voxels, truncate=3.0),
                    2, mode="edge")
    out = np.zeros(region.shape, dtype=np.float32)
    points = np.flatnonzero(np.pad(region, 2))
    if len(points) == 0:
        return out
    flat = smooth.ravel()
    steps = (smooth.shape[1] * smooth.shape[2], smooth.shape[2], 1)
    centre = 2.0 * flat[points]
    # The derivative of the central difference: (f(x + 2) - 2 f(x) + f(x - 2)) / 4 along each axis.
    diagonal = [0.25 * (flat[points + 2 * d] + flat[points - 2 * d] - centre) for d in steps]
    bright = (diagonal[0] + diagonal[1] + diagonal[2]) < 0
    points = points[bright]
    diagonal = [d[bright] for d in diagonal]

    def mixed(da: int, db: int) -> NDArray[np.float32]:
        return 0.25 * (flat[points + da + db] - flat[points + da - db] - flat[points - da + db]
                       + flat[points - da - db])

    scale = float(sigma_voxels) ** 2
    l1, _, l3 = symmetric_eigenvalues(diagonal[0] * scale, diagonal[1] * scale, diagonal[2] * scale,
                                      mixed(steps[0], steps[1]) * scale, mixed(steps[0], steps[2]) * scale,
                                      mixed(steps[1], steps[2]) * scale)
    response = np.where(l3 < 0, l3 * l3 / np.maximum(-l1, 1e-6), 0.0).astype(np.float32)
    padded = np.zeros(smooth.shape, dtype=np.float32)
    padded.ravel()[points] = response
    out[...] = padded[2:-2, 2:-2, 2:-2]
    return out


def detect_candidates(
    image: Volume,
    lung_mask_zyx: NDArray[np.bool_],
    *,
    scales_mm: Sequence[float],
    min_level: float,
    min_response: float,
    max_candidates: int,
    covered_zyx: NDArray[np.bool_] | None = None,
    max_level: float | None = None,
    fill_outside_lungs: bool = False,
) -> list[Candidate]:
    """Bright blobs in and next to the lungs of ``image`` (any intensity scale; ``min_level`` on it).

    Parameters
    ----------
    image
        The image on an (about isotropic) grid with its affine, e.g. the network's input volume.
    lung_mask_zyx
        The lungs on the same grid; candidates lie within `LUNG_MARGIN_VOXELS` of them.
    scales_mm
        Gaussian scales of the dot filter (a ball of radius r answers most at r/√3).
    min_level
        The smoothed image must reach this value at a candidate (ground glass is -700 HU or denser).
    min_response
        The weakest dot response kept.
    max_candidates
        The most candidates returned, strongest first.
    covered_zyx
        Voxels already found (the first stage's nodules): candidates there are left out.
    max_level
        The image is clipped to this before filtering (None: not clipped), so that faint (ground
        glass) blobs compete with vessels on shape rather than on contrast.
    fill_outside_lungs
        Outside ``lung_mask_zyx`` the image is replaced by the lungs' median before filtering: a nodule
        on the pleura or the mediastinum then stands out as a blob instead of a bump on the wall.
    """
    array = np.asarray(image.array_zyx, dtype=np.float32)
    if array.shape != lung_mask_zyx.shape:
        raise ValueError(f"lung mask {lung_mask_zyx.shape} differs from the image {array.shape}")
    spacing = image.spacing_mm
    region = ndimage.binary_dilation(lung_mask_zyx, iterations=LUNG_MARGIN_VOXELS)
    bounds = ndimage.find_objects(region.astype(np.uint8))
    if not bounds or bounds[0] is None or max_candidates <= 0:
        return []
    pad = int(math.ceil(3 * max(scales_mm) / min(spacing))) + 1
    box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(bounds[0], array.shape))
    local = array[box]
    if max_level is not None:
        local = np.minimum(local, np.float32(max_level))
    if fill_outside_lungs:
        lungs = lung_mask_zyx[box]
        if lungs.any():
            local = np.where(lungs, local, np.float32(np.median(local[lungs]))).astype(np.float32)
    local_region = region[box] & (ndimage.gaussian_filter(local, 0.7) >= min_level)
    best = np.zeros(local.shape, dtype=np.float32)
    best_scale = np.zeros(local.shape, dtype=np.float32)
    for scale in scales_mm:
        response = dot_filter(local, float(scale) / float(np.mean(spacing)), local_region)
        better = response > best
        best[better] = response[better]
        best_scale[better] = scale
    peaks = (best >= min_response) & (best == ndimage.maximum_filter(best, size=3)) & local_region
    if covered_zyx is not None:
        peaks &= ~covered_zyx[box]
    points = np.argwhere(peaks)
    if len(points) == 0:
        return []
    values = best[peaks]
    order = np.argsort(-values, kind="stable")[:max_candidates]
    offset = np.array([s.start for s in box], dtype=np.float64)
    centers = image.index_to_lps(points[order].astype(np.float64) + offset)
    return [Candidate((float(c[0]), float(c[1]), float(c[2])), float(best_scale[tuple(p)]), float(v))
            for c, p, v in zip(centers, points[order], values[order], strict=True)]


def lps_to_index(volume: Volume, points_lps: NDArray[np.float64]) -> NDArray[np.float64]:
    """Continuous (k, j, i) indices of LPS points on a volume's grid."""
    inverse = np.linalg.inv(np.asarray(volume.affine_lps, dtype=np.float64))
    homogeneous = np.c_[np.asarray(points_lps, dtype=np.float64).reshape(-1, 3), np.ones(len(points_lps))]
    ijk = homogeneous @ inverse.T
    return ijk[:, 2::-1][:, :3].copy()


def sample_patches(volume: Volume, centers_lps: Sequence[Sequence[float]], *, size: int, spacing_mm: float,
                   fill: float = -1000.0) -> NDArray[np.float32]:
    """Cubes of ``size``³ voxels at ``spacing_mm`` around each centre, resampled (trilinear) from the
    source volume; ``[N, size, size, size]``, the cube's axes along the source's k, j and i directions.
    Outside the volume: ``fill``."""
    if len(centers_lps) == 0:
        return np.zeros((0, size, size, size), dtype=np.float32)
    offsets = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing_mm
    # The patch axes follow the source axes' directions (k, j, i), each sampled at spacing_mm.
    affine = np.asarray(volume.affine_lps, dtype=np.float64)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)  # columns: i, j, k unit vectors
    oz, oy, ox = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    grid = (oz[..., None] * directions[:, 2] + oy[..., None] * directions[:, 1]
            + ox[..., None] * directions[:, 0]).reshape(-1, 3)
    array = np.asarray(volume.array_zyx, dtype=np.float32)
    patches = np.empty((len(centers_lps), size, size, size), dtype=np.float32)
    for n, center in enumerate(centers_lps):
        kji = lps_to_index(volume, grid + np.asarray(center, dtype=np.float64))
        patches[n] = ndimage.map_coordinates(array, kji.T, order=1, mode="constant", cval=fill,
                                             prefilter=False).reshape(size, size, size)
    return patches


def window(patches_hu: NDArray[np.float32], low: float, high: float) -> NDArray[np.float32]:
    """HU → 0–1 over ``[low, high]``, clipped (the first stage's window)."""
    return np.clip((patches_hu - low) / (high - low), 0.0, 1.0).astype(np.float32)


@torch.no_grad()
def score_candidates(module: Any, patches: NDArray[np.float32], device: torch.device | str = "cpu", *,
                     bias: float = 0.0, batch_size: int = 64, axial_turns: int = 1) -> NDArray[np.float64]:
    """The classifier's nodule probability for each windowed patch: ``sigmoid(logit + bias)``.

    ``bias`` is the calibration shift the training chose (`models.train_candidates`), so that the
    nodule label's peak threshold is the stage's operating point. With ``axial_turns`` 2 or 4 the
    classifier also sees each cube turned by a half or by each quarter turn in the axial plane (as in
    its training) and the logits are averaged: test-time augmentation.
    """
    if axial_turns not in (1, 2, 4):
        raise ValueError(f"axial_turns must be 1, 2 or 4, got {axial_turns}")
    if len(patches) == 0:
        return np.zeros(0, dtype=np.float64)
    z = np.zeros(len(patches), dtype=np.float64)
    for turn in range(0, 4, 4 // axial_turns):
        logits = []
        for start in range(0, len(patches), batch_size):
            cubes = np.rot90(patches[start:start + batch_size], turn, axes=(2, 3))
            x = torch.from_numpy(np.ascontiguousarray(cubes)[:, None]).to(device)
            logits.append(module(x).reshape(-1).float().cpu().numpy())
        z += np.concatenate(logits).astype(np.float64)
    z = z / axial_turns + bias
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def ball_region(volume: Volume, candidate: Candidate) -> tuple[tuple[slice, slice, slice], NDArray[np.bool_]] | None:
    """The box of the source grid around a candidate's ball and the ball inside it (None when the ball
    lies outside the volume)."""
    spacing = np.asarray(volume.spacing_mm, dtype=np.float64)
    radius = candidate.radius_mm
    center = lps_to_index(volume, np.asarray([candidate.center_lps_mm]))[0]
    reach = np.ceil(radius / spacing).astype(int) + 1
    lo = np.maximum(np.floor(center).astype(int) - reach, 0)
    hi = np.minimum(np.floor(center).astype(int) + reach + 1, volume.shape_zyx)
    if np.any(hi <= lo):
        return None
    kk, jj, ii = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    distance2 = (((kk - center[0]) * spacing[0]) ** 2 + ((jj - center[1]) * spacing[1]) ** 2
                 + ((ii - center[2]) * spacing[2]) ** 2)
    box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))
    return box, distance2 <= radius * radius


def paint_candidates(probability_zyx: NDArray[np.floating[Any]], volume: Volume,
                     candidates: Sequence[Candidate], scores: Sequence[float], *, min_score: float,
                     others: Sequence[NDArray[np.floating[Any]]] = ()) -> int:
    """Write each candidate with ``score ≥ min_score`` into ``probability_zyx`` (source grid, in place)
    as a ball of its radius holding its score (the larger value where one is already there), unless
    the ball already holds a probability of ``min_score``: that component is reported as it is.

    ``others`` are the other labels' channels on the same grid: inside the ball each is lowered to at
    most ``1 - score`` (in place), as the network's softmax would have it. Without that the lung
    around a nodule, at probability 0.999 and more, outbids a candidate accepted at 0.98 when the
    label map is drawn (`pipeline.postprocess.plan_label_map`), and the candidate is lost.
    Returns how many were painted."""
    painted = 0
    for candidate, score in zip(candidates, scores, strict=True):
        if score < min_score:
            continue
        region = ball_region(volume, candidate)
        if region is None:
            continue
        box, ball = region
        local = probability_zyx[box]
        if float(local[ball].max(initial=0.0)) >= min_score:
            continue  # a component reported already (the network's, or an earlier candidate's) holds it
        np.maximum(local, np.where(ball, np.float32(score), np.float32(0.0)), out=local)
        for other in others:
            rest = other[box]
            np.minimum(rest, np.where(ball, np.float32(1.0 - score), np.float32(np.inf)), out=rest)
        painted += 1
    return painted
