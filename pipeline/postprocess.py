"""Postprocessing: per-label probabilities on the source grid → label map, findings and their measurements.

Input is the network's softmax output already mapped back onto the source grid
(`pipeline.preprocess.invert_to_source`), channel ``c`` being the probability of the label whose
manifest value is ``c`` (channel 0 = background). Output is a `SegmentationResult`: a uint8 label map with
the source volume's geometry, the measured findings (connected components of the finding labels) and the
study-level result. All measurements are physical, computed with the source affine (LPS mm), never with
voxel counts alone. This module is pure: no I/O, no torch, no DICOM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from models.spec import LabelSpec
from pipeline.types import Finding, SegmentationResult, StudyFinding, Volume

log = logging.getLogger(__name__)

#: 26-connectivity in 3-D: voxels touching by a face, an edge or a corner belong to one component.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

#: Edge refinement (`refine_edge`): a component whose median stands less than this above its
#: surroundings (image units, HU for CT) keeps the network's edge, as there is no edge to find.
EDGE_MIN_CONTRAST = 100.0
#: The surroundings are sampled from this far (mm) outside the component, past its blurred edge.
EDGE_SHELL_GAP_MM = 1.0

#: Slices processed at a time when building the label map, bounding the temporary memory
#: (a 300×512×512 volume would otherwise need ~1 GB of float32 temporaries).
_SLAB_SLICES = 32


class StudyFindingSpecLike(Protocol):
    """What postprocessing reads of the manifest's ``[study_finding]`` (models.spec)."""

    name: str
    threshold: float
    source: str


#: Per-label probabilities: a ``[c, k, j, i]`` array (channel c = label value c), or a mapping from label
#: value to a ``[k, j, i]`` array (the background channel, never read, may be left out).
Probabilities = NDArray[np.floating[Any]] | Mapping[int, NDArray[np.floating[Any]]]


def as_channels(probabilities: Probabilities) -> Mapping[int, NDArray[np.floating[Any]]]:
    """Per-label ``[k, j, i]`` views of ``probabilities`` keyed by label value (no copy).

    Raises
    ------
    ValueError
        A 4-D array was expected, or the channels' grids differ.
    """
    if isinstance(probabilities, Mapping):
        channels = dict(probabilities)
    else:
        if probabilities.ndim != 4:
            raise ValueError(f"probabilities must be [c, k, j, i], got shape {probabilities.shape}")
        channels = {c: probabilities[c] for c in range(probabilities.shape[0])}
    shapes = {tuple(a.shape) for a in channels.values()}
    if len(shapes) > 1 or any(len(shape) != 3 for shape in shapes):
        raise ValueError(f"every probability channel must be [k, j, i] on one grid, got shapes {sorted(shapes)}")
    return channels


def plan_label_map(
    probabilities_czyx: Probabilities,
    labels: Sequence[LabelSpec],
) -> NDArray[np.uint8]:
    """Decide the label of every voxel from per-label probabilities and thresholds.

    A voxel gets the foreground label ``c`` whose probability is highest among the labels that reach
    their own ``LabelSpec.threshold``; a voxel where no foreground label reaches its threshold is
    background (0). With softmax outputs and thresholds of 0.5 this equals the arg-max; a lower
    threshold on a finding label makes the detector more sensitive without retraining.

    Parameters
    ----------
    probabilities_czyx
        ``[c, k, j, i]`` probabilities, ``c`` = label value (0 = background, ignored here), or a
        mapping label value → ``[k, j, i]``.
    labels
        The manifest's labels; their values index the channel axis.

    Returns
    -------
    NDArray[np.uint8]
        Label map ``[k, j, i]``.

    Raises
    ------
    ValueError
        If a label's value has no channel, or the array is not 4-D.
    """
    channels = as_channels(probabilities_czyx)
    for spec in labels:
        if spec.value <= 0 or spec.value not in channels:
            raise ValueError(
                f"label {spec.name!r} has value {spec.value} but the model gives channels {sorted(channels)}"
            )
    label_map = np.zeros(next(iter(channels.values())).shape, dtype=np.uint8)
    for start in range(0, label_map.shape[0], _SLAB_SLICES):
        stop = min(start + _SLAB_SLICES, label_map.shape[0])
        best = np.full((stop - start, *label_map.shape[1:]), -np.inf, dtype=np.float32)
        slab = label_map[start:stop]
        for spec in sorted(labels, key=lambda s: s.value):
            p = np.asarray(channels[spec.value][start:stop], dtype=np.float32)
            take = (p >= spec.threshold) & (p > best)
            # copyto with a mask, not boolean indexing: 0.26 s against 0.31 s for 300×512×512.
            np.copyto(slab, np.uint8(spec.value), where=take)
            np.copyto(best, p, where=take)
    return label_map


def voxel_volume_mm3(affine_lps: NDArray[np.float64]) -> float:
    """Volume of one voxel in mm³ (|det| of the affine's 3×3 part)."""
    return float(abs(np.linalg.det(affine_lps[:3, :3])))


def longest_axial_diameter_mm(mask_zyx: NDArray[np.bool_], affine_lps: NDArray[np.float64]) -> float:
    """Longest in-slice extent of a mask in mm, the usual "longest axial diameter" of a nodule.

    For each slice, the largest distance between two pixel centres of the mask's boundary, measured in
    LPS mm with the affine (so anisotropic or non-square pixels are measured correctly), plus the size
    of one pixel along that line (pixel centres lie half a pixel inside the edges; a single pixel thus
    measures one pixel). The maximum over slices is returned; 0.0 for an empty mask.

    Parameters
    ----------
    mask_zyx
        Boolean mask ``[k, j, i]`` (a bounding-box crop is fine: only in-plane distances are used).
    affine_lps
        The volume's affine; columns 0 and 1 give the LPS step of one column and one row.
    """
    col_step = affine_lps[:3, 0]
    row_step = affine_lps[:3, 1]
    spacing_i = float(np.linalg.norm(col_step))
    spacing_j = float(np.linalg.norm(row_step))
    best = 0.0
    for k in range(mask_zyx.shape[0]):
        plane = mask_zyx[k]
        if not plane.any():
            continue
        edge = plane & ~ndimage.binary_erosion(plane, border_value=0)
        jj, ii = np.nonzero(edge)
        points_ji = np.stack([jj, ii], axis=1).astype(np.float64)
        points_ji = _hull_points(points_ji)
        xyz = points_ji[:, 1:2] * col_step + points_ji[:, 0:1] * row_step
        diff = xyz[:, None, :] - xyz[None, :, :]
        dist2 = np.einsum("abk,abk->ab", diff, diff)
        a, b = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
        length = math.sqrt(float(dist2[a, b]))
        if length == 0.0:
            length_mm = max(spacing_i, spacing_j)  # one pixel (or a line of pixels across the plane)
        else:
            di, dj = points_ji[a, 1] - points_ji[b, 1], points_ji[a, 0] - points_ji[b, 0]
            # Pixel size along the direction (di, dj): the step that moves one pixel's extent along it.
            cos_i = abs(di) * spacing_i / length
            sin_j = abs(dj) * spacing_j / length
            along = 1.0 / math.sqrt((cos_i / spacing_i) ** 2 + (sin_j / spacing_j) ** 2)
            length_mm = length + along
        best = max(best, length_mm)
    return best


def _hull_points(points_ji: NDArray[np.float64]) -> NDArray[np.float64]:
    """Reduce a large point set to its convex hull's vertices (the farthest pair lies on the hull)."""
    if len(points_ji) <= 256:
        return points_ji
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points_ji)
    except QhullError:  # collinear points: the two ends are the lexicographic first and last
        order = np.lexsort((points_ji[:, 1], points_ji[:, 0]))
        return points_ji[[int(order[0]), int(order[-1])]]
    return points_ji[hull.vertices]


def postprocess(
    probabilities_czyx: Probabilities,
    source_hu: Volume,
    labels: Sequence[LabelSpec],
    *,
    study_logit: float | None = None,
    study_finding: StudyFindingSpecLike | None = None,
    keep_probabilities: bool = False,
) -> SegmentationResult:
    """Turn probabilities on the source grid into a label map, measured findings and a study result.

    Steps: `plan_label_map` (per-label thresholds); per label, connected components with
    26-connectivity (`scipy.ndimage.label`), removing components smaller than
    ``LabelSpec.min_size_mm3`` and those whose highest probability stays under
    ``LabelSpec.peak_threshold`` (hysteresis); each surviving component of a label with ``is_finding``
    becomes a `Finding` with volume (mL), longest axial diameter (mm, `longest_axial_diameter_mm`),
    centroid (LPS mm), mean and standard deviation of HU, and score (mean probability of its label
    inside it).
    When a label has more components than ``LabelSpec.max_findings`` (> 0), only the highest-scoring
    ones are kept, in the findings and in the label map. Findings are ordered by label value, then by
    decreasing size; ``Finding.index`` counts from 1 in that
    order over all finding labels (it becomes the SR tracking identifier "finding <index>").

    The study-level score is the sigmoid of ``study_logit`` when the manifest's study finding takes its
    score from the model head (``source = "head"``) and the model gave one; otherwise the highest finding
    score (0.0 without findings). ``present`` = score ≥ threshold.

    Parameters
    ----------
    probabilities_czyx
        ``[c, k, j, i]`` float probabilities on the source grid (same k, j, i as ``source_hu``), or a
        mapping label value → ``[k, j, i]`` (see `Probabilities`).
    source_hu
        The source volume in HU with its affine; gives the geometry and the HU statistics.
    labels
        The manifest's labels (background excluded), values = channel indices.
    study_logit
        The model head's study-level logit, if it has one.
    study_finding
        The manifest's study finding (name, threshold, source). Without one, the first finding label's
        name, threshold 0.5 and the highest finding score are used.
    keep_probabilities
        Keep each label's probability map in the result (needed for a FRACTIONAL SEG).

    Returns
    -------
    SegmentationResult

    Raises
    ------
    ValueError
        If the probabilities' grid differs from the source volume's, or a label has no channel.
    """
    channels = as_channels(probabilities_czyx)
    grid = tuple(next(iter(channels.values())).shape)
    if grid != source_hu.shape_zyx:
        raise ValueError(
            f"probabilities grid {grid} differs from the source grid {source_hu.shape_zyx}; "
            "map them back with pipeline.preprocess.invert_to_source first"
        )
    label_map = plan_label_map(probabilities_czyx, labels)
    voxel_mm3 = voxel_volume_mm3(source_hu.affine_lps)
    findings: list[Finding] = []
    for spec in sorted(labels, key=lambda s: s.value):
        refine = spec.edge_refinement != "none"
        if not spec.is_finding and spec.min_size_mm3 <= 0 and spec.peak_threshold <= 0 and not refine:
            continue  # nothing to remove, nothing to report: spare the labelling of a large organ
        crop = _bounding_box(label_map == spec.value)
        if crop is None:
            continue
        components, count = ndimage.label(label_map[crop] == spec.value, structure=CONNECTIVITY_26)
        min_voxels = spec.min_size_mm3 / voxel_mm3 if voxel_mm3 > 0 else 0.0
        probability = channels[spec.value]
        removed = weak = refined = 0
        kept: list[tuple[Finding, tuple[slice, ...], NDArray[np.bool_]]] = []
        for number, local in enumerate(ndimage.find_objects(components), start=1):
            if local is None:
                continue
            mask = components[local] == number
            box = tuple(slice(c.start + b.start, c.start + b.stop) for c, b in zip(crop, local, strict=True))
            if int(mask.sum()) < min_voxels:
                label_map[box][mask] = 0
                removed += 1
            elif spec.peak_threshold > 0 and float(np.max(probability[box][mask])) < spec.peak_threshold:
                label_map[box][mask] = 0
                weak += 1
            else:
                if refine:
                    box, mask, changed = _refine_component(spec, mask, box, label_map, probability, labels, source_hu)
                    refined += changed
                if spec.is_finding:
                    kept.append((_measure(spec, mask, box, source_hu, probability, voxel_mm3), box, mask))
        if spec.max_findings and len(kept) > spec.max_findings:
            # A model gone wrong (or a series it does not suit) can fire hundreds of components: keep the
            # most probable ones so the report stays readable and its encoding bounded.
            kept.sort(key=lambda item: (-item[0].score, -item[0].voxel_count))
            for _, box, mask in kept[spec.max_findings:]:
                label_map[box][mask] = 0
            log.info("event=findings_capped label=%s found=%d kept=%d", spec.name, len(kept), spec.max_findings)
            kept = kept[:spec.max_findings]
        findings.extend(finding for finding, _, _ in kept)
        if removed or weak:
            log.debug("event=components_removed label=%s small=%d min_size_mm3=%s weak=%d peak_threshold=%s",
                      spec.name, removed, spec.min_size_mm3, weak, spec.peak_threshold)
        if refine:
            log.debug("event=edges_refined label=%s method=%s components=%d", spec.name, spec.edge_refinement,
                      refined)
    findings.sort(key=lambda f: (f.label_value, -f.voxel_count, f.centroid_lps_mm))
    findings = [_with_index(f, n) for n, f in enumerate(findings, start=1)]
    probabilities: dict[int, NDArray[np.float32]] = {}
    if keep_probabilities:
        probabilities = {s.value: np.asarray(channels[s.value], dtype=np.float32) for s in labels}
    return SegmentationResult(
        label_map=source_hu.with_array(label_map),
        labels=tuple(sorted(labels, key=lambda s: s.value)),
        findings=tuple(findings),
        study_finding=decide_study_finding(findings, labels, study_logit=study_logit, study_finding=study_finding),
        probabilities=probabilities,
    )


def decide_study_finding(
    findings: Sequence[Finding],
    labels: Sequence[LabelSpec],
    *,
    study_logit: float | None,
    study_finding: StudyFindingSpecLike | None,
) -> StudyFinding | None:
    """The study-level result (see `postprocess`); ``None`` when the model has no finding label and no
    study finding (e.g. a pure organ segmentation model)."""
    finding_labels = [s for s in labels if s.is_finding]
    if study_finding is None and not finding_labels:
        return None
    name = study_finding.name if study_finding is not None else finding_labels[0].name
    threshold = float(study_finding.threshold) if study_finding is not None else 0.5
    source = study_finding.source if study_finding is not None else "max_component_score"
    if source == "head" and study_logit is not None:
        score = 1.0 / (1.0 + math.exp(-float(study_logit))) if study_logit > -700 else 0.0
    else:
        score = max((f.score for f in findings), default=0.0)
    return StudyFinding(name=name, score=float(score), present=bool(score >= threshold), threshold=threshold)


def _bounding_box(mask: NDArray[np.bool_]) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3-D mask, or None when it has none."""
    bounds = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(present) == 0:
            return None
        bounds.append(slice(int(present[0]), int(present[-1]) + 1))
    return bounds[0], bounds[1], bounds[2]


def refine_edge(
    component: NDArray[np.bool_],
    core: NDArray[np.bool_],
    image: NDArray[Any],
    probability: NDArray[Any],
    spacing_zyx_mm: Sequence[float],
    *,
    margin_mm: float,
    min_probability: float,
) -> NDArray[np.bool_] | None:
    """Redraw a component's edge where the image crosses halfway from its surroundings to its inside.

    A blurred object's edge lies where the image is halfway between the object and what surrounds it
    (the half maximum), which is finer than the network's working grid: on 60 phantoms outside the
    held-out set, the default model's nodules had 0.88 of their true volume, and redrawing them this
    way raised nodule Dice from 0.822 to 0.860 and from 0.685 to 0.726 on two halves of 30.

    The surroundings are the lower quartile of ``image`` over the shell from `EDGE_SHELL_GAP_MM` to
    ``margin_mm`` outside the component (the parenchyma rather than the vessels and walls it
    touches); the inside is the median over the component's voxels that stand at least
    `EDGE_MIN_CONTRAST` above the surroundings (the object, not the parenchyma a generous component
    also holds: a candidate's ball, or a network's edge drawn wide). The network's confident voxels
    (``core``) are kept only where they reach the level, and of those only the piece nearest the
    component's centre: a confident region drawn wider than the nodule, or a candidate's ball around
    a small one, shrinks to the nodule instead of keeping the parenchyma and the vessel ends it holds.
    The new mask is the connected part, containing that core, of the core plus the voxels within
    ``margin_mm`` of ``component`` whose value reaches the level and whose probability reaches
    ``min_probability`` (so the edge cannot run along a vessel or the pleura beyond the margin, nor
    where the network sees nothing). On the 100 development phantoms (seeds 50000-50099, 75 with
    nodules) these two steps raised nodule Dice from 0.807 to 0.828 (0.805 to 0.825 and 0.809 to 0.830
    on their two halves), with the same detections and 0.65 against 0.66 false positives per scan.

    All arrays cover the same box, which should extend ``margin_mm`` beyond the component. Returns
    None (keep the component as it is) when ``core`` is empty, the shell is too small to sample, or
    no voxel of the component stands `EDGE_MIN_CONTRAST` above the surroundings.
    """
    if not core.any():
        return None
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    distance = ndimage.distance_transform_edt(~component, sampling=spacing)
    near = distance <= margin_mm
    shell = near & (distance > EDGE_SHELL_GAP_MM)
    if int(shell.sum()) < 10:
        return None
    outside = float(np.percentile(image[shell], 25))
    standing = component & (image >= outside + EDGE_MIN_CONTRAST)
    if not standing.any():
        return None
    inside = float(np.median(image[standing]))
    level = 0.5 * (inside + outside)
    bright_core = core & (image >= level)
    if bright_core.any():
        core = _piece_nearest(bright_core, np.argwhere(component).mean(axis=0), spacing)
    candidate = (near & (image >= level) & (probability >= min_probability)) | core
    parts, _ = ndimage.label(candidate, structure=CONNECTIVITY_26)
    keep = np.unique(parts[core])
    return np.isin(parts, keep[keep > 0])


def _piece_nearest(mask: NDArray[np.bool_], point_zyx: NDArray[np.float64],
                   spacing_zyx_mm: Sequence[float]) -> NDArray[np.bool_]:
    """The 26-connected piece of ``mask`` with a voxel nearest ``point_zyx`` (voxel indices; distances
    in mm); ``mask`` itself when it is one piece."""
    pieces, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    if count <= 1:
        return mask
    points = np.argwhere(pieces > 0)
    d2 = (((points - point_zyx) * np.asarray(spacing_zyx_mm, dtype=np.float64)) ** 2).sum(axis=1)
    k, j, i = points[int(np.argmin(d2))]
    return pieces == pieces[k, j, i]


def _refine_component(
    spec: LabelSpec,
    mask: NDArray[np.bool_],
    box: tuple[slice, ...],
    label_map: NDArray[np.uint8],
    probability: NDArray[np.floating[Any]],
    labels: Sequence[LabelSpec],
    source_hu: Volume,
) -> tuple[tuple[slice, ...], NDArray[np.bool_], bool]:
    """Apply `refine_edge` to one kept component in ``label_map``; returns its new box and mask.

    The component may take background voxels and those of labels that are not findings (the lung
    around a nodule); never those of another finding. Voxels it gives up get the label most common
    around it in the box (the lung around a nodule), findings aside.
    """
    spacing = source_hu.spacing_mm
    pad = [int(math.ceil(spec.edge_margin_mm / s)) + 1 for s in spacing]
    big = tuple(slice(max(b.start - p, 0), min(b.stop + p, n))
                for b, p, n in zip(box, pad, label_map.shape, strict=True))
    inner = tuple(slice(b.start - g.start, b.stop - g.start) for b, g in zip(box, big, strict=True))
    component = np.zeros(tuple(g.stop - g.start for g in big), dtype=bool)
    component[inner] = mask
    local = np.asarray(probability[big], dtype=np.float32)
    core = component & (local >= max(spec.threshold, spec.peak_threshold))
    new = refine_edge(component, core, np.asarray(source_hu.array_zyx[big]), local, spacing,
                      margin_mm=spec.edge_margin_mm, min_probability=spec.edge_min_probability)
    if new is None:
        return box, mask, False
    region = label_map[big]
    protected = [label.value for label in labels if label.is_finding or label.value == spec.value]
    new &= component | ~np.isin(region, protected)
    dropped = component & ~new
    if dropped.any():
        around = region[~component & ~new]
        values, counts = np.unique(around[~np.isin(around, protected)], return_counts=True)
        region[dropped] = values[np.argmax(counts)] if len(values) else 0
    region[new] = spec.value
    return big, new, True


def _measure(
    spec: LabelSpec,
    mask: NDArray[np.bool_],
    box: tuple[slice, ...],
    source_hu: Volume,
    probability: NDArray[Any],
    voxel_mm3: float,
) -> Finding:
    kk, jj, ii = np.nonzero(mask)
    offset = np.array([box[0].start, box[1].start, box[2].start], dtype=np.float64)
    centroid_kji = np.array([kk.mean(), jj.mean(), ii.mean()]) + offset
    centroid = source_hu.index_to_lps(centroid_kji)
    hu = np.asarray(source_hu.array_zyx[box][mask], dtype=np.float64)
    prob = np.asarray(probability[box][mask], dtype=np.float64)
    count = int(mask.sum())
    return Finding(
        label=spec.name,
        label_value=spec.value,
        index=0,
        volume_ml=count * voxel_mm3 / 1000.0,
        diameter_mm=longest_axial_diameter_mm(mask, source_hu.affine_lps),
        centroid_lps_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        mean_hu=float(hu.mean()),
        std_hu=float(hu.std()),
        score=float(prob.mean()),
        voxel_count=count,
        slice_indices=tuple(int(k) + box[0].start for k in np.unique(kk)),
    )


def _with_index(finding: Finding, index: int) -> Finding:
    return replace(finding, index=index)


def locate_findings(result: SegmentationResult) -> NDArray[np.uint16]:
    """Map every voxel of a finding to its ``Finding.index`` (0 elsewhere), on the result's grid.

    See `finding_regions`, which this paints into a volume.

    Raises
    ------
    ValueError
        If a finding matches no component (the result was not made by `postprocess`).
    """
    index_map = np.zeros(result.label_map.array_zyx.shape, dtype=np.uint16)
    for index, (box, mask) in finding_regions(result).items():
        index_map[box][mask] = index
    return index_map


def finding_regions(result: SegmentationResult) -> dict[int, tuple[tuple[slice, ...], NDArray[np.bool_]]]:
    """Where each finding lies: ``Finding.index`` → (its bounding box on the result's grid, its voxels
    as a mask of that box's shape).

    The findings' components are found again in the label map, inside the bounding box of each finding
    label, with the same 26-connectivity, and matched by voxel count and centroid (computed exactly as
    `postprocess` did); so the encoders need no extra state in `SegmentationResult`. Boxes, not a
    volume: the SEG encoder paints each finding's segment into its box alone.

    Raises
    ------
    ValueError
        If a finding matches no component (the result was not made by `postprocess`).
    """
    label_map = result.label_map.array_zyx
    regions: dict[int, tuple[tuple[slice, ...], NDArray[np.bool_]]] = {}
    by_label: dict[int, dict[int, list[Finding]]] = {}
    for finding in result.findings:
        by_label.setdefault(finding.label_value, {}).setdefault(finding.voxel_count, []).append(finding)
    for value, by_count in by_label.items():
        crop = _bounding_box(label_map == value)
        if crop is None:
            continue
        components, _ = ndimage.label(label_map[crop] == value, structure=CONNECTIVITY_26)
        for number, local in enumerate(ndimage.find_objects(components), start=1):
            if local is None:
                continue
            mask = components[local] == number
            candidates = by_count.get(int(mask.sum()))
            if not candidates:
                continue
            box = tuple(slice(c.start + b.start, c.start + b.stop) for c, b in zip(crop, local, strict=True))
            kk, jj, ii = np.nonzero(mask)
            centroid_kji = np.array([kk.mean(), jj.mean(), ii.mean()]) + np.array([b.start for b in box], dtype=np.float64)
            centroid = result.label_map.index_to_lps(centroid_kji)
            for finding in candidates:
                if finding.index not in regions and np.allclose(finding.centroid_lps_mm, centroid, atol=1e-6, rtol=0.0):
                    regions[finding.index] = (box, mask)
                    break
    missing = [f.index for f in result.findings if f.index not in regions]
    if missing:
        raise ValueError(f"findings {missing} match no component of the label map")
    return regions
