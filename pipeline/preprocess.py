"""Preprocessing: pure steps from the source volume to the network's input, each with a record.

Every step is a function ``(Volume, **params) -> (Volume, PreprocessRecord)``: it never changes its
input, and its record holds what is needed to undo the geometry (source shape and affine, crop box,
pad widths, resampling steps) and the intensity statistics it computed. `run_plan` chains the steps a
model manifest declares (``[[preprocess]]`` tables, `models.spec.StepSpec`); `invert_to_source` maps a
prediction on the network's grid back onto the source grid exactly (same shape, same affine);
`replay_plan` applies the recorded geometry to another array of the source grid (e.g. training labels).
`segment_lungs_classical` is the classical lung mask (threshold, region growing from seeds inside the
body, morphology) that ``crop_lungs`` uses and that doubles as the baseline of issue 4.

Operations and their parameters (the keys of a ``[[preprocess]]`` table besides ``op``; defaults in
brackets; lengths in mm, intensities in the volume's unit, HU for CT):

- ``crop_lungs``: ``margin_mm`` [10], ``threshold_hu`` [-400], ``working_spacing_mm`` [2] — crop to the
  classical lung mask's box; without lungs, the body's box, then the whole volume.
- ``crop_body``: ``threshold_hu`` [-500], ``margin_mm`` [0] — crop to the largest component above the
  threshold.
- ``resample``: ``spacing_mm`` (one number or ``[z, y, x]``), ``order`` [1] (0 nearest, 1 linear,
  3 cubic spline).
- ``clip``: ``min``, ``max``.
- ``normalize``: ``mode`` ["window"], ``min``, ``max`` — ``"window"`` maps ``[min, max]`` to ``[0, 1]``;
  ``"zscore"`` subtracts the mean and divides by the standard deviation of the voxels within
  ``[min, max]`` (all voxels when omitted).
- ``denoise``: ``method`` ["median"] (``"median"``, ``"mean"``, ``"gaussian"``), ``size`` [3] voxels
  (median, mean), ``sigma_mm`` [1] (gaussian).
- ``contrast_stretch``: ``lower_percentile`` [1], ``upper_percentile`` [99] — mapped to 0 and 1.
- ``histogram_equalize``: ``bins`` [256] — to ``[0, 1]``.
- ``pad_to_multiple``: ``multiple`` [16] (one integer or ``[z, y, x]``), ``value`` [the volume's minimum].

This module knows arrays and affines only: no DICOM, no files, no torch.

Geometry follows `pipeline.types`: arrays ``[k, j, i]``, ``affine_lps`` maps ``(i, j, k, 1)`` to LPS mm.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from pipeline.types import Volume

logger = logging.getLogger(__name__)

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Operations that change the grid (and so must be undone by `invert_to_source`).
GEOMETRIC_OPS = frozenset({"resample", "crop_body", "crop_lungs", "pad_to_multiple"})


@dataclass(frozen=True, slots=True, eq=False)
class PreprocessRecord:
    """What one preprocessing step did, enough to map results back onto its input grid.

    Records compare by identity (``eq=False``): they hold affines as arrays, whose ``==`` is
    element-wise.

    Attributes
    ----------
    op
        The operation name, as in the manifest (``"resample"``, ``"crop_lungs"``, ...).
    params
        The parameters it was called with (read-only).
    source_shape_zyx, source_affine_lps
        The grid of the step's input (array shape ``[k, j, i]``, 4×4 affine to LPS mm).
    output_shape_zyx, output_affine_lps
        The grid of the step's output.
    crop_box_zyx
        For crops: ``((k0, k1), (j0, j1), (i0, i1))``, half-open voxel ranges of the input kept.
    pad_widths_zyx
        For padding: ``((before, after), ...)`` voxels added per axis.
    step_zyx
        For resampling: input voxels per output voxel along each axis (output spacing / input
        spacing); output voxel ``o`` sits at input coordinate ``o * step`` (voxel 0 centres coincide).
    statistics
        Values computed from the data (window bounds, mean and standard deviation, percentiles, the
        fallback a crop took), for the log and for reproducing the step.
    """

    op: str
    params: Mapping[str, Any]
    source_shape_zyx: tuple[int, int, int]
    source_affine_lps: NDArray[np.float64]
    output_shape_zyx: tuple[int, int, int]
    output_affine_lps: NDArray[np.float64]
    crop_box_zyx: Box | None = None
    pad_widths_zyx: Box | None = None
    step_zyx: tuple[float, float, float] | None = None
    statistics: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def changes_grid(self) -> bool:
        """Whether the step changed the grid (crop, pad, resample) and must be inverted."""
        return self.op in GEOMETRIC_OPS


def _record(
    op: str,
    params: Mapping[str, Any],
    before: Volume,
    after: Volume,
    **extra: Any,
) -> PreprocessRecord:
    return PreprocessRecord(
        op=op,
        params=MappingProxyType(dict(params)),
        source_shape_zyx=before.shape_zyx,
        source_affine_lps=before.affine_lps.copy(),
        output_shape_zyx=after.shape_zyx,
        output_affine_lps=after.affine_lps.copy(),
        **extra,
    )


def _triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value), float(value), float(value))
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or three (z, y, x), got {value!r}")
    return values  # type: ignore[return-value]


def _as_float32(array: NDArray[Any]) -> NDArray[np.float32]:
    return np.asarray(array, dtype=np.float32)


# ------------------------------------------------------------------------------------------ geometry


def _shift_origin(affine: NDArray[np.float64], offset_zyx: Sequence[float]) -> NDArray[np.float64]:
    """The affine of a grid whose voxel 0 is the input's voxel ``offset_zyx``."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array(offset_zyx[::-1], dtype=np.float64) + affine[:3, 3]
    return out


def resample(
    volume: Volume, spacing_mm: float | Sequence[float], *, order: int = 1
) -> tuple[Volume, PreprocessRecord]:
    """Resample to a target voxel size (separable linear/nearest, or scipy.ndimage splines).

    Parameters
    ----------
    spacing_mm
        Target spacing in mm, one number or ``(z, y, x)`` in array order (slice, row, column).
    order
        Spline order (0 nearest, 1 linear, 3 cubic).

    Notes
    -----
    Voxel 0 keeps its centre; the output has ``round(n * spacing_in / spacing_out)`` voxels per axis
    (at least one), so it covers the input's extent to within half an output voxel. Edge values are
    repeated beyond the last input voxel (``mode="nearest"``).
    """
    target = _triple(spacing_mm, "spacing_mm")
    if min(target) <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")
    source = volume.spacing_mm
    step = tuple(t / s for t, s in zip(target, source))
    shape = tuple(max(1, int(round(n / st))) for n, st in zip(volume.shape_zyx, step))
    array = _resample_array(volume.array_zyx, step, shape, order)
    affine = volume.affine_lps.copy()
    for axis, st in enumerate(step):
        affine[:3, 2 - axis] *= st
    out = Volume(array_zyx=array, affine_lps=affine)
    record = _record(
        "resample",
        {"spacing_mm": target, "order": order},
        volume,
        out,
        step_zyx=step,  # type: ignore[arg-type]
    )
    return out, record


def _crop(volume: Volume, box: Box) -> Volume:
    (k0, k1), (j0, j1), (i0, i1) = box
    array = volume.array_zyx[k0:k1, j0:j1, i0:i1].copy()
    return Volume(array_zyx=array, affine_lps=_shift_origin(volume.affine_lps, (k0, j0, i0)))


def _box_of(mask: NDArray[np.bool_], margin_mm: float, spacing_mm: Sequence[float]) -> Box | None:
    """Bounding box of ``mask`` grown by ``margin_mm`` on each side, clipped to the grid."""
    if not mask.any():
        return None
    box = []
    for axis, (n, spacing) in enumerate(zip(mask.shape, spacing_mm)):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        grow = int(np.ceil(margin_mm / spacing)) if margin_mm > 0 else 0
        box.append((max(0, int(present[0]) - grow), min(n, int(present[-1]) + 1 + grow)))
    return (box[0], box[1], box[2])


def _full_box(shape: Sequence[int]) -> Box:
    return ((0, shape[0]), (0, shape[1]), (0, shape[2]))


def body_mask(volume: Volume, *, threshold_hu: float = -500.0) -> NDArray[np.bool_]:
    """The body: the largest connected component above ``threshold_hu`` (HU), holes filled per slice."""
    above = volume.array_zyx > threshold_hu
    labels, count = ndimage.label(above)
    if count == 0:
        return np.zeros(volume.shape_zyx, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    return _fill_holes_per_slice(largest)


#: 4-connectivity within a slice ``[k]`` and none across slices: labels each slice's 2-D components.
_IN_SLICE_4 = np.zeros((3, 3, 3), dtype=bool)
_IN_SLICE_4[1] = ndimage.generate_binary_structure(2, 1)


def _fill_holes_per_slice(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Fill holes in each slice ``[k]`` (the body is open at its ends, so 3-D filling would not).

    Same result as `scipy.ndimage.binary_fill_holes` slice by slice, in one labelling pass: the
    background components of a slice that touch its edge are outside, all others are holes.
    """
    background, count = ndimage.label(~mask, structure=_IN_SLICE_4)
    if count == 0:
        return mask.copy()
    outside = np.zeros(count + 1, dtype=bool)
    for edge in (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1]):
        outside[edge] = True
    outside[0] = False
    return np.asarray(~outside[background], dtype=bool)


def crop_body(
    volume: Volume, *, threshold_hu: float = -500.0, margin_mm: float = 0.0
) -> tuple[Volume, PreprocessRecord]:
    """Crop to the body's bounding box (threshold + largest component) with a margin in mm.

    When nothing exceeds the threshold the volume is kept whole (``statistics["fallback"] = "none"``).
    """
    mask = body_mask(volume, threshold_hu=threshold_hu)
    box = _box_of(mask, margin_mm, volume.spacing_mm)
    statistics = {}
    if box is None:
        box, statistics = _full_box(volume.shape_zyx), {"fallback": "none"}
    out = _crop(volume, box)
    record = _record(
        "crop_body",
        {"threshold_hu": threshold_hu, "margin_mm": margin_mm},
        volume,
        out,
        crop_box_zyx=box,
        statistics=MappingProxyType(statistics),
    )
    return out, record


def crop_lungs(
    volume: Volume,
    *,
    margin_mm: float = 10.0,
    threshold_hu: float = -400.0,
    working_spacing_mm: float = 2.0,
) -> tuple[Volume, PreprocessRecord]:
    """Crop to the bounding box of `segment_lungs_classical` grown by ``margin_mm``.

    Without lungs found, falls back to the body box, then to the whole volume
    (``statistics["fallback"]`` says which).
    """
    mask = segment_lungs_classical(volume, threshold_hu=threshold_hu, working_spacing_mm=working_spacing_mm)
    box = _box_of(mask, margin_mm, volume.spacing_mm)
    statistics: dict[str, Any] = {"lung_voxels": int(mask.sum())}
    if box is None:
        box = _box_of(body_mask(volume), margin_mm, volume.spacing_mm)
        statistics["fallback"] = "body"
        if box is None:
            box, statistics["fallback"] = _full_box(volume.shape_zyx), "none"
        logger.info("event=lungs_not_found fallback=%s", statistics["fallback"])
    out = _crop(volume, box)
    record = _record(
        "crop_lungs",
        {"margin_mm": margin_mm, "threshold_hu": threshold_hu, "working_spacing_mm": working_spacing_mm},
        volume,
        out,
        crop_box_zyx=box,
        statistics=MappingProxyType(statistics),
    )
    return out, record


def pad_to_multiple(
    volume: Volume, *, multiple: int | Sequence[int] = 16, value: float | None = None
) -> tuple[Volume, PreprocessRecord]:
    """Pad each axis symmetrically (the extra voxel after) to a multiple of ``multiple``.

    Parameters
    ----------
    multiple
        One integer or ``(z, y, x)``.
    value
        The constant padded in; by default the volume's minimum (air for HU, 0 after a window).
    """
    multiples = _triple(multiple, "multiple")
    if any(m < 1 or m != int(m) for m in multiples):
        raise ValueError(f"multiple must be positive integers, got {multiple!r}")
    widths = []
    for n, m in zip(volume.shape_zyx, multiples):
        total = (-n) % int(m)
        widths.append((total // 2, total - total // 2))
    fill = float(np.min(volume.array_zyx)) if value is None and volume.array_zyx.size else float(value or 0.0)
    array = np.pad(volume.array_zyx, widths, mode="constant", constant_values=fill)
    out = Volume(
        array_zyx=array,
        affine_lps=_shift_origin(volume.affine_lps, tuple(-w[0] for w in widths)),
    )
    pad = (widths[0], widths[1], widths[2])
    record = _record(
        "pad_to_multiple",
        {"multiple": tuple(int(m) for m in multiples), "value": value},
        volume,
        out,
        pad_widths_zyx=pad,
        statistics=MappingProxyType({"fill": fill}),
    )
    return out, record


# ----------------------------------------------------------------------------------------- intensity


def clip(volume: Volume, *, min: float, max: float) -> tuple[Volume, PreprocessRecord]:  # noqa: A002
    """Clip intensities to ``[min, max]`` (HU for CT), as float32."""
    if min >= max:
        raise ValueError(f"clip needs min < max, got {min} and {max}")
    out = volume.with_array(np.clip(_as_float32(volume.array_zyx), min, max).astype(np.float32))
    return out, _record("clip", {"min": min, "max": max}, volume, out)


def normalize(
    volume: Volume,
    *,
    mode: str = "window",
    min: float | None = None,  # noqa: A002
    max: float | None = None,  # noqa: A002
) -> tuple[Volume, PreprocessRecord]:
    """Normalise intensities.

    Parameters
    ----------
    mode
        ``"window"``: clip to ``[min, max]`` and map linearly to ``[0, 1]`` (both required).
        ``"zscore"``: subtract the mean and divide by the standard deviation, computed over the
        voxels inside ``[min, max]`` when given (e.g. the body above -500 HU), else over all voxels.
    """
    array = _as_float32(volume.array_zyx)
    if mode == "window":
        if min is None or max is None or min >= max:
            raise ValueError("normalize mode='window' needs min < max")
        scaled = (np.clip(array, min, max) - np.float32(min)) / np.float32(max - min)
        out = volume.with_array(scaled.astype(np.float32))
        return out, _record("normalize", {"mode": mode, "min": min, "max": max}, volume, out)
    if mode == "zscore":
        selected = array
        if min is not None or max is not None:
            lo = -np.inf if min is None else min
            hi = np.inf if max is None else max
            selected = array[(array >= lo) & (array <= hi)]
        mean = float(selected.mean()) if selected.size else 0.0
        std = float(selected.std()) if selected.size else 1.0
        std = std if std > 0 else 1.0
        out = volume.with_array(((array - np.float32(mean)) / np.float32(std)).astype(np.float32))
        return out, _record(
            "normalize",
            {"mode": mode, "min": min, "max": max},
            volume,
            out,
            statistics=MappingProxyType({"mean": mean, "std": std}),
        )
    raise ValueError(f"normalize mode must be 'window' or 'zscore', got {mode!r}")


def denoise(
    volume: Volume, *, method: str = "median", size: int = 3, sigma_mm: float = 1.0
) -> tuple[Volume, PreprocessRecord]:
    """Denoise with a median or mean filter (``size`` voxels per axis) or a Gaussian (``sigma_mm``)."""
    array = _as_float32(volume.array_zyx)
    if method == "median":
        result = ndimage.median_filter(array, size=size, mode="nearest")
    elif method == "mean":
        result = ndimage.uniform_filter(array, size=size, mode="nearest")
    elif method == "gaussian":
        sigma = tuple(sigma_mm / s for s in volume.spacing_mm)
        result = ndimage.gaussian_filter(array, sigma=sigma, mode="nearest")
    else:
        raise ValueError(f"denoise method must be 'median', 'gaussian' or 'mean', got {method!r}")
    out = volume.with_array(result.astype(np.float32))
    return out, _record("denoise", {"method": method, "size": size, "sigma_mm": sigma_mm}, volume, out)


def contrast_stretch(
    volume: Volume, *, lower_percentile: float = 1.0, upper_percentile: float = 99.0
) -> tuple[Volume, PreprocessRecord]:
    """Map the ``lower``–``upper`` percentile range linearly to ``[0, 1]`` (clipped outside)."""
    if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
        raise ValueError("contrast_stretch needs 0 <= lower_percentile < upper_percentile <= 100")
    array = _as_float32(volume.array_zyx)
    lo, hi = (float(v) for v in np.percentile(array, [lower_percentile, upper_percentile]))
    scale = hi - lo if hi > lo else 1.0
    stretched = np.clip((array - np.float32(lo)) / np.float32(scale), 0.0, 1.0)
    out = volume.with_array(stretched.astype(np.float32))
    return out, _record(
        "contrast_stretch",
        {"lower_percentile": lower_percentile, "upper_percentile": upper_percentile},
        volume,
        out,
        statistics=MappingProxyType({"lower": lo, "upper": hi}),
    )


def histogram_equalize(volume: Volume, *, bins: int = 256) -> tuple[Volume, PreprocessRecord]:
    """Histogram equalisation to ``[0, 1]``: each voxel becomes the cumulative fraction of its bin."""
    array = _as_float32(volume.array_zyx)
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        result = np.zeros_like(array)
    else:
        histogram, edges = np.histogram(array, bins=bins, range=(lo, hi))
        cdf = np.cumsum(histogram).astype(np.float64)
        cdf /= cdf[-1]
        result = np.interp(array.ravel(), edges[1:], cdf).reshape(array.shape).astype(np.float32)
    out = volume.with_array(result)
    return out, _record(
        "histogram_equalize",
        {"bins": bins},
        volume,
        out,
        statistics=MappingProxyType({"min": lo, "max": hi}),
    )


# ------------------------------------------------------------------------------------- lung mask


def segment_lungs_classical(
    volume: Volume,
    *,
    threshold_hu: float = -400.0,
    seed_hu: float = -700.0,
    body_threshold_hu: float = -500.0,
    closing_mm: float = 6.0,
    min_fraction: float = 0.2,
    working_spacing_mm: float = 2.0,
) -> NDArray[np.bool_]:
    """The classical lung mask on the volume's grid: threshold, region growing, morphology.

    1. Work on a grid decimated to about ``working_spacing_mm`` (integer strides; speed).
    2. Body: largest component above ``body_threshold_hu``, holes filled per slice (so the lungs and
       the air in them are inside, the air around the patient is not).
    3. Region growing: from seeds inside the body below ``seed_hu`` through connected voxels below
       ``threshold_hu``; keep the two largest grown regions of at least ``min_fraction`` of the
       largest (both lungs whether joined or not; bowel gas and a detached trachea fall away).
    4. Morphology: closing with a ball of ``closing_mm`` and hole filling per slice, which brings
       vessels and nodules inside the lungs into the mask; limited to the body.
    5. Back to the full grid by nearest neighbour.

    Returns
    -------
    NDArray[bool]
        ``[k, j, i]`` on the volume's grid; all False when no lungs are found.
    """
    array = volume.array_zyx
    strides = tuple(max(1, int(round(working_spacing_mm / s))) for s in volume.spacing_mm)
    work = np.ascontiguousarray(array[:: strides[0], :: strides[1], :: strides[2]])
    work_volume = Volume(
        array_zyx=work,
        affine_lps=volume.affine_lps @ np.diag([strides[2], strides[1], strides[0], 1.0]),
    )
    body = body_mask(work_volume, threshold_hu=body_threshold_hu)
    candidates = body & (work < threshold_hu)
    # Region growing from the seeds through the candidates = the candidate components that hold a
    # seed (one labelling pass instead of an iterated geodesic dilation).
    labels, count = ndimage.label(candidates)
    seeded = np.unique(labels[candidates & (work < seed_hu)])
    seeded = seeded[seeded > 0]
    if count == 0 or seeded.size == 0:
        return np.zeros(volume.shape_zyx, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    ranked = sorted((int(v) for v in seeded), key=lambda v: int(sizes[v]), reverse=True)[:2]
    keep = [v for v in ranked if sizes[v] >= min_fraction * sizes[ranked[0]]]
    lungs = np.isin(labels, keep)

    spacing = work_volume.spacing_mm
    radius = tuple(max(0, int(round(closing_mm / s))) for s in spacing)
    if any(radius):
        lungs = _close(lungs, radius)
    lungs = _fill_holes_per_slice(lungs) & body

    # Nearest neighbour back to the full grid: voxel k takes working voxel k // stride.
    for axis, stride in enumerate(strides):
        if stride > 1:
            lungs = np.repeat(lungs, stride, axis=axis)
    nz, ny, nx = volume.shape_zyx
    return np.ascontiguousarray(lungs[:nz, :ny, :nx])


_BALL_3D = ndimage.generate_binary_structure(3, 2)  # 18-neighbourhood: a rounded 3x3x3 step
_BALL_IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
_BALL_IN_SLICE[1] = True  # 8-neighbourhood within the slice
_LINE_ACROSS = np.zeros((3, 3, 3), dtype=bool)
_LINE_ACROSS[:, 1, 1] = True


def _close(mask: NDArray[np.bool_], radius_zyx: Sequence[int]) -> NDArray[np.bool_]:
    """Binary closing with a rounded element of about ``radius_zyx`` voxels, on the mask's box only.

    The element is a Minkowski sum of small steps (18-neighbourhood for the radius all axes share,
    then in-slice or across-slice steps for the rest), applied as iterated dilations then erosions:
    about ten times faster than one ball-shaped element of the same size on a 300x256x256 grid.
    """
    box = _box_of(mask, 0.0, (1.0, 1.0, 1.0))
    if box is None:
        return mask
    rz, ry, rx = (int(r) for r in radius_zyx)
    common = min(rz, ry, rx)
    steps = [(_BALL_3D, common), (_BALL_IN_SLICE, min(ry, rx) - common), (_LINE_ACROSS, rz - common)]
    steps = [(structure, n) for structure, n in steps if n > 0]
    pad = (rz, max(ry, rx), max(ry, rx))
    region = tuple(slice(lo, hi) for lo, hi in box)
    work = np.pad(mask[region], [(p, p) for p in pad])
    for structure, n in steps:
        work = ndimage.binary_dilation(work, structure=structure, iterations=n)
    for structure, n in steps:
        work = ndimage.binary_erosion(work, structure=structure, iterations=n, border_value=1)
    out = mask.copy()
    out[region] = work[tuple(slice(p, p + n) for p, n in zip(pad, mask[region].shape))]
    return out


# ------------------------------------------------------------------------------------------- plans

_OPERATIONS: Mapping[str, Callable[..., tuple[Volume, PreprocessRecord]]] = MappingProxyType(
    {
        "crop_lungs": crop_lungs,
        "crop_body": crop_body,
        "resample": resample,
        "clip": clip,
        "normalize": normalize,
        "denoise": denoise,
        "contrast_stretch": contrast_stretch,
        "histogram_equalize": histogram_equalize,
        "pad_to_multiple": pad_to_multiple,
    }
)

#: The operation names `run_plan` accepts (equal to `models.spec.KNOWN_PREPROCESS_OPS`).
OPERATIONS: tuple[str, ...] = tuple(_OPERATIONS)


def run_plan(volume: Volume, steps: Sequence[Any]) -> tuple[Volume, tuple[PreprocessRecord, ...]]:
    """Run a manifest's preprocessing plan.

    Parameters
    ----------
    steps
        `models.spec.StepSpec` items (anything with ``.op`` and ``.params``), e.g.
        ``StepSpec("resample", {"spacing_mm": (2.0, 2.0, 2.0)})``.

    Returns
    -------
    tuple
        The network's input volume and one record per step, in order.

    Raises
    ------
    ValueError
        An unknown operation or parameters the operation does not take (a manifest error).
    """
    records: list[PreprocessRecord] = []
    for step in steps:
        operation = _OPERATIONS.get(step.op)
        if operation is None:
            raise ValueError(f"unknown preprocessing op {step.op!r}; use one of {', '.join(OPERATIONS)}")
        params = dict(step.params)
        try:
            inspect.signature(operation).bind(volume, **params)
        except TypeError as exc:
            raise ValueError(f"preprocessing op {step.op!r}: {exc}") from exc
        started = time.perf_counter()
        volume, record = operation(volume, **params)
        records.append(record)
        logger.debug(
            "event=preprocess_step op=%s shape=%s seconds=%.3f",
            step.op,
            "x".join(str(n) for n in record.output_shape_zyx),
            time.perf_counter() - started,
        )
    return volume, tuple(records)


def _spatial(array: NDArray[Any]) -> tuple[int, int, int]:
    return tuple(int(n) for n in array.shape[-3:])  # type: ignore[return-value]


#: Resampling to at least this many voxels runs in slabs along the output's first axis, on several
#: threads (numpy's gathers and arithmetic release the GIL). Mapping a 150×150×186 probability map back
#: to a 300×429×531 source crop (the larger benchmark patient) took 0.19–0.28 s on 2 threads and
#: 0.34–0.43 s in slabs on one, against 0.50 s in one pass, with a peak of 458 MB, 367 MB and 738 MB of
#: numpy memory (tracemalloc): the slabs' temporaries stay small and in cache.
PARALLEL_RESAMPLE_MIN_VOXELS = 2_000_000
#: Slabs per thread (at least 2 threads' worth): smaller slabs bound the temporaries alive at once.
_SLABS_PER_THREAD = 4

_AxisSamples = tuple[NDArray[np.intp], "NDArray[np.intp] | None", "NDArray[np.float32] | None"]


def resample_threads() -> int:
    """Threads for one resampling: the CPUs this process may use, at most 4."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


def _axis_samples(n: int, step: float, size: int, order: int) -> _AxisSamples:
    """Source indices (and linear weights) that output indices ``0..n-1`` sample along one axis."""
    x = np.clip(np.arange(n, dtype=np.float64) * step, 0.0, size - 1)
    if order == 0:
        return np.floor(x + 0.5).astype(np.intp), None, None
    lower = np.floor(x).astype(np.intp)
    return lower, np.minimum(lower + 1, size - 1), (x - lower).astype(np.float32)


def _resample_separable(array: NDArray[Any], samples: Sequence[_AxisSamples], dtype: np.dtype[Any]) -> NDArray[Any]:
    out = array
    for axis, (lower, upper, weight) in enumerate(samples):
        if upper is None or weight is None:
            out = np.take(out, lower, axis=axis)
            continue
        weight_shape = [1] * out.ndim
        weight_shape[axis] = len(lower)
        low = np.take(out, lower, axis=axis).astype(np.float32, copy=False)
        high = np.take(out, upper, axis=axis).astype(np.float32, copy=False)
        high -= low
        high *= weight.reshape(weight_shape)
        low += high
        out = low
    if out.dtype != dtype:
        integer = np.issubdtype(dtype, np.integer)
        out = (np.rint(out) if integer else out).astype(dtype)
    return out


def _resample_array(
    array: NDArray[Any], step: Sequence[float], shape: Sequence[int], order: int, *, threads: int | None = None,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """Sample ``array`` at ``o * step`` for each output index ``o`` (``shape``), edges repeated.

    Orders 0 and 1 are separable, one axis at a time (twice as fast as `scipy.ndimage.affine_transform`
    for linear and six times for nearest, same values); higher orders use splines via
    ``affine_transform``. The dtype is kept (integer input to order ≥ 1 is rounded). An output of at
    least `PARALLEL_RESAMPLE_MIN_VOXELS` is computed in slabs along its first axis, on ``threads``
    threads (default `resample_threads`); every voxel gets the same value as in one pass. ``out``
    (of ``shape`` and the array's dtype; a view, e.g. a crop box of a larger array, will do) receives
    the result and is returned.
    """
    if out is not None and (tuple(out.shape) != tuple(int(n) for n in shape) or out.dtype != array.dtype):
        raise ValueError(f"out is {out.dtype} {out.shape}, expected {array.dtype} {tuple(shape)}")
    if all(abs(s - 1.0) < 1e-9 for s in step) and tuple(array.shape) == tuple(shape):
        return _into(out, array) if out is not None else array.copy()
    if order > 1:
        return _into(out, ndimage.affine_transform(
            array,
            np.array(step, dtype=np.float64),
            offset=0.0,
            output_shape=tuple(shape),
            order=order,
            mode="nearest",
            prefilter=True,
        ))
    samples = [_axis_samples(int(n), float(st), size, order) for st, n, size in zip(step, shape, array.shape)]
    threads = resample_threads() if threads is None else threads
    slabs = min(max(threads, 2) * _SLABS_PER_THREAD, int(shape[0]))
    if slabs < 2 or int(np.prod(shape)) < PARALLEL_RESAMPLE_MIN_VOXELS:
        return _into(out, _resample_separable(array, samples, array.dtype))
    if out is None:
        out = np.empty(tuple(int(n) for n in shape), dtype=array.dtype)
    lower, upper, weight = samples[0]

    def fill(bounds: tuple[int, int]) -> None:
        a, b = bounds
        first = int(lower[a:b].min())
        last = int((lower if upper is None else upper)[a:b].max())
        local: _AxisSamples = (lower[a:b] - first, None if upper is None else upper[a:b] - first,
                               None if weight is None else weight[a:b])
        out[a:b] = _resample_separable(array[first:last + 1], [local, *samples[1:]], array.dtype)

    edges = np.linspace(0, int(shape[0]), slabs + 1).round().astype(int).tolist()
    bounds = list(zip(edges[:-1], edges[1:]))
    if threads < 2:
        for pair in bounds:
            fill(pair)
        return out
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resample") as pool:
        for _ in pool.map(fill, bounds):
            pass
    return out


def _into(out: NDArray[Any] | None, result: NDArray[Any]) -> NDArray[Any]:
    """``result``, or ``out`` holding a copy of it."""
    if out is None:
        return result
    out[...] = result
    return out


def _resample_channels(
    array: NDArray[Any], step: Sequence[float], shape: Sequence[int], order: int, out: NDArray[Any] | None = None
) -> NDArray[Any]:
    """`_resample_array` of ``[k, j, i]`` or of each channel of ``[c, k, j, i]`` (into ``out`` if given)."""
    if array.ndim == 3:
        return _resample_array(array, step, shape, order, out=out)
    if out is None:
        return np.stack([_resample_array(a, step, shape, order) for a in array])
    for channel, a in enumerate(array):
        _resample_array(a, step, shape, order, out=out[channel])
    return out


def invert_to_source(
    array_zyx_or_czyx: NDArray[Any],
    records: Sequence[PreprocessRecord],
    *,
    order: int = 0,
    out: NDArray[Any] | None = None,
) -> NDArray[Any]:
    """Map an array on the preprocessed grid back onto the source grid of ``records[0]``.

    Parameters
    ----------
    array_zyx_or_czyx
        A prediction on the last record's output grid: ``[k, j, i]`` or ``[c, k, j, i]`` (channels are
        mapped independently).
    records
        The records `run_plan` returned, in order.
    order
        0 for label maps (nearest, values kept exactly), 1 for probabilities (linear).
    out
        Optional destination of the result's shape (e.g. one channel of a preallocated
        ``[c, k, j, i]`` array): written in place, which saves a source-sized temporary.

    Returns
    -------
    NDArray
        The same dtype, with the source volume's shape (and the channel axis if given); its affine is
        ``records[0].source_affine_lps``. Voxels outside a crop are 0 (background). ``out`` when given.

    Raises
    ------
    ValueError
        The array's grid is not the plan's output grid, or ``out`` has the wrong shape.
    """
    array = np.asarray(array_zyx_or_czyx)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected [k, j, i] or [c, k, j, i], got shape {array.shape}")
    geometric = [r for r in records if r.changes_grid]
    if records and _spatial(array) != records[-1].output_shape_zyx:
        raise ValueError(
            f"array grid {_spatial(array)} is not the plan's output grid {records[-1].output_shape_zyx}"
        )
    lead = array.shape[:-3]
    if out is not None and records and tuple(out.shape) != lead + records[0].source_shape_zyx:
        raise ValueError(f"out has shape {out.shape}, expected {lead + records[0].source_shape_zyx}")
    backwards = list(reversed(geometric))

    def uncropped(record: PreprocessRecord, n: int) -> NDArray[Any]:
        """Zeros on the grid before crop step ``record`` (the ``n``-th step undone): ``out`` for the last."""
        if n == len(backwards) - 1 and out is not None:
            out.fill(0)
            return out
        return np.zeros(lead + record.source_shape_zyx, dtype=array.dtype)

    placed = False  # the previous step (a resampling) wrote straight into this crop's box
    for n, record in enumerate(backwards):
        if placed:
            placed = False
            continue
        following = backwards[n + 1] if n + 1 < len(backwards) else None
        if (record.op == "resample" and record.step_zyx is not None and following is not None
                and following.crop_box_zyx is not None):
            # Resample straight into the crop's box of the larger grid: no crop-sized temporary and
            # no copy of it (on a 512x512x300 source, 270 MB per channel).
            (k0, k1), (j0, j1), (i0, i1) = following.crop_box_zyx
            full = uncropped(following, n + 1)
            inverse = tuple(1.0 / s for s in record.step_zyx)
            _resample_channels(array, inverse, record.source_shape_zyx, order, out=full[..., k0:k1, j0:j1, i0:i1])
            array, placed = full, True
            continue
        if record.op == "pad_to_multiple" and record.pad_widths_zyx is not None:
            (a0, _), (b0, _), (c0, _) = record.pad_widths_zyx
            nz, ny, nx = record.source_shape_zyx
            array = array[..., a0 : a0 + nz, b0 : b0 + ny, c0 : c0 + nx]
        elif record.crop_box_zyx is not None:
            (k0, k1), (j0, j1), (i0, i1) = record.crop_box_zyx
            full = uncropped(record, n)
            full[..., k0:k1, j0:j1, i0:i1] = array
            array = full
        elif record.op == "resample" and record.step_zyx is not None:
            inverse = tuple(1.0 / s for s in record.step_zyx)
            array = _resample_channels(array, inverse, record.source_shape_zyx, order)
    if out is not None:
        if array is not out:
            out[...] = array
        return out
    return np.ascontiguousarray(array)


def replay_plan(
    volume: Volume, records: Sequence[PreprocessRecord], *, order: int = 0, fill: float = 0.0
) -> Volume:
    """Apply the recorded geometry (crops, resampling, padding) to another array of the source grid.

    For training labels: ``replay_plan(volume.with_array(labels), records, order=0)`` lands on the
    same grid as the preprocessed image. Intensity steps are skipped; padding uses ``fill``.

    Raises
    ------
    ValueError
        ``volume`` is not on the plan's source grid.
    """
    if records and (
        volume.shape_zyx != records[0].source_shape_zyx
        or not np.allclose(volume.affine_lps, records[0].source_affine_lps)
    ):
        raise ValueError("the volume is not on the plan's source grid")
    array = volume.array_zyx
    for record in records:
        if not record.changes_grid:
            continue
        if record.op == "pad_to_multiple" and record.pad_widths_zyx is not None:
            array = np.pad(array, record.pad_widths_zyx, mode="constant", constant_values=fill)
        elif record.crop_box_zyx is not None:
            (k0, k1), (j0, j1), (i0, i1) = record.crop_box_zyx
            array = array[k0:k1, j0:j1, i0:i1].copy()
        elif record.op == "resample" and record.step_zyx is not None:
            array = _resample_channels(array, record.step_zyx, record.output_shape_zyx, order)
    affine = records[-1].output_affine_lps.copy() if records else volume.affine_lps.copy()
    return Volume(array_zyx=array, affine_lps=affine)
