"""Preprocessing steps: what each does to values and grid, the plan runner, and the classical lung mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.spec import StepSpec
from pipeline.preprocess import (
    OPERATIONS,
    PreprocessRecord,
    clip,
    contrast_stretch,
    crop_body,
    crop_lungs,
    denoise,
    histogram_equalize,
    invert_to_source,
    normalize,
    pad_to_multiple,
    replay_plan,
    resample,
    run_plan,
    segment_lungs_classical,
)
from pipeline.types import Volume
from tests.pipeline.conftest import chest_phantom_hu


def _affine(
    spacing_zyx: tuple[float, float, float], origin: tuple[float, float, float] = (-50.0, 20.0, 7.5)
) -> np.ndarray:
    angle = math.radians(12.0)
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing_zyx[::-1])
    affine[:3, 3] = origin
    return affine


def _phantom_volume(shape: tuple[int, int, int] = (16, 32, 32), spacing=(10.0, 11.0, 11.0)) -> Volume:
    return Volume(chest_phantom_hu(shape), _affine(spacing))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def test_resample_reaches_the_target_spacing_and_keeps_voxel_zero_in_place() -> None:
    volume = Volume(np.zeros((10, 20, 30), dtype=np.float32), _affine((3.0, 1.0, 1.0)))
    out, record = resample(volume, (1.5, 2.0, 2.0))
    assert out.shape_zyx == (20, 10, 15)
    np.testing.assert_allclose(out.spacing_mm, (1.5, 2.0, 2.0))
    np.testing.assert_allclose(out.affine_lps[:3, 3], volume.affine_lps[:3, 3])
    np.testing.assert_allclose(
        out.index_to_lps(np.array([2, 3, 4])), volume.index_to_lps(np.array([1.0, 6.0, 8.0]))
    )
    assert record.step_zyx == pytest.approx((0.5, 2.0, 2.0))
    assert record.changes_grid


def test_linear_resampling_reproduces_a_linear_ramp_exactly_at_interior_points() -> None:
    k = np.arange(10, dtype=np.float32)[:, None, None]
    ramp = np.broadcast_to(k * 10.0, (10, 8, 8)).astype(np.float32)
    out, _ = resample(Volume(ramp, _affine((2.0, 1.0, 1.0))), (1.0, 1.0, 1.0), order=1)
    np.testing.assert_allclose(out.array_zyx[:19, 0, 0], np.arange(19) * 5.0, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
@pytest.mark.parametrize(("step", "shape"), [((0.45, 0.7, 1.3), (40, 33, 15)), ((1.6, 2.0, 0.25), (11, 12, 76)),
                                             ((0.3, 1.0, 1.0), (57, 23, 19))])
def test_resampling_in_slabs_gives_every_voxel_the_single_pass_value(
    monkeypatch: pytest.MonkeyPatch, threads: int, order: int, dtype: type, step: tuple, shape: tuple
) -> None:
    from pipeline import preprocess

    rng = np.random.default_rng(order)
    array = (rng.random((17, 23, 19)) * 200).astype(dtype)
    single = preprocess._resample_array(array, step, shape, order, threads=1)
    monkeypatch.setattr(preprocess, "PARALLEL_RESAMPLE_MIN_VOXELS", 1)
    slabs = preprocess._resample_array(array, step, shape, order, threads=threads)
    assert slabs.shape == single.shape == shape
    assert slabs.dtype == single.dtype == array.dtype
    np.testing.assert_array_equal(slabs, single)


@pytest.mark.parametrize("order", [0, 1, 3])
def test_resampling_matches_scipy_affine_transform_with_edge_repetition(order: int) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(order)
    array = rng.normal(0, 100, size=(9, 13, 11)).astype(np.float32)
    volume = Volume(array, _affine((2.0, 0.7, 0.9)))
    out, record = resample(volume, (0.9, 1.6, 0.45), order=order)
    expected = ndimage.affine_transform(
        array, np.array(record.step_zyx), output_shape=out.shape_zyx, order=order, mode="nearest"
    )
    np.testing.assert_allclose(out.array_zyx, expected, atol=2e-3)
    assert out.array_zyx.dtype == np.float32


def test_clip_limits_the_range_and_keeps_the_grid() -> None:
    volume = _phantom_volume()
    out, record = clip(volume, min=-900.0, max=0.0)
    assert out.array_zyx.dtype == np.float32
    assert out.array_zyx.min() >= -900.0 and out.array_zyx.max() <= 0.0
    np.testing.assert_array_equal(out.affine_lps, volume.affine_lps)
    assert not record.changes_grid and record.params["min"] == -900.0


def test_window_normalisation_maps_the_window_to_zero_one() -> None:
    array = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0], dtype=np.float32).reshape(1, 1, 5)
    out, _ = normalize(Volume(array, np.eye(4)), mode="window", min=-1000.0, max=400.0)
    np.testing.assert_allclose(out.array_zyx.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_zscore_normalisation_gives_zero_mean_unit_deviation_and_records_them() -> None:
    volume = _phantom_volume()
    out, record = normalize(volume, mode="zscore")
    assert abs(float(out.array_zyx.mean())) < 1e-4
    assert float(out.array_zyx.std()) == pytest.approx(1.0, rel=1e-4)
    assert record.statistics["std"] > 0
    with pytest.raises(ValueError):
        normalize(volume, mode="softmax")


@pytest.mark.parametrize("method", ["median", "gaussian", "mean"])
def test_denoising_reduces_noise_in_a_flat_region(method: str) -> None:
    rng = np.random.default_rng(3)
    noisy = (100.0 + rng.normal(0, 20, size=(12, 24, 24))).astype(np.float32)
    out, record = denoise(Volume(noisy, np.eye(4)), method=method, size=3, sigma_mm=1.0)
    assert out.array_zyx.std() < 0.6 * noisy.std()
    assert record.op == "denoise" and record.params["method"] == method


def test_median_denoising_removes_isolated_outliers() -> None:
    array = np.zeros((5, 9, 9), dtype=np.float32)
    array[2, 4, 4] = 1000.0
    out, _ = denoise(Volume(array, np.eye(4)), method="median", size=3)
    assert float(out.array_zyx.max()) == 0.0


def test_contrast_stretching_maps_the_percentiles_to_zero_and_one() -> None:
    array = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out, record = contrast_stretch(Volume(array, np.eye(4)), lower_percentile=10.0, upper_percentile=90.0)
    lo, hi = record.statistics["lower"], record.statistics["upper"]
    assert (lo, hi) == pytest.approx((99.9, 899.1))
    assert out.array_zyx.min() == 0.0 and out.array_zyx.max() == 1.0
    assert float(out.array_zyx.ravel()[500]) == pytest.approx((500 - lo) / (hi - lo), abs=1e-6)


def test_histogram_equalisation_is_monotonic_and_spreads_values_over_zero_one() -> None:
    rng = np.random.default_rng(5)
    array = rng.exponential(100.0, size=(8, 16, 16)).astype(np.float32)
    out, _ = histogram_equalize(Volume(array, np.eye(4)), bins=128)
    flat_in, flat_out = array.ravel(), out.array_zyx.ravel()
    order = np.argsort(flat_in)
    assert np.all(np.diff(flat_out[order]) >= -1e-7)
    assert flat_out.max() == pytest.approx(1.0)
    assert abs(float(np.median(flat_out)) - 0.5) < 0.05


def test_crop_to_body_keeps_the_body_and_shifts_the_origin_to_the_box() -> None:
    volume = _phantom_volume((16, 40, 40))
    out, record = crop_body(volume, margin_mm=0.0)
    (k0, k1), (j0, j1), (i0, i1) = record.crop_box_zyx
    assert out.shape_zyx == (k1 - k0, j1 - j0, i1 - i0)
    assert out.shape_zyx[1] < 40 and out.shape_zyx[2] < 40
    body = volume.array_zyx > -500
    assert body[:, j0:j1, i0:i1].sum() == body.sum()
    np.testing.assert_allclose(
        out.index_to_lps(np.array([0, 0, 0])), volume.index_to_lps(np.array([k0, j0, i0]))
    )


def test_crop_with_margin_grows_the_box_in_millimetres() -> None:
    volume = _phantom_volume((16, 40, 40))
    _, tight = crop_body(volume, margin_mm=0.0)
    _, wide = crop_body(volume, margin_mm=22.0)  # 2 voxels of 11 mm
    (_, _), (j0, j1), (i0, i1) = tight.crop_box_zyx
    assert wide.crop_box_zyx[1] == (max(0, j0 - 2), min(40, j1 + 2))
    assert wide.crop_box_zyx[2] == (max(0, i0 - 2), min(40, i1 + 2))


def test_classical_lung_mask_finds_the_phantom_lungs_with_the_nodule_inside() -> None:
    hu = chest_phantom_hu((24, 64, 64))
    volume = Volume(hu, _affine((8.0, 5.5, 5.5)))
    mask = segment_lungs_classical(volume)
    truth_lungs = (hu < -600) & (hu > -950)  # lung at -850 HU; the air around is at -1000
    assert _dice(mask, truth_lungs) > 0.85
    nodule = (hu > -100) & (chest_phantom_hu((24, 64, 64), nodule=False) < -600)
    assert nodule.any() and mask[nodule].mean() > 0.9
    outside_body = hu < -990
    assert not (mask & outside_body & ~truth_lungs).any()


def test_classical_lung_mask_agrees_with_the_synthetic_chest_truth() -> None:
    phantoms = pytest.importorskip("models.phantoms")
    phantom = phantoms.generate_phantom(11, shape_zyx=(32, 96, 96))
    volume = Volume(phantom.hu_zyx.astype(np.float32), phantom.affine_lps)
    mask = segment_lungs_classical(volume)
    assert _dice(mask, phantom.labels_zyx >= 1) > 0.9


def test_crop_to_lungs_contains_the_lungs_and_records_the_box() -> None:
    volume = Volume(chest_phantom_hu((24, 64, 64)), _affine((8.0, 5.5, 5.5)))
    out, record = crop_lungs(volume, margin_mm=11.0)
    mask = segment_lungs_classical(volume)
    (k0, k1), (j0, j1), (i0, i1) = record.crop_box_zyx
    assert mask[k0:k1, j0:j1, i0:i1].sum() == mask.sum()
    assert out.shape_zyx[1] < 64 or out.shape_zyx[2] < 64
    assert "fallback" not in record.statistics


def test_crop_to_lungs_falls_back_to_the_body_when_no_lungs_are_found() -> None:
    array = np.full((6, 20, 20), -1000.0, dtype=np.float32)
    array[:, 5:15, 5:15] = 40.0
    out, record = crop_lungs(Volume(array, np.eye(4)), margin_mm=0.0)
    assert record.statistics["fallback"] == "body"
    assert out.shape_zyx == (6, 10, 10)
    empty, record = crop_lungs(Volume(np.full((4, 8, 8), -1000.0, dtype=np.float32), np.eye(4)))
    assert record.statistics["fallback"] == "none" and empty.shape_zyx == (4, 8, 8)


def test_padding_reaches_the_multiple_symmetrically_and_shifts_the_origin_back() -> None:
    volume = Volume(np.ones((5, 17, 32), dtype=np.float32), _affine((2.0, 1.0, 1.0)))
    out, record = pad_to_multiple(volume, multiple=16, value=0.0)
    assert out.shape_zyx == (16, 32, 32)
    assert record.pad_widths_zyx == ((5, 6), (7, 8), (0, 0))
    np.testing.assert_allclose(out.index_to_lps(np.array([5, 7, 0])), volume.affine_lps[:3, 3])
    assert out.array_zyx[0].max() == 0.0 and out.array_zyx[5:10, 7:24, :].min() == 1.0


def test_run_plan_chains_manifest_steps_and_inverts_back_to_the_source_grid() -> None:
    volume = Volume(chest_phantom_hu((24, 64, 64)), _affine((8.0, 5.5, 5.5)))
    steps = [
        StepSpec("crop_lungs", {"margin_mm": 12.0}),
        StepSpec("resample", {"spacing_mm": (4.0, 4.0, 4.0)}),
        StepSpec("clip", {"min": -1000.0, "max": 400.0}),
        StepSpec("normalize", {"mode": "window", "min": -1000.0, "max": 400.0}),
        StepSpec("pad_to_multiple", {"multiple": 8}),
    ]
    out, records = run_plan(volume, steps)
    assert [r.op for r in records] == [s.op for s in steps]
    assert all(n % 8 == 0 for n in out.shape_zyx)
    assert 0.0 <= float(out.array_zyx.min()) and float(out.array_zyx.max()) <= 1.0
    np.testing.assert_allclose(out.spacing_mm, (4.0, 4.0, 4.0))
    probabilities = np.stack([1.0 - out.array_zyx, out.array_zyx]).astype(np.float32)
    back = invert_to_source(probabilities, records, order=1)
    assert back.shape == (2, 24, 64, 64) and back.dtype == np.float32
    lungs = (volume.array_zyx < -600) & (volume.array_zyx > -950)
    labels = replay_plan(volume.with_array(lungs.astype(np.uint8)), records, order=0)
    assert labels.shape_zyx == out.shape_zyx
    np.testing.assert_allclose(labels.affine_lps, out.affine_lps)
    restored = invert_to_source(labels.array_zyx, records, order=0)
    assert _dice(restored == 1, lungs) > 0.9


def test_invert_writes_into_a_given_destination() -> None:
    volume = Volume(chest_phantom_hu((24, 64, 64)), _affine((8.0, 5.5, 5.5)))
    steps = [StepSpec("crop_lungs", {"margin_mm": 5.0}), StepSpec("resample", {"spacing_mm": 6.0})]
    out, records = run_plan(volume, steps)
    destination = np.full((2, 24, 64, 64), 7.0, dtype=np.float32)
    result = invert_to_source(out.array_zyx, records, order=1, out=destination[1])
    assert result is destination[1] or np.shares_memory(result, destination)
    np.testing.assert_array_equal(destination[1], invert_to_source(out.array_zyx, records, order=1))
    assert (destination[0] == 7.0).all()
    with pytest.raises(ValueError, match="out"):
        invert_to_source(out.array_zyx, records, order=1, out=np.zeros((3, 3, 3), dtype=np.float32))


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("slabs", [False, True])
def test_invert_resamples_straight_into_the_crop_with_the_values_of_resampling_then_placing(
    monkeypatch: pytest.MonkeyPatch, order: int, slabs: bool
) -> None:
    from pipeline import preprocess

    if slabs:
        monkeypatch.setattr(preprocess, "PARALLEL_RESAMPLE_MIN_VOXELS", 1)
    volume = Volume(chest_phantom_hu((24, 64, 64)), _affine((8.0, 5.5, 5.5)))
    steps = [StepSpec("crop_lungs", {"margin_mm": 5.0}), StepSpec("resample", {"spacing_mm": 3.0})]
    out, records = run_plan(volume, steps)
    crop, resampling = records
    assert crop.crop_box_zyx is not None and crop.crop_box_zyx != ((0, 24), (0, 64), (0, 64))
    rng = np.random.default_rng(order)
    grid = rng.random((2, *out.shape_zyx)).astype(np.float32)
    if order == 0:
        grid = (grid * 3).astype(np.uint8)
    inverse = tuple(1.0 / s for s in resampling.step_zyx)
    (k0, k1), (j0, j1), (i0, i1) = crop.crop_box_zyx
    expected = np.zeros((2, 24, 64, 64), dtype=grid.dtype)
    for c in range(2):
        expected[c, k0:k1, j0:j1, i0:i1] = preprocess._resample_array(grid[c], inverse, crop.output_shape_zyx, order)
    np.testing.assert_array_equal(invert_to_source(grid, records, order=order), expected)
    np.testing.assert_array_equal(invert_to_source(grid[1], records, order=order), expected[1])
    destination = np.full((24, 64, 64), 9, dtype=grid.dtype)
    invert_to_source(grid[0], records, order=order, out=destination)
    np.testing.assert_array_equal(destination, expected[0])  # outside the crop: background, not 9


def test_steps_leave_their_input_untouched() -> None:
    volume = Volume(chest_phantom_hu((24, 64, 64)), _affine((8.0, 5.5, 5.5)))
    array, affine = volume.array_zyx.copy(), volume.affine_lps.copy()
    steps = [
        StepSpec("crop_body", {"margin_mm": 4.0}),
        StepSpec("crop_lungs", {"margin_mm": 4.0}),
        StepSpec("denoise", {"method": "gaussian"}),
        StepSpec("contrast_stretch", {}),
        StepSpec("histogram_equalize", {}),
        StepSpec("normalize", {"mode": "zscore"}),
        StepSpec("resample", {"spacing_mm": 6.0}),
        StepSpec("pad_to_multiple", {"multiple": 8}),
    ]
    for step in steps:
        run_plan(volume, [step])
        np.testing.assert_array_equal(volume.array_zyx, array)
        np.testing.assert_array_equal(volume.affine_lps, affine)


def test_a_loaded_series_runs_through_the_default_model_plan(ct_series: list) -> None:
    from pipeline.load import load_series

    source = load_series(ct_series)
    steps = [
        StepSpec("crop_lungs", {"margin_mm": 12.0}),
        StepSpec("resample", {"spacing_mm": (5.0, 5.0, 5.0)}),
        StepSpec("clip", {"min": -1000.0, "max": 400.0}),
        StepSpec("normalize", {"mode": "window", "min": -1000.0, "max": 400.0}),
        StepSpec("pad_to_multiple", {"multiple": 16}),
    ]
    out, records = run_plan(source.volume, steps)
    assert all(n % 16 == 0 for n in out.shape_zyx)
    assert records[0].statistics["lung_voxels"] > 0
    labels = invert_to_source((out.array_zyx < 0.2).astype(np.uint8), records, order=0)
    assert labels.shape == source.volume.shape_zyx


def test_run_plan_rejects_unknown_operations_and_parameters() -> None:
    volume = _phantom_volume()
    with pytest.raises(ValueError, match="sharpen"):
        run_plan(volume, [StepSpec("sharpen", {})])
    with pytest.raises(ValueError, match="clip"):
        run_plan(volume, [StepSpec("clip", {"low": 0})])


def test_the_plan_operations_match_the_manifest_schema() -> None:
    from models.spec import KNOWN_PREPROCESS_OPS

    assert set(OPERATIONS) == set(KNOWN_PREPROCESS_OPS)


def test_every_operation_parameter_is_documented_in_the_module_docstring() -> None:
    import inspect

    import pipeline.preprocess as preprocess

    doc = preprocess.__doc__ or ""
    for op in OPERATIONS:
        assert f"``{op}``:" in doc, op
        section = doc.split(f"``{op}``:", 1)[1].split("\n- ", 1)[0]
        parameters = list(inspect.signature(getattr(preprocess, op)).parameters)[1:]
        missing = [name for name in parameters if f"``{name}``" not in section]
        assert not missing, f"{op}: parameters not documented: {missing}"


def test_invert_refuses_an_array_that_is_not_on_the_plan_grid() -> None:
    volume = _phantom_volume()
    out, records = run_plan(volume, [StepSpec("pad_to_multiple", {"multiple": 64})])
    with pytest.raises(ValueError, match="grid"):
        invert_to_source(np.zeros((3, 3, 3)), records, order=0)
    assert invert_to_source(out.array_zyx, records, order=0).shape == volume.shape_zyx


def test_records_are_frozen() -> None:
    _, record = clip(_phantom_volume(), min=0.0, max=1.0)
    assert isinstance(record, PreprocessRecord)
    with pytest.raises(AttributeError):
        record.op = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.params["min"] = 5  # type: ignore[index]
