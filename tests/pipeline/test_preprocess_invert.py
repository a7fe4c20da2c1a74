"""Property: whatever the plan, invert(preprocess(x)) lands exactly on the source grid.

For plans that keep the spacing (crops, padding, intensity steps), a label map carried through the plan
with `replay_plan` and brought back with `invert_to_source(order=0)` equals the source labels inside the
crop box and is background outside it.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.spec import StepSpec
from pipeline.preprocess import invert_to_source, replay_plan, run_plan
from pipeline.types import Volume

shapes = st.tuples(st.integers(2, 12), st.integers(2, 14), st.integers(2, 14))
spacings = st.tuples(
    st.floats(0.5, 5.0, allow_nan=False),
    st.floats(0.3, 3.0, allow_nan=False),
    st.floats(0.3, 3.0, allow_nan=False),
)

geometry_preserving_steps = st.sampled_from(
    [
        StepSpec("crop_body", {"margin_mm": 0.0}),
        StepSpec("crop_body", {"margin_mm": 2.0}),
        StepSpec("crop_lungs", {"margin_mm": 1.0, "working_spacing_mm": 1.0}),
        StepSpec("pad_to_multiple", {"multiple": 4}),
        StepSpec("pad_to_multiple", {"multiple": (3, 5, 8)}),
        StepSpec("clip", {"min": -1000.0, "max": 400.0}),
        StepSpec("denoise", {"method": "median", "size": 3}),
    ]
)


@st.composite
def volumes(draw: st.DrawFn) -> Volume:
    shape = draw(shapes)
    spacing = draw(spacings)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    array = rng.choice(np.array([-1000.0, -850.0, 40.0], dtype=np.float32), size=shape, p=[0.4, 0.3, 0.3])
    angle = math.radians(draw(st.floats(-40.0, 40.0)))
    rotation = np.array(
        [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing[::-1])
    affine[:3, 3] = draw(st.tuples(*[st.floats(-300.0, 300.0)] * 3))
    return Volume(array_zyx=array.astype(np.float32), affine_lps=affine)


def _labels_for(volume: Volume, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=volume.shape_zyx).astype(np.uint8)


def _crop_region(records: tuple, shape: tuple[int, int, int]) -> np.ndarray:
    """Source voxels that survive every crop of the plan (the rest is background after inversion)."""
    lo, hi = np.zeros(3, dtype=int), np.array(shape)
    offset = np.zeros(3, dtype=int)  # source index of the current grid's voxel 0
    for record in records:
        if record.crop_box_zyx is not None:
            start = np.array([b[0] for b in record.crop_box_zyx])
            stop = np.array([b[1] for b in record.crop_box_zyx])
            lo, hi = np.maximum(lo, offset + start), np.minimum(hi, offset + stop)
            offset = offset + start
        elif record.pad_widths_zyx is not None:
            offset = offset - np.array([w[0] for w in record.pad_widths_zyx])
    inside = np.zeros(shape, dtype=bool)
    inside[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return inside


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    volume=volumes(),
    steps=st.lists(geometry_preserving_steps, min_size=0, max_size=4),
    seed=st.integers(0, 99),
)
def test_spacing_preserving_plans_restore_labels_exactly_inside_the_crop(
    volume: Volume, steps: list, seed: int
) -> None:
    out, records = run_plan(volume, steps)
    labels = _labels_for(volume, seed)
    carried = replay_plan(volume.with_array(labels), records, order=0)
    assert carried.shape_zyx == out.shape_zyx
    np.testing.assert_allclose(carried.affine_lps, out.affine_lps)
    restored = invert_to_source(carried.array_zyx, records, order=0)
    assert restored.shape == volume.shape_zyx and restored.dtype == labels.dtype
    if records:
        np.testing.assert_array_equal(records[0].source_affine_lps, volume.affine_lps)
    inside = _crop_region(records, volume.shape_zyx)
    np.testing.assert_array_equal(restored[inside], labels[inside])
    assert not restored[~inside].any()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    volume=volumes(),
    before=st.lists(geometry_preserving_steps, max_size=2),
    target=st.tuples(*[st.floats(0.4, 6.0, allow_nan=False)] * 3),
    order=st.sampled_from([0, 1, 3]),
    after=st.lists(geometry_preserving_steps, max_size=2),
    channels=st.sampled_from([None, 1, 3]),
)
def test_any_plan_maps_predictions_back_to_the_source_shape(
    volume: Volume, before: list, target: tuple, order: int, after: list, channels: int | None
) -> None:
    steps = [*before, StepSpec("resample", {"spacing_mm": target, "order": order}), *after]
    out, records = run_plan(volume, steps)
    np.testing.assert_allclose(out.spacing_mm, target, rtol=1e-6)
    prediction = out.array_zyx if channels is None else np.stack([out.array_zyx] * channels)
    restored = invert_to_source(prediction.astype(np.float32), records, order=1)
    expected = volume.shape_zyx if channels is None else (channels, *volume.shape_zyx)
    assert restored.shape == expected
    np.testing.assert_array_equal(records[0].source_affine_lps, volume.affine_lps)
    # Each step's output grid is its successor's input grid, so the chain closes on the source.
    for previous, record in zip(records, records[1:]):
        assert previous.output_shape_zyx == record.source_shape_zyx
        np.testing.assert_allclose(previous.output_affine_lps, record.source_affine_lps)


@settings(max_examples=40, deadline=None)
@given(volume=volumes(), steps=st.lists(geometry_preserving_steps, min_size=1, max_size=3))
def test_crops_and_pads_keep_every_voxel_at_its_patient_position(volume: Volume, steps: list) -> None:
    out, records = run_plan(volume, steps)
    # A voxel of the output grid maps, through the inverse, to the source voxel at the same LPS point.
    index = np.arange(int(np.prod(out.shape_zyx)), dtype=np.int64).reshape(out.shape_zyx) + 1
    restored = invert_to_source(index, records, order=0)
    found = np.argwhere(restored > 0)
    if found.size == 0:
        return
    source_kji = found[:: max(1, len(found) // 20)]
    out_kji = np.argwhere(index > 0)[restored[tuple(source_kji.T)] - 1]
    np.testing.assert_allclose(volume.index_to_lps(source_kji), out.index_to_lps(out_kji), atol=1e-6)
