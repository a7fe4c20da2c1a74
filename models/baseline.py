"""Classical nodule detector: threshold + region growing + size/shape filter (the evaluation baseline).

The recipe of the articles this product grew from — thresholding, region growing, morphology — applied
to nodules: inside the lung region (given, e.g. from `pipeline.preprocess.segment_lungs_classical`, with
its holes filled so nodules inside it count), voxels denser than a threshold are grown into connected
components; components are kept when their size is that of a nodule and their shape is compact (vessels
are long and thin). `models.evaluate` measures the CNN against it, so the CNN's gain is measured, not
claimed. Pure numpy/scipy; no torch, no DICOM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


@dataclass(frozen=True, slots=True)
class BaselineParams:
    """Thresholds of the classical detector (HU, mm).

    ``threshold_hu`` the density a nodule voxel exceeds (ground-glass nodules start near −650 HU, lung
    parenchyma is about −850); ``min_diameter_mm``/``max_diameter_mm`` the equivalent-sphere diameter
    range kept; ``max_elongation`` the largest ratio of the longest to the shortest principal axis
    (vessels are long); ``min_fill`` the smallest fraction of the component's bounding ellipsoid it
    fills (branching vessel pieces fill little).
    """

    threshold_hu: float = -550.0
    min_diameter_mm: float = 3.0
    max_diameter_mm: float = 35.0
    max_elongation: float = 2.6
    min_fill: float = 0.45


@dataclass(frozen=True, slots=True)
class BaselineResult:
    """Nodule mask ``[k, j, i]``, one score per kept component (compactness in [0, 1]), and the
    study-level score (the highest component score, 0 without components)."""

    nodule_mask: NDArray[np.bool_]
    component_scores: tuple[float, ...]
    study_score: float


def fill_lung_region(lung_mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The lung region with the holes that dense structures (nodules, vessels) leave filled, per slice."""
    filled = np.zeros_like(lung_mask, dtype=bool)
    for k in range(lung_mask.shape[0]):
        filled[k] = ndimage.binary_fill_holes(lung_mask[k])
    return filled


def detect_nodules_classical(
    hu_zyx: NDArray[np.floating] | NDArray[np.integer],
    lung_mask: NDArray[np.bool_],
    spacing_mm: tuple[float, float, float],
    params: BaselineParams = BaselineParams(),
) -> BaselineResult:
    """Detect nodules with a threshold, region growing (connected components) and a size/shape filter.

    Parameters
    ----------
    hu_zyx
        CT in Hounsfield units, ``[k, j, i]``.
    lung_mask
        Lung region on the same grid (holes are filled here).
    spacing_mm
        Voxel size in array order (slice, row, column), mm.
    """
    region = fill_lung_region(np.asarray(lung_mask, dtype=bool))
    # Erode the region by one voxel so the chest wall's partial-volume rim does not seed candidates.
    region = ndimage.binary_erosion(region, iterations=1)
    candidates = (np.asarray(hu_zyx) > params.threshold_hu) & region
    labels, count = ndimage.label(candidates, structure=np.ones((3, 3, 3), dtype=bool))
    out = np.zeros(candidates.shape, dtype=bool)
    scores: list[float] = []
    if count == 0:
        return BaselineResult(out, (), 0.0)
    voxel_mm3 = float(np.prod(spacing_mm))
    slices = ndimage.find_objects(labels)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    for index, box in enumerate(slices, start=1):
        if box is None:
            continue
        component = labels[box] == index
        n = int(component.sum())
        volume_mm3 = n * voxel_mm3
        diameter = (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)
        if not params.min_diameter_mm <= diameter <= params.max_diameter_mm:
            continue
        coords = np.argwhere(component).astype(np.float64) * spacing
        if n >= 4:
            cov = np.cov(coords, rowvar=False) + np.eye(3) * (spacing.max() ** 2 / 12.0)
            eigen = np.clip(np.linalg.eigvalsh(cov), 1e-6, None)
            elongation = float(math.sqrt(eigen[-1] / eigen[0]))
            # Volume of the ellipsoid with the component's second moments (uniform solid ellipsoid:
            # variance along a semi-axis a is a²/5).
            ellipsoid_mm3 = 4.0 / 3.0 * math.pi * float(np.prod(np.sqrt(5.0 * eigen)))
            fill = min(1.0, volume_mm3 / ellipsoid_mm3) if ellipsoid_mm3 > 0 else 0.0
        else:
            elongation, fill = 1.0, 1.0
        if elongation > params.max_elongation or fill < params.min_fill:
            continue
        out[box] |= component
        scores.append(float(np.clip(fill / max(elongation, 1.0), 0.0, 1.0)))
    return BaselineResult(out, tuple(scores), max(scores) if scores else 0.0)
