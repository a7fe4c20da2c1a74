"""The candidate stage's parts: eigenvalues, the dot filter, detection, patches, scoring, painting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.candidates import (
    Candidate,
    detect_candidates,
    dot_filter,
    lps_to_index,
    paint_candidates,
    sample_patches,
    score_candidates,
    symmetric_eigenvalues,
    window,
)
from pipeline.postprocess import plan_label_map
from pipeline.types import Volume
from tests.pipeline.synthetic_chest import LUNG_LABEL, NODULE_LABEL


def _affine(spacing_zyx: tuple[float, float, float], origin: tuple[float, float, float] = (-40.0, 25.0, 7.0)
            ) -> np.ndarray:
    affine = np.diag([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0], 1.0])
    affine[:3, 3] = origin
    return affine


def _box_of_lung(shape: tuple[int, int, int], spacing: float) -> tuple[np.ndarray, np.ndarray, Any]:
    """Soft tissue (40 HU) around a box of lung (-850 HU) three voxels in from every face: the HU
    array, the lung mask and ``distance_mm(centre)``, each voxel's distance from a voxel index in mm."""
    kk, jj, ii = np.indices(shape).astype(np.float64) * spacing
    hu = np.full(shape, 40.0)
    lung = np.zeros(shape, dtype=bool)
    lung[3:-3, 3:-3, 3:-3] = True
    hu[lung] = -850.0

    def distance_mm(centre: np.ndarray) -> np.ndarray:
        return np.sqrt((kk - centre[0] * spacing) ** 2 + (jj - centre[1] * spacing) ** 2
                       + (ii - centre[2] * spacing) ** 2)

    return hu, lung, distance_mm


def _windowed(hu: np.ndarray, spacing: float) -> Volume:
    """HU → the network's window (0 = -1000 HU, 1 = 400 HU) on an isotropic grid."""
    return Volume(((hu + 1000.0) / 1400.0).astype(np.float32), _affine((spacing,) * 3))


def _lung_with(shape: tuple[int, int, int], spacing: float = 2.0) -> tuple[Volume, np.ndarray, np.ndarray]:
    """A box of lung (-850 HU) in soft tissue, with a solid ball (r 4 mm) and a vessel (r 2 mm) in it;
    returns the windowed image (0 = -1000 HU, 1 = 400 HU), the lung mask and the ball's centre (k, j, i)."""
    hu, lung, distance_mm = _box_of_lung(shape, spacing)
    centre = np.array([shape[0] // 2, shape[1] // 3, shape[2] // 3])
    ball = distance_mm(centre) <= 4.0
    _, jj, ii = np.indices(shape).astype(np.float64) * spacing
    vessel = ((jj - 2 * shape[1] // 3 * spacing) ** 2 + (ii - 2 * shape[2] // 3 * spacing) ** 2 <= 2.0 ** 2) & lung
    hu[ball | vessel] = 40.0
    return _windowed(hu, spacing), lung, centre


def test_closed_form_eigenvalues_match_numpy_including_repeated_ones() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 3, 3))
    a = a + a.transpose(0, 2, 1)
    a[:3] = np.eye(3) * 2.0  # triple eigenvalue
    a[3] = np.diag([1.0, 1.0, -2.0])  # double
    expected = np.linalg.eigvalsh(a)
    got = np.stack(symmetric_eigenvalues(a[:, 0, 0], a[:, 1, 1], a[:, 2, 2], a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]), 1)
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_the_dot_filter_answers_a_ball_far_more_than_a_vessel_of_its_width() -> None:
    image, lung, centre = _lung_with((24, 40, 40))
    response = dot_filter(image.array_zyx, 1.0, lung)
    at_ball = response[tuple(centre)]
    k = centre[0]
    at_vessel = response[k, 2 * 40 // 3 - 1:2 * 40 // 3 + 2, 2 * 40 // 3 - 1:2 * 40 // 3 + 2].max()
    assert at_ball > 5 * at_vessel and at_ball > 0.01
    assert response[~lung].max() == 0.0  # only inside the region
    assert response[5, 5, 5] == 0.0  # flat lung: nothing


def test_detection_ranks_the_ball_first_and_leaves_out_what_is_already_found() -> None:
    image, lung, centre = _lung_with((24, 40, 40))
    kwargs = dict(scales_mm=(2.0, 3.0), min_level=0.12, min_response=0.005, max_candidates=10)
    found = detect_candidates(image, lung, **kwargs)
    assert found, "the ball must be a candidate"
    first = np.rint(lps_to_index(image, np.asarray([found[0].center_lps_mm]))[0]).astype(int)
    assert np.abs(first - centre).max() <= 1
    assert found[0].response == max(c.response for c in found)
    assert 3.0 <= found[0].radius_mm <= 6.0  # the ball's radius is 4 mm
    covered = np.zeros(lung.shape, dtype=bool)
    covered[tuple(slice(c - 3, c + 4) for c in centre)] = True
    rest = detect_candidates(image, lung, covered_zyx=covered, **kwargs)
    assert all(not covered[tuple(np.rint(lps_to_index(image, np.asarray([c.center_lps_mm]))[0]).astype(int))]
               for c in rest)
    assert len(detect_candidates(image, lung, **{**kwargs, "max_candidates": 1})) == 1
    assert detect_candidates(image, np.zeros_like(lung), **kwargs) == []
    with pytest.raises(ValueError, match="lung mask"):
        detect_candidates(image, lung[1:], **kwargs)


def test_patches_are_resampled_from_the_source_at_the_stage_spacing() -> None:
    # A linear image (value = LPS x + 2 y + 3 z) on an anisotropic grid: trilinear sampling is exact.
    shape, spacing = (20, 30, 40), (2.5, 0.8, 0.7)
    volume = Volume(np.zeros(shape, dtype=np.float32), _affine(spacing))
    lps = volume.index_to_lps(np.argwhere(np.ones(shape, dtype=bool)).astype(np.float64))
    volume = volume.with_array((lps[:, 0] + 2 * lps[:, 1] + 3 * lps[:, 2]).reshape(shape).astype(np.float32))
    centre = volume.index_to_lps(np.asarray([[10.0, 15.0, 20.0]]))[0]
    patches = sample_patches(volume, [centre], size=5, spacing_mm=1.25)
    assert patches.shape == (1, 5, 5, 5)
    offsets = (np.arange(5) - 2) * 1.25
    expected = (centre[0] + offsets[None, None, :] + 2 * (centre[1] + offsets[None, :, None])
                + 3 * (centre[2] + offsets[:, None, None]))
    np.testing.assert_allclose(patches[0], expected, atol=1e-3)
    outside = sample_patches(volume, [centre + 1000.0], size=3, spacing_mm=1.0)
    assert np.all(outside == -1000.0)
    assert sample_patches(volume, [], size=4, spacing_mm=1.0).shape == (0, 4, 4, 4)
    np.testing.assert_allclose(window(np.array([-1200.0, -300.0, 900.0], dtype=np.float32), -1000, 400),
                               [0.0, 0.5, 1.0])


def test_scores_are_the_classifiers_probabilities_shifted_by_the_bias() -> None:
    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3, 4)).reshape(-1, 1) * 4.0 - 2.0

    patches = np.stack([np.zeros((4, 4, 4)), np.full((4, 4, 4), 0.5), np.ones((4, 4, 4))]).astype(np.float32)
    scores = score_candidates(Mean(), patches, bias=1.0, batch_size=2)
    np.testing.assert_allclose(scores, 1.0 / (1.0 + np.exp(-np.array([-1.0, 1.0, 3.0]))))
    assert score_candidates(Mean(), patches[:0]).shape == (0,)


def test_axial_turns_average_the_logits_of_the_cube_turned_in_the_axial_plane() -> None:
    class Corner(torch.nn.Module):
        """A classifier that looks at one voxel off the axis of the axial turns: each turn sees another."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, 1, 0, 0].reshape(-1, 1)

    cube = np.zeros((1, 3, 2, 2), dtype=np.float32)
    cube[0, 1] = [[1.0, 2.0], [4.0, 8.0]]  # the four corners of the middle slice
    one = score_candidates(Corner(), cube)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    np.testing.assert_allclose(logit(one), [1.0])
    np.testing.assert_allclose(logit(score_candidates(Corner(), cube, axial_turns=4)), [(1 + 2 + 4 + 8) / 4])
    np.testing.assert_allclose(logit(score_candidates(Corner(), cube, axial_turns=2)), [(1 + 8) / 2])
    # the other axes are never turned: only the middle slice's corners are ever seen
    cube[0, 0] = cube[0, 2] = 100.0
    np.testing.assert_allclose(logit(score_candidates(Corner(), cube, axial_turns=4)), [(1 + 2 + 4 + 8) / 4])
    with pytest.raises(ValueError, match="axial_turns"):
        score_candidates(Corner(), cube, axial_turns=3)


def test_accepted_candidates_are_painted_as_balls_of_their_radius() -> None:
    spacing = (2.0, 0.5, 0.5)
    volume = Volume(np.zeros((30, 80, 80), dtype=np.float32), _affine(spacing))
    probability = np.zeros(volume.shape_zyx, dtype=np.float32)
    probability[0, 0, 0] = 0.99  # kept where already higher
    centre = volume.index_to_lps(np.asarray([[15.0, 40.0, 40.0]]))[0]
    far = volume.index_to_lps(np.asarray([[5.0, 10.0, 10.0]]))[0]
    scale = 6.0 / math.sqrt(3.0)  # radius 6 mm
    candidates = [Candidate(tuple(centre), scale, 1.0), Candidate(tuple(far), scale, 0.5)]
    painted = paint_candidates(probability, volume, candidates, [0.98, 0.6], min_score=0.97)
    assert painted == 1
    ball = probability == np.float32(0.98)
    volume_mm3 = ball.sum() * 2.0 * 0.5 * 0.5
    assert abs(volume_mm3 - 4.0 / 3.0 * math.pi * 6.0 ** 3) / (4.0 / 3.0 * math.pi * 6.0 ** 3) < 0.1
    assert probability[15, 40, 40] == np.float32(0.98) and probability[5, 10, 10] == 0.0
    assert probability[0, 0, 0] == np.float32(0.99)


def test_an_accepted_candidate_outbids_the_lung_around_it_in_the_label_map() -> None:
    """The network gives the lung around a missed nodule 0.999 and more; a candidate accepted at 0.98
    must still become nodule voxels, not vanish under the lung label."""
    spacing = (2.0, 0.5, 0.5)
    volume = Volume(np.zeros((30, 80, 80), dtype=np.float32), _affine(spacing))
    lung = np.full(volume.shape_zyx, 0.9995, dtype=np.float32)
    nodule = np.full(volume.shape_zyx, 0.0005, dtype=np.float32)
    centre = volume.index_to_lps(np.asarray([[15.0, 40.0, 40.0]]))[0]
    candidate = Candidate(tuple(centre), 4.0 / math.sqrt(3.0), 1.0)
    labels = [LUNG_LABEL, NODULE_LABEL]
    assert paint_candidates(nodule, volume, [candidate], [0.98], min_score=0.97, others=[lung]) == 1
    label_map = plan_label_map({1: lung, 2: nodule}, labels)
    assert label_map[15, 40, 40] == 2
    assert abs(float(lung[15, 40, 40]) - 0.02) < 1e-6
    ball_mm3 = (label_map == 2).sum() * 2.0 * 0.5 * 0.5
    assert abs(ball_mm3 - 4.0 / 3.0 * math.pi * 4.0 ** 3) / (4.0 / 3.0 * math.pi * 4.0 ** 3) < 0.15
    assert label_map[15, 40, 60] == 1 and lung[15, 40, 60] == np.float32(0.9995)  # outside the ball


def test_a_candidate_on_a_component_reported_already_leaves_it_as_it_is() -> None:
    """Where the ball already holds the acceptance probability (the network's own nodule, or an earlier
    candidate's ball), painting would only swell that nodule into a ball: the candidate is passed over."""
    spacing = (2.0, 0.5, 0.5)
    volume = Volume(np.zeros((30, 80, 80), dtype=np.float32), _affine(spacing))
    nodule = np.zeros(volume.shape_zyx, dtype=np.float32)
    nodule[15, 40, 40] = 0.99  # the network's nodule: one confident voxel in the ball
    lung = 1.0 - nodule
    before = (nodule.copy(), lung.copy())
    centre = volume.index_to_lps(np.asarray([[15.0, 41.0, 40.0]]))[0]
    on_it = Candidate(tuple(centre), 4.0 / math.sqrt(3.0), 1.0)
    assert paint_candidates(nodule, volume, [on_it], [0.995], min_score=0.97, others=[lung]) == 0
    np.testing.assert_array_equal(nodule, before[0])
    np.testing.assert_array_equal(lung, before[1])
    nodule[15, 40, 40] = 0.9  # a component under the peak threshold gets the ball
    assert paint_candidates(nodule, volume, [on_it], [0.995], min_score=0.97, others=[lung]) == 1
    assert nodule[15, 40, 40] == np.float32(0.995)
    twice = [on_it, Candidate(tuple(centre), 3.0 / math.sqrt(3.0), 1.0)]
    assert paint_candidates(np.zeros_like(nodule), volume, twice, [0.98, 0.99], min_score=0.97) == 1


def _at(image: Volume, candidates: list[Candidate], centre: np.ndarray, tolerance: int = 2) -> list[Candidate]:
    """The candidates within ``tolerance`` voxels of ``centre``."""
    return [c for c in candidates
            if np.abs(np.rint(lps_to_index(image, np.asarray([c.center_lps_mm]))[0]) - centre).max() <= tolerance]


def test_filling_outside_the_lungs_makes_a_nodule_on_the_pleura_a_candidate() -> None:
    shape, spacing = (24, 40, 40), 2.0
    kk, jj, ii = np.indices(shape).astype(np.float64) * spacing
    hu = np.full(shape, 40.0)  # chest wall
    lung = np.zeros(shape, dtype=bool)
    lung[3:-3, 3:-3, 6:-3] = True
    hu[lung] = -850.0
    centre = np.array([12, 20, 7])  # one voxel inside the wall at i = 6: a half ball against the pleura
    ball = (kk - centre[0] * spacing) ** 2 + (jj - centre[1] * spacing) ** 2 + (ii - centre[2] * spacing) ** 2 <= 5.0 ** 2
    hu[ball] = 40.0
    image = Volume(((hu + 1000.0) / 1400.0).astype(np.float32), _affine((spacing,) * 3))
    truth = lung | ball  # the lungs as the network draws them: with their nodules
    kwargs = dict(scales_mm=(2.0, 3.0, 4.0), min_level=0.12, min_response=0.005, max_candidates=10)
    plain = _at(image, detect_candidates(image, truth, **kwargs), centre)
    filled = detect_candidates(image, truth, fill_outside_lungs=True, **kwargs)
    assert filled and _at(image, filled[:1], centre), "the nodule on the wall must be the strongest blob"
    assert not plain or filled[0].response > 2.5 * max(c.response for c in plain)


def test_clipping_lets_ground_glass_compete_with_solid_blobs_on_shape() -> None:
    spacing = 2.0
    hu, lung, distance_mm = _box_of_lung((24, 40, 40), spacing)
    solid, glass = np.array([12, 12, 12]), np.array([12, 27, 27])
    for centre, value in ((solid, 40.0), (glass, -550.0)):
        hu[distance_mm(centre) <= 5.0] = value
    image = _windowed(hu, spacing)
    kwargs = dict(scales_mm=(2.0, 3.0, 4.0), min_level=0.12, min_response=0.001, max_candidates=10)

    def ratio(found: list[Candidate]) -> float:
        return max(c.response for c in _at(image, found, glass)) / max(c.response for c in _at(image, found, solid))

    plain = detect_candidates(image, lung, **kwargs)
    clipped = detect_candidates(image, lung, max_level=(-300.0 + 1000.0) / 1400.0, **kwargs)
    assert ratio(plain) < 0.5  # on contrast, ground glass (300 HU above the lung) loses to solid (890)
    assert ratio(clipped) > 1.4 * ratio(plain)
    # ... while a faint blob under the clip level keeps its response
    assert max(c.response for c in _at(image, clipped, glass)) == pytest.approx(
        max(c.response for c in _at(image, plain, glass)), rel=1e-5)


def test_a_solid_nodule_the_network_left_as_a_hole_in_the_lungs_is_a_candidate_at_its_centre() -> None:
    """The network can call the core of a large solid nodule background: a hole in its lung mask.
    The shipped stage fills everything outside that mask with the lungs' median, so without filling
    the hole the nodule's centre would be erased and only its rim would answer the dot filter."""
    from models.spec import load_spec
    from pipeline.run import find_candidates

    stage = load_spec(Path(__file__).resolve().parents[2] / "models" / "chest_ct_nodules").candidates
    spacing = 2.0
    hu, lung, distance_mm = _box_of_lung((30, 44, 44), spacing)
    centre = np.array([15, 22, 22])
    distance = distance_mm(centre)
    hu[distance <= 8.0] = 40.0  # a 16 mm solid nodule
    image = _windowed(hu, spacing)

    def candidates(lung_drawn: np.ndarray) -> list[Candidate]:
        background = np.where(lung_drawn, 0.01, 0.99).astype(np.float32)
        return find_candidates(image, np.stack([background, 1.0 - background, np.zeros_like(background)]), stage)

    intact = candidates(lung)
    assert _at(image, intact[:1], centre, tolerance=0)
    assert candidates(lung & (distance > 6.0)) == intact  # its core a hole: the same candidates
