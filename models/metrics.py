"""Segmentation, detection and classification metrics for evaluating models against ground truth.

Pure numpy/scipy functions on label arrays and scores; no torch, no DICOM, no I/O. Used by
`models.evaluate` (held-out phantoms) and by the tests that guard the shipped weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

#: Size bins of the per-nodule sensitivity, by true diameter in mm: [low, high).
SIZE_BINS_MM: tuple[tuple[str, float, float], ...] = (
    ("<6mm", 0.0, 6.0),
    ("6-10mm", 6.0, 10.0),
    (">10mm", 10.0, float("inf")),
)


def dice(prediction: NDArray[np.bool_], truth: NDArray[np.bool_]) -> float:
    """Sørensen–Dice coefficient of two masks; 1.0 when both are empty (nothing to find, nothing found)."""
    p = np.asarray(prediction, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    denominator = int(p.sum()) + int(t.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denominator


@dataclass(frozen=True, slots=True)
class TrueNodule:
    """A ground-truth nodule: its voxel centre (k, j, i) and diameter in mm."""

    center_zyx: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True, slots=True)
class DetectionResult:
    """Matching of predicted components to true nodules in one scan."""

    hits: tuple[bool, ...]
    diameters_mm: tuple[float, ...]
    false_positives: int
    predicted: int


def match_detections(
    predicted_mask: NDArray[np.bool_],
    truth_labels: NDArray[np.integer],
    nodules: Sequence[TrueNodule],
) -> DetectionResult:
    """Match connected components of a predicted nodule mask to the true nodules of one scan.

    A true nodule counts as detected when a predicted component overlaps its ground-truth component
    (``truth_labels``: the true nodule mask, any non-zero value) and that component contains or touches
    the nodule's centre region; a predicted component overlapping no true nodule is a false positive.
    Components are 26-connected.

    Parameters
    ----------
    predicted_mask
        Boolean nodule mask ``[k, j, i]`` on the same grid as ``truth_labels``.
    truth_labels
        Ground-truth nodule mask ``[k, j, i]`` (non-zero inside any nodule).
    nodules
        The true nodules with centres in voxel indices of this grid.
    """
    structure = np.ones((3, 3, 3), dtype=bool)
    predicted_cc, n_pred = ndimage.label(np.asarray(predicted_mask, dtype=bool), structure=structure)
    truth_cc, _ = ndimage.label(np.asarray(truth_labels) > 0, structure=structure)
    matched_pred: set[int] = set()
    hits: list[bool] = []
    for nodule in nodules:
        centre = tuple(int(round(c)) for c in nodule.center_zyx)
        inside = all(0 <= c < n for c, n in zip(centre, truth_cc.shape))
        truth_id = int(truth_cc[centre]) if inside else 0
        if truth_id == 0:
            # The centre voxel fell outside the rasterised nodule (tiny nodule): use a 3x3x3 neighbourhood.
            lo = [max(0, c - 1) for c in centre]
            hi = [min(n, c + 2) for c, n in zip(centre, truth_cc.shape)]
            window = truth_cc[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            ids = window[window > 0]
            truth_id = int(ids[0]) if ids.size else 0
        if truth_id == 0:
            hits.append(False)
            continue
        overlapping = np.unique(predicted_cc[truth_cc == truth_id])
        overlapping = overlapping[overlapping > 0]
        hits.append(bool(overlapping.size))
        matched_pred.update(int(x) for x in overlapping)
    # Predicted components that overlap any true nodule component are not false positives, even when
    # the nodule's centre matching failed.
    overlapping_any = np.unique(predicted_cc[truth_cc > 0])
    matched_pred.update(int(x) for x in overlapping_any if x > 0)
    false_positives = n_pred - len(matched_pred)
    return DetectionResult(
        hits=tuple(hits),
        diameters_mm=tuple(float(n.diameter_mm) for n in nodules),
        false_positives=int(false_positives),
        predicted=int(n_pred),
    )


def sensitivity_by_size(results: Sequence[DetectionResult]) -> dict[str, tuple[float, int]]:
    """Per size bin: (sensitivity, number of true nodules); NaN sensitivity for an empty bin."""
    out: dict[str, tuple[float, int]] = {}
    for name, low, high in SIZE_BINS_MM:
        hits = [h for r in results for h, d in zip(r.hits, r.diameters_mm) if low <= d < high]
        out[name] = (float(np.mean(hits)) if hits else float("nan"), len(hits))
    at_least_6 = [h for r in results for h, d in zip(r.hits, r.diameters_mm) if d >= 6.0]
    out[">=6mm"] = (float(np.mean(at_least_6)) if at_least_6 else float("nan"), len(at_least_6))
    return out


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (Mann–Whitney U with ties counted half); NaN with a single class."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives, negatives = s[y], s[~y]
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_scores = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    rank_sum = ranks[y].sum()
    u = rank_sum - positives.size * (positives.size + 1) / 2.0
    return float(u / (positives.size * negatives.size))
