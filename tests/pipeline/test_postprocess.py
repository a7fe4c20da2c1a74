"""Postprocessing: thresholds, components, physical measurements, study-level result."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.spec import StudyFindingSource, StudyFindingSpec
from pipeline.postprocess import (
    locate_findings,
    longest_axial_diameter_mm,
    plan_label_map,
    postprocess,
)
from pipeline.types import SegmentationResult, Volume
from tests.pipeline.synthetic_chest import (
    LUNG_LABEL,
    NODULE_LABEL,
    chest_model_spec,
    probabilities_from_truth,
    write_chest_series,
)


def _volume(shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Volume:
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    return Volume(array_zyx=np.zeros(shape, dtype=np.float32), affine_lps=affine)


def _probabilities(nodule: np.ndarray, lung: np.ndarray | None = None, p: float = 0.9) -> np.ndarray:
    out = np.zeros((3, *nodule.shape), dtype=np.float32)
    if lung is not None:
        out[1][lung] = 0.8
    out[2][nodule] = p
    out[0] = 1.0 - out[1] - out[2]
    return out


def test_label_map_uses_each_labels_own_threshold() -> None:
    probabilities = np.zeros((3, 1, 1, 4), dtype=np.float32)
    probabilities[:, 0, 0, 0] = (0.6, 0.3, 0.1)  # background wins
    probabilities[:, 0, 0, 1] = (0.2, 0.7, 0.1)  # lung
    probabilities[:, 0, 0, 2] = (0.4, 0.25, 0.35)  # nodule reaches a lowered threshold of 0.3
    probabilities[:, 0, 0, 3] = (0.1, 0.45, 0.45)  # tie: the lower label value keeps it
    sensitive = replace(NODULE_LABEL, threshold=0.3)
    lung = replace(LUNG_LABEL, threshold=0.4)
    assert plan_label_map(probabilities, [lung, sensitive])[0, 0].tolist() == [0, 1, 2, 1]


def test_label_map_rejects_a_label_without_a_channel() -> None:
    with pytest.raises(ValueError, match="channels"):
        plan_label_map(np.zeros((2, 1, 2, 2), dtype=np.float32), [LUNG_LABEL, NODULE_LABEL])


def test_components_below_the_minimum_size_are_removed_and_not_reported() -> None:
    volume = _volume((6, 20, 20))
    nodule = np.zeros(volume.shape_zyx, dtype=bool)
    nodule[1:4, 2:6, 2:6] = True  # 48 mm³, kept (min 10 mm³)
    nodule[5, 15, 15] = True  # 1 mm³, removed
    result = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, NODULE_LABEL])
    assert [f.voxel_count for f in result.findings] == [48]
    assert result.label_map.array_zyx[5, 15, 15] == 0
    assert int((result.label_map.array_zyx == 2).sum()) == 48


def test_diagonal_neighbours_form_one_component_with_26_connectivity() -> None:
    volume = _volume((4, 10, 10))
    nodule = np.zeros(volume.shape_zyx, dtype=bool)
    nodule[0:2, 0:3, 0:3] = True
    nodule[2:4, 3:6, 3:6] = True  # touches the first block only by a corner
    result = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, NODULE_LABEL])
    assert len(result.findings) == 1 and result.findings[0].voxel_count == 36


def test_sphere_measurements_match_its_physical_size(tmp_path: Path) -> None:
    chest = write_chest_series(tmp_path, nodules=[((12.0, 32.0, 20.0), 5.0)])
    volume = Volume(array_zyx=chest.hu_zyx, affine_lps=chest.affine_lps)
    spec = chest_model_spec()
    result = postprocess(probabilities_from_truth(chest), volume, spec.labels, study_finding=spec.study_finding)
    (finding,) = result.findings
    assert finding.label == "nodule" and finding.index == 1
    assert finding.volume_ml == pytest.approx(4 / 3 * math.pi * 5.0**3 / 1000, rel=0.08)
    assert finding.diameter_mm == pytest.approx(10.0, abs=0.8)
    expected = chest.affine_lps[:3, :3] @ np.array([20.0, 32.0, 12.0]) + chest.affine_lps[:3, 3]
    assert np.allclose(finding.centroid_lps_mm, expected, atol=0.05)
    assert finding.mean_hu == pytest.approx(30.0, abs=2.0)
    assert 2.0 < finding.std_hu < 8.0  # the written noise has σ = 5 HU
    assert finding.score == pytest.approx(0.9)
    assert finding.slice_indices == (10, 11, 12, 13, 14)


def test_diameter_is_measured_in_mm_with_anisotropic_pixels() -> None:
    mask = np.zeros((1, 10, 30), dtype=bool)
    mask[0, 4, 5:15] = True  # 10 columns in a row
    affine = np.diag([0.5, 2.0, 3.0, 1.0])  # columns 0.5 mm apart, rows 2 mm
    assert longest_axial_diameter_mm(mask, affine) == pytest.approx(5.0)
    vertical = np.zeros((1, 10, 30), dtype=bool)
    vertical[0, 2:6, 7] = True  # 4 rows
    assert longest_axial_diameter_mm(vertical, affine) == pytest.approx(8.0)
    single = np.zeros((1, 3, 3), dtype=bool)
    single[0, 1, 1] = True
    assert longest_axial_diameter_mm(single, affine) == pytest.approx(2.0)


def test_diameter_ignores_the_slice_direction() -> None:
    mask = np.zeros((20, 5, 5), dtype=bool)
    mask[:, 2, 2] = True  # a long thin column along z: one pixel per slice
    assert longest_axial_diameter_mm(mask, np.eye(4)) == pytest.approx(1.0)


def test_study_score_comes_from_the_head_when_the_manifest_says_so() -> None:
    volume = _volume((4, 8, 8))
    nodule = np.zeros(volume.shape_zyx, dtype=bool)
    nodule[1:3, 2:5, 2:5] = True
    head = StudyFindingSpec("nodule present", NODULE_LABEL.type, threshold=0.5, source=StudyFindingSource.HEAD)
    result = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, NODULE_LABEL], study_logit=-2.0, study_finding=head)
    assert result.study_finding is not None
    assert result.study_finding.score == pytest.approx(1 / (1 + math.exp(2.0)))
    assert result.study_finding.present is False
    no_logit = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, NODULE_LABEL], study_finding=head)
    assert no_logit.study_finding is not None and no_logit.study_finding.score == pytest.approx(0.9)


def test_study_without_findings_is_absent_with_score_zero() -> None:
    volume = _volume((4, 8, 8))
    lung = np.zeros(volume.shape_zyx, dtype=bool)
    lung[:, 1:7, 1:7] = True
    spec = chest_model_spec()
    result = postprocess(
        _probabilities(np.zeros_like(lung), lung), volume, spec.labels, study_finding=spec.study_finding
    )
    assert result.findings == ()
    assert result.study_finding is not None
    assert (result.study_finding.score, result.study_finding.present) == (0.0, False)
    assert int((result.label_map.array_zyx == 1).sum()) == int(lung.sum())


def test_probabilities_on_another_grid_are_refused() -> None:
    with pytest.raises(ValueError, match="invert_to_source"):
        postprocess(np.zeros((3, 2, 4, 4), dtype=np.float32), _volume((3, 4, 4)), [LUNG_LABEL, NODULE_LABEL])


def test_findings_are_ordered_by_size_and_located_again_exactly() -> None:
    volume = _volume((8, 20, 20))
    nodule = np.zeros(volume.shape_zyx, dtype=bool)
    nodule[1:3, 1:4, 1:4] = True  # 18 voxels
    nodule[4:8, 10:15, 10:15] = True  # 100 voxels
    result = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, NODULE_LABEL], keep_probabilities=True)
    assert [f.voxel_count for f in result.findings] == [100, 18]
    assert [f.index for f in result.findings] == [1, 2]
    index_map = locate_findings(result)
    assert int((index_map == 1).sum()) == 100 and index_map[5, 12, 12] == 1
    assert int((index_map == 2).sum()) == 18 and index_map[1, 1, 1] == 2
    assert set(result.probabilities) == {1, 2}


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(1, 7))))
def test_findings_partition_the_finding_label_exactly(nodule: np.ndarray) -> None:
    volume = _volume(nodule.shape, spacing_zyx=(2.0, 0.5, 0.7))
    label = replace(NODULE_LABEL, min_size_mm3=0.0)
    result = postprocess(_probabilities(nodule), volume, [LUNG_LABEL, label])
    assert np.array_equal(result.label_map.array_zyx == 2, nodule)
    assert sum(f.voxel_count for f in result.findings) == int(nodule.sum())
    assert sum(f.volume_ml for f in result.findings) == pytest.approx(nodule.sum() * 0.7 * 0.5 * 2.0 / 1000)
    index_map = locate_findings(result)
    assert np.array_equal(index_map > 0, nodule)
    for finding in result.findings:
        assert int((index_map == finding.index).sum()) == finding.voxel_count
        assert finding.diameter_mm >= 0.5


def test_diameter_of_a_long_diagonal_line_uses_its_two_ends() -> None:
    mask = np.zeros((1, 400, 400), dtype=bool)
    idx = np.arange(300)
    mask[0, idx + 50, 350 - idx] = True  # 300 pixels on an anti-diagonal: collinear, beyond the hull cut-off
    expected = math.hypot(299, 299) + 1.0  # centre to centre, plus one pixel along the line
    assert longest_axial_diameter_mm(mask, np.eye(4)) == pytest.approx(expected)


def test_max_findings_keeps_the_most_probable_components_and_erases_the_rest() -> None:
    nodule = np.zeros((3, 20, 20), dtype=bool)
    for n in range(5):
        nodule[1, 2 + 3 * n, 2:4] = True  # five separate two-voxel components
    probabilities = _probabilities(nodule, p=0.6)
    probabilities[2, 1, 2 + 3 * 3, 2:4] = 0.95  # component 4 and component 1 are the most probable
    probabilities[2, 1, 2, 2:4] = 0.9
    label = replace(NODULE_LABEL, min_size_mm3=0.0, max_findings=2)
    result = postprocess(probabilities, _volume(nodule.shape), [LUNG_LABEL, label])
    assert sorted(round(f.score, 2) for f in result.findings) == [0.9, 0.95]
    kept = result.label_map.array_zyx == 2
    assert int(kept.sum()) == 4 and kept[1, 11, 2] and kept[1, 2, 2] and not kept[1, 5, 2]
    assert [f.index for f in result.findings] == [1, 2]


def test_peak_threshold_drops_weak_components_and_keeps_the_full_extent_of_strong_ones() -> None:
    nodule = np.zeros((3, 20, 20), dtype=bool)
    nodule[1, 2:6, 2:6] = True  # strong: one voxel at 0.9, the rest of it at 0.5
    nodule[1, 12:16, 12:16] = True  # weak: 0.7 everywhere, never reaching the peak threshold
    probabilities = _probabilities(nodule, p=0.5)
    probabilities[2, 1, 12:16, 12:16] = 0.7
    probabilities[2, 1, 3, 3] = 0.9
    probabilities[0] = 1.0 - probabilities[1] - probabilities[2]
    label = replace(NODULE_LABEL, threshold=0.4, min_size_mm3=0.0, peak_threshold=0.8)
    result = postprocess(probabilities, _volume(nodule.shape), [LUNG_LABEL, label])
    kept = result.label_map.array_zyx == 2
    assert len(result.findings) == 1 and result.findings[0].voxel_count == 16
    assert kept[1, 2:6, 2:6].all() and not kept[1, 12:16, 12:16].any()
    # Off (0): both components stay.
    result = postprocess(probabilities, _volume(nodule.shape), [LUNG_LABEL, replace(label, peak_threshold=0.0)])
    assert len(result.findings) == 2


# --- Edge refinement (``edge_refinement = "half_max"``) -------------------------------------------------

_EDGE_SPACING = (1.0, 0.7, 0.7)
_EDGE_LABEL = replace(NODULE_LABEL, peak_threshold=0.9, edge_refinement="half_max", edge_margin_mm=3.0,
                      edge_min_probability=0.2)


def _distance_mm(shape: tuple[int, int, int], center_zyx: tuple[float, float, float]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center_zyx, _EDGE_SPACING)))


def _occupancy(shape: tuple[int, int, int], center_zyx: tuple[float, float, float], radius_mm: float,
               supersample: int = 4) -> np.ndarray:
    """The fraction of each voxel inside a sphere (sampled on a grid ``supersample`` times finer)."""
    n = supersample
    offsets = (np.arange(n) + 0.5) / n - 0.5
    grid = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape)
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                d2 = sum(((g + o - c) * s) ** 2 for g, o, c, s in zip(grid, (dz, dy, dx), center_zyx, _EDGE_SPACING))
                out += d2 <= radius_mm**2
    return out / n**3


def _blurred_ct(occupancy: np.ndarray, inside_hu: float, outside_hu: float = -850.0) -> Volume:
    """A CT of an object (voxel occupancy 0..1, inside_hu) in lung (outside_hu), blurred like a scanner
    (σ 0.8 mm)."""
    from scipy import ndimage

    hu = (outside_hu + (inside_hu - outside_hu) * occupancy).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, [0.8 / s for s in _EDGE_SPACING])
    affine = np.diag([_EDGE_SPACING[2], _EDGE_SPACING[1], _EDGE_SPACING[0], 1.0])
    return Volume(array_zyx=hu, affine_lps=affine)


def _network_guess(distance: np.ndarray, radius_mm: float, halo_mm: float = 2.5) -> np.ndarray:
    """What a network draws: nodule probability 0.95 in the core, 0.7 over the last 1.5 mm to
    ``radius_mm``, 0.3 in a halo beyond it; lung (0.8) elsewhere."""
    out = np.zeros((3, *distance.shape), dtype=np.float32)
    out[2] = np.select([distance <= radius_mm - 1.5, distance <= radius_mm, distance <= radius_mm + halo_mm],
                       [0.95, 0.7, 0.3], 0.0)
    out[1] = np.where(out[2] >= 0.5, 0.04, 0.8)
    out[0] = 1.0 - out[1] - out[2]
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _without_and_with_refinement(
    probabilities: np.ndarray, ct: Volume,
) -> tuple[SegmentationResult, SegmentationResult, np.ndarray, np.ndarray]:
    """Postprocess with the network's edges and with the half-maximum edges: both results and their
    nodule masks."""
    plain = postprocess(probabilities, ct, [LUNG_LABEL, replace(_EDGE_LABEL, edge_refinement="none")])
    refined = postprocess(probabilities, ct, [LUNG_LABEL, _EDGE_LABEL])
    return plain, refined, plain.label_map.array_zyx == 2, refined.label_map.array_zyx == 2


@pytest.mark.parametrize("drawn_radius_mm", [3.5, 6.0])
def test_half_max_refinement_redraws_a_nodule_at_its_true_edge(drawn_radius_mm: float) -> None:
    shape = (30, 50, 50)
    distance = _distance_mm(shape, (15, 25, 25))
    occupancy = _occupancy(shape, (15, 25, 25), 5.0)
    truth = occupancy >= 0.5  # the voxels the nodule fills at least half of
    ct = _blurred_ct(occupancy, 30.0)
    probabilities = _network_guess(distance, drawn_radius_mm)
    plain, refined, before, after = _without_and_with_refinement(probabilities, ct)
    assert _dice(before, truth) < 0.8
    assert _dice(after, truth) > 0.9
    true_ml = float(truth.sum()) * math.prod(_EDGE_SPACING) / 1000.0
    assert len(refined.findings) == 1
    error, plain_error = (abs(r.findings[0].volume_ml - true_ml) for r in (refined, plain))
    assert error < 0.25 * true_ml and error < plain_error / 2
    assert refined.findings[0].voxel_count == int(after.sum())
    # Voxels the nodule gives up go to the label around it (lung), not background.
    given_up = before & ~after
    assert given_up.any() == (drawn_radius_mm > 5.0)
    assert (refined.label_map.array_zyx[given_up] == 1).all()


def test_half_max_refinement_stays_within_its_margin_and_where_the_network_sees_something() -> None:
    shape = (30, 50, 60)
    distance = _distance_mm(shape, (15, 25, 25))
    occupancy = _occupancy(shape, (15, 25, 25), 5.0)
    nodule = occupancy >= 0.5
    wall = np.zeros(shape, dtype=bool)
    wall[:, :, 32:] = True  # a chest wall the nodule touches (x ≥ 22.4 mm; the nodule reaches 21 mm)
    ct = _blurred_ct(np.maximum(occupancy, wall), 30.0)
    probabilities = _network_guess(distance, 4.0)
    probabilities[2][wall & (distance > 5.0)] = 0.3  # the network bleeds a little into the wall
    probabilities[0] = 1.0 - probabilities[1] - probabilities[2]
    result = postprocess(probabilities, ct, [LUNG_LABEL, _EDGE_LABEL])
    after = result.label_map.array_zyx == 2
    assert _dice(after & ~wall, nodule & ~wall) > 0.9
    # Into the wall it grows only up to the margin from what the network drew (4 mm + 3 mm).
    assert after[wall].any() and distance[after].max() <= 4.0 + 3.0 + 0.01
    # Where the network gives less than edge_min_probability, the wall is never taken.
    probabilities[2][wall & (distance > 5.0)] = 0.1
    probabilities[0] = 1.0 - probabilities[1] - probabilities[2]
    result = postprocess(probabilities, ct, [LUNG_LABEL, _EDGE_LABEL])
    assert not (result.label_map.array_zyx == 2)[wall & (distance > 5.0)].any()


def test_half_max_refinement_keeps_the_networks_edge_without_contrast() -> None:
    shape = (30, 50, 50)
    distance = _distance_mm(shape, (15, 25, 25))
    ct = _blurred_ct(_occupancy(shape, (15, 25, 25), 5.0), -820.0)  # 30 HU above the lung: no edge to find
    probabilities = _network_guess(distance, 3.5)
    plain = postprocess(probabilities, ct, [LUNG_LABEL, replace(_EDGE_LABEL, edge_refinement="none")])
    refined = postprocess(probabilities, ct, [LUNG_LABEL, _EDGE_LABEL])
    np.testing.assert_array_equal(refined.label_map.array_zyx, plain.label_map.array_zyx)


def test_half_max_refinement_never_takes_another_nodules_voxels() -> None:
    shape = (30, 50, 60)
    first = _distance_mm(shape, (15, 25, 22))
    second = _distance_mm(shape, (15, 25, 36))  # 9.8 mm apart: 0.8 mm between two 4.5 mm nodules
    occupancy = np.maximum(_occupancy(shape, (15, 25, 22), 4.5), _occupancy(shape, (15, 25, 36), 4.5))
    truth = occupancy >= 0.5
    ct = _blurred_ct(occupancy, 30.0)
    probabilities = np.maximum(_network_guess(first, 3.0), _network_guess(second, 3.0))
    probabilities[1] = np.where(probabilities[2] >= 0.5, 0.04, 0.8)
    probabilities[0] = np.clip(1.0 - probabilities[1] - probabilities[2], 0.0, 1.0)
    result = postprocess(probabilities, ct, [LUNG_LABEL, _EDGE_LABEL])
    after = result.label_map.array_zyx == 2
    assert len(result.findings) == 2
    assert sum(f.voxel_count for f in result.findings) == int(after.sum())
    assert _dice(after, truth) > 0.85


def test_half_max_refinement_shrinks_a_confident_region_drawn_wider_than_the_nodule() -> None:
    # A 5 mm-radius nodule with two vessels ending inside a region the network (or a candidate's ball)
    # calls nodule with confidence out to 8 mm: the nodule is what stays, not the lung or the vessels.
    shape = (30, 50, 50)
    distance = _distance_mm(shape, (15, 25, 25))
    occupancy = _occupancy(shape, (15, 25, 25), 5.0)
    vessels = np.zeros(shape, dtype=bool)
    vessels[14:17, 24:27, :12] = True  # along x, ending 6.4 mm from the centre (2.1 mm x 3 mm)
    vessels[14:17, 38:, 24:27] = True  # along y, ending 9.1 mm from the centre
    truth = occupancy >= 0.5
    ct = _blurred_ct(np.maximum(occupancy, vessels), 30.0)
    probabilities = np.zeros((3, *shape), dtype=np.float32)
    probabilities[2] = np.where(distance <= 8.0, 0.99, 0.0)
    probabilities[1] = np.where(distance <= 8.0, 0.005, 0.8)
    probabilities[0] = 1.0 - probabilities[1] - probabilities[2]
    plain, refined, before, after = _without_and_with_refinement(probabilities, ct)
    assert _dice(before, truth) < 0.5
    assert _dice(after, truth) > 0.9
    assert len(refined.findings) == 1  # the vessel ends inside the region are not reported as nodules
    assert not after[vessels & (distance > 6.5)].any()
    # What the nodule gives up goes back to the lung.
    assert (refined.label_map.array_zyx[before & ~after] == 1).all()
