"""Sliding-window inference: exact blending, padding, batching, study logit, out-of-memory fallback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import loader
from models.loader import load_model
from models.spec import InferenceSpec, load_spec
from pipeline.errors import TransientPipelineError
from pipeline.infer import (
    InferenceOutput,
    gaussian_importance_map,
    infer,
    sliding_window_logits,
    window_starts,
)
from tests.models.tiny_bundle import make_tiny_bundle

SPEC = InferenceSpec(patch_size_zyx=(8, 16, 16), overlap=0.5, batch_size=3, gaussian_sigma_scale=0.125)


class Identity(torch.nn.Module):
    """Returns its input as segmentation logits (and no study head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class WindowMean(torch.nn.Module):
    """Two-class logits (0, input) and the window's mean as its study logit."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([torch.zeros_like(x), x], dim=1), x.mean(dim=(1, 2, 3, 4))[:, None]


class OutOfMemoryAboveBatchOne(torch.nn.Module):
    """Simulates a GPU that holds one window at a time: CUDA OOM for a batch > 1 or off the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        self.batches.append((x.device.type, int(x.shape[0])))
        if x.shape[0] > 1 or x.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return torch.cat([-x, x], dim=1), None


def random_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("shape", [(1, 20, 37, 29), (2, 8, 16, 16), (1, 5, 7, 40)])
def test_identity_model_reproduces_the_input_exactly(shape: tuple[int, ...]) -> None:
    """Blending weights are normalised: a model returning its input gives the input back."""
    volume = random_volume(shape)
    logits, study_logit, windows = sliding_window_logits(Identity(), volume, SPEC,
                                                         torch.device("cpu"), 3)
    np.testing.assert_allclose(logits.numpy(), volume, rtol=1e-6, atol=1e-6)
    assert study_logit is None and windows >= 1


def test_constant_model_gives_constant_probabilities_on_the_input_grid() -> None:
    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.tensor([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1, 1)
            return logits.expand(x.shape[0], 3, *x.shape[2:])

    volume = random_volume((1, 11, 21, 35))
    out = infer(Constant(), volume, SPEC)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0).numpy()
    assert out.probabilities_czyx.shape == (3, 11, 21, 35)
    assert out.probabilities_czyx.dtype == np.float32
    np.testing.assert_allclose(out.probabilities_czyx, expected[:, None, None, None]
                               * np.ones((3, 11, 21, 35), np.float32), rtol=1e-6)


def test_probabilities_are_a_softmax_of_the_blended_logits() -> None:
    volume = random_volume((1, 10, 20, 20)) * 4
    out = infer(WindowMean(), volume, SPEC)
    np.testing.assert_allclose(out.probabilities_czyx.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.probabilities_czyx[1], 1 / (1 + np.exp(-volume[0])), rtol=1e-5)


def test_volume_smaller_than_the_window_is_padded_and_cropped_back() -> None:
    volume = random_volume((1, 3, 5, 6))
    out = infer(Identity(), volume, SPEC)
    assert out.probabilities_czyx.shape == volume.shape and out.windows == 1
    logits, _, _ = sliding_window_logits(Identity(), volume, SPEC, torch.device("cpu"), 1)
    np.testing.assert_allclose(logits.numpy(), volume, rtol=1e-6)


def test_study_logit_is_the_largest_window_logit() -> None:
    volume = np.zeros((1, 8, 32, 32), np.float32)
    volume[0, :, :16, :16] = 1.0  # exactly one window (of 16×16 in-plane, no overlap) sees only ones
    spec = InferenceSpec(patch_size_zyx=(8, 16, 16), overlap=0.0, batch_size=2)
    out = infer(WindowMean(), volume, spec)
    assert out.study_logit == pytest.approx(1.0) and out.windows == 4


def test_a_model_without_study_head_gives_no_study_logit() -> None:
    assert infer(Identity(), random_volume((1, 8, 16, 16)), SPEC).study_logit is None


@pytest.fixture(scope="module")
def tiny_handle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[loader.ModelHandle]:
    loader.clear_cache()
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("infer") / "tiny")
    yield load_model(load_spec(bundle), "cpu")
    loader.clear_cache()


def chest_input() -> np.ndarray:
    z, y, x = np.mgrid[:20, :48, :48]
    hu = np.full((20, 48, 48), 40.0, np.float32)
    hu[((y - 24) / 18) ** 2 + ((x - 24) / 16) ** 2 < 1] = -850.0
    hu[(z - 10) ** 2 + (y - 24) ** 2 + (x - 24) ** 2 < 12] = 20.0
    hu += np.random.default_rng(1).normal(0, 15, hu.shape).astype(np.float32)
    return ((np.clip(hu, -1000, 400) + 1000) / 1400)[None].astype(np.float32)


def test_batch_size_does_not_change_the_result(tiny_handle: loader.ModelHandle) -> None:
    """Windows are blended in a fixed order whatever the batch; only oneDNN's convolution blocking may
    differ with the batch size, in the last float32 bits (measured: ≤ 8e-7), never in the labels."""
    volume = chest_input()[:, 4:16, 8:40, 8:40]
    reference = infer(tiny_handle, volume, InferenceSpec((8, 24, 24), 0.25, 1))
    other = infer(tiny_handle, volume, InferenceSpec((8, 24, 24), 0.25, 3))
    assert reference.windows == 8 and other.batch_size == 3
    np.testing.assert_allclose(other.probabilities_czyx, reference.probabilities_czyx, atol=2e-6)
    np.testing.assert_array_equal(other.probabilities_czyx.argmax(0),
                                  reference.probabilities_czyx.argmax(0))
    assert other.study_logit == pytest.approx(reference.study_logit, abs=1e-5)


def test_batch_size_gives_bit_identical_results_for_a_per_voxel_model() -> None:
    volume = random_volume((1, 13, 30, 30))
    results = [infer(WindowMean(), volume, InferenceSpec((8, 16, 16), 0.5, b)) for b in (1, 2, 7)]
    for other in results[1:]:
        np.testing.assert_array_equal(other.probabilities_czyx, results[0].probabilities_czyx)
        assert other.study_logit == results[0].study_logit


def test_tiny_model_inference_is_deterministic_and_finds_the_nodule(
        tiny_handle: loader.ModelHandle) -> None:
    volume = chest_input()
    before = volume.copy()
    first = infer(tiny_handle, volume, tiny_handle.spec.inference)
    second = infer(tiny_handle, volume, tiny_handle.spec.inference)
    np.testing.assert_array_equal(volume, before)  # the input is left alone
    np.testing.assert_array_equal(first.probabilities_czyx, second.probabilities_czyx)
    labels = first.probabilities_czyx.argmax(axis=0)
    assert labels[10, 24, 24] == 2 and labels[10, 24, 14] == 1 and labels[10, 2, 2] == 0
    assert first.study_logit is not None and first.study_logit > 0
    assert isinstance(first, InferenceOutput) and first.device == "cpu"


def test_out_of_memory_retries_with_half_the_batch_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = OutOfMemoryAboveBatchOne()
    volume = random_volume((1, 12, 24, 24))
    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        out = infer(model, volume, InferenceSpec((8, 16, 16), 0.5, 4))
    assert out.batch_size == 1 and out.device == "cpu"
    assert [size for _, size in model.batches[:3]] == [4, 2, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("event=infer_out_of_memory" in m and "action=retry_batch_size_2" in m for m in messages)
    np.testing.assert_allclose(out.probabilities_czyx[1], 1 / (1 + np.exp(-2 * volume[0])), rtol=1e-5)


def test_out_of_memory_at_batch_one_off_the_cpu_falls_back_to_the_cpu(
        caplog: pytest.LogCaptureFixture) -> None:
    """Every non-CPU batch fails (the 'meta' device stands in for a full GPU): the CPU finishes."""
    model = OutOfMemoryAboveBatchOne()
    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        out = infer(model, random_volume((1, 8, 16, 24)), InferenceSpec((8, 16, 16), 0.5, 2),
                    device="meta")
    assert out.device == "cpu" and out.probabilities_czyx.shape == (2, 8, 16, 24)
    assert any("action=retry_on_cpu" in r.getMessage() for r in caplog.records)
    assert model.batches == [("meta", 2), ("meta", 1)]  # then a CPU copy of the model finishes


def test_out_of_memory_on_the_cpu_at_batch_one_is_a_transient_error() -> None:
    class AlwaysOutOfMemory(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("simulated")

    with pytest.raises(TransientPipelineError, match="out of memory"):
        infer(AlwaysOutOfMemory(), random_volume((1, 8, 16, 16)), SPEC)


def test_a_model_that_changes_the_window_size_is_rejected() -> None:
    class Shrinks(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, 1:]

    with pytest.raises(ValueError, match="keep the batch and spatial size"):
        infer(Shrinks(), random_volume((1, 8, 16, 16)), SPEC)


def test_non_finite_input_is_rejected() -> None:
    volume = random_volume((1, 8, 16, 16))
    volume[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        infer(Identity(), volume, SPEC)


def test_gaussian_importance_map_peaks_at_the_centre_and_stays_positive() -> None:
    weights = gaussian_importance_map((8, 16, 17), 0.125)
    assert weights.dtype == np.float32 and weights.min() > 0 and weights.max() == 1.0
    assert weights[4, 8, 8] > weights[0, 0, 0]
    np.testing.assert_allclose(weights, weights[::-1, ::-1, ::-1])


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 400), patch=st.integers(1, 128), overlap=st.floats(0.0, 0.9))
def test_windows_cover_the_axis_with_at_least_the_requested_overlap(size: int, patch: int,
                                                                    overlap: float) -> None:
    starts = window_starts(size, patch, overlap)
    if size <= patch:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - patch
    gaps = np.diff(starts)
    assert (gaps > 0).all()
    assert (gaps <= np.ceil(max(1.0, patch * (1 - overlap)))).all()  # starts are rounded



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inference_under_autocast_agrees_with_the_cpu(tiny_handle: loader.ModelHandle) -> None:
    volume = chest_input()
    on_cpu = infer(tiny_handle, volume, tiny_handle.spec.inference, device="cpu")
    on_gpu = infer(tiny_handle, volume, tiny_handle.spec.inference, device="cuda")
    assert on_gpu.device.startswith("cuda") and on_gpu.probabilities_czyx.dtype == np.float32
    agree = on_gpu.probabilities_czyx.argmax(0) == on_cpu.probabilities_czyx.argmax(0)
    assert agree.mean() > 0.999
    np.testing.assert_allclose(on_gpu.probabilities_czyx, on_cpu.probabilities_czyx, atol=0.05)


def test_small_volume_runs_as_one_window_of_its_own_size_when_the_manifest_allows() -> None:
    volume = random_volume((1, 20, 37, 29))
    seen: list[tuple[int, ...]] = []

    class Recording(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))
            return x

    spec = InferenceSpec((8, 16, 16), 0.5, 2, whole_volume_max_voxels=20 * 37 * 29)
    out = infer(Recording(), volume, spec)
    assert out.windows == 1 and seen == [(1, 1, 20, 37, 29)]
    logits, _, _ = sliding_window_logits(Identity(), volume, spec, torch.device("cpu"), 1)
    np.testing.assert_array_equal(logits.numpy(), volume)
    larger = InferenceSpec((8, 16, 16), 0.5, 2, whole_volume_max_voxels=20 * 37 * 29 - 1)
    assert infer(Identity(), volume, larger).windows > 1


def test_cpu_allocator_failure_counts_as_out_of_memory(caplog: pytest.LogCaptureFixture) -> None:
    class CpuAllocatorFailsAboveBatchOne(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                                   "allocate memory: you tried to allocate 99 bytes")
            return x

    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        out = infer(CpuAllocatorFailsAboveBatchOne(), random_volume((1, 8, 16, 24)), SPEC)
    assert out.batch_size == 1
    assert any("event=infer_out_of_memory" in r.getMessage() for r in caplog.records)


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory() -> None:
    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("Given groups=1, weight of size [8, 2, 3, 3, 3], expected 2 channels")

    with pytest.raises(RuntimeError, match="expected 2 channels"):
        infer(Broken(), random_volume((1, 8, 16, 16)), SPEC)


def test_out_of_memory_in_one_whole_volume_window_retries_with_windows(
        caplog: pytest.LogCaptureFixture) -> None:
    class OutOfMemoryOnLargeInputs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x[0, 0].numel() > 8 * 16 * 16:
                raise torch.cuda.OutOfMemoryError("simulated")
            return x

    volume = random_volume((1, 12, 24, 24))
    spec = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=10_000)
    with caplog.at_level(logging.WARNING, logger="pipeline.infer"):
        out = infer(OutOfMemoryOnLargeInputs(), volume, spec)
    assert out.windows > 1
    assert any("action=retry_with_windows" in r.getMessage() for r in caplog.records)


def test_volume_over_the_whole_volume_limit_runs_as_the_fewest_tiles_that_fit() -> None:
    from pipeline.infer import tile_patch

    volume = random_volume((1, 20, 37, 29))
    seen: list[tuple[int, ...]] = []

    class Recording(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape[2:]))
            return x

    limit = 20 * 37 * 29 - 1
    spec = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=limit)
    out = infer(Recording(), volume, spec)
    assert out.windows == 2 and len(seen) == 2 and len(set(seen)) == 1
    assert int(np.prod(seen[0])) <= limit  # each tile within the memory the manifest vouches for
    logits, _, _ = sliding_window_logits(Identity(), volume, spec, torch.device("cpu"), 1)
    np.testing.assert_allclose(logits.numpy(), volume, rtol=1e-6, atol=1e-6)  # tiles cover every voxel
    # A big chest crop: a handful of tiles, about 1.2-1.4x the work, never the manifest's small windows.
    patch = tile_patch((300, 260, 200), 3_000_000)
    assert int(np.prod(patch)) <= 3_000_000 and min(patch) >= 64


class RampModel(torch.nn.Module):
    """Not mirror-equivariant: adds each voxel's x index to its input; the study logit is the mean of
    the window's left half (low x), and every call is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(tuple(x.shape))
        ramp = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, 1, -1)
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3, 4))[:, None]
        return x + ramp, left


def test_test_time_mirroring_averages_the_mirrored_back_outputs() -> None:
    volume = random_volume((1, 6, 10, 12), seed=3)
    width = volume.shape[-1]
    whole = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=10**6)
    model = RampModel()
    plain, plain_study, _ = sliding_window_logits(model, volume, whole, torch.device("cpu"), 1)
    assert len(model.calls) == 1
    np.testing.assert_allclose(plain.numpy(), volume + np.arange(width, dtype=np.float32), atol=1e-5)

    model = RampModel()
    mirrored = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=10**6, mirror_axes=(2,))
    logits, study, _ = sliding_window_logits(model, volume, mirrored, torch.device("cpu"), 1)
    assert len(model.calls) == 2  # the window and its left-right mirror image
    # The ramp and its mirror image average to (width - 1) / 2 everywhere; the input comes back in place.
    np.testing.assert_allclose(logits.numpy(), volume + (width - 1) / 2.0, atol=1e-5)
    halves = (volume[..., : width // 2].mean() + volume[..., width - width // 2:].mean()) / 2.0
    assert study == pytest.approx(float(halves), abs=1e-5)
    assert plain_study == pytest.approx(float(volume[..., : width // 2].mean()), abs=1e-5)

    model = RampModel()
    all_axes = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=10**6, mirror_axes=(0, 1, 2))
    logits, _, _ = sliding_window_logits(model, volume, all_axes, torch.device("cpu"), 1)
    assert len(model.calls) == 8
    np.testing.assert_allclose(logits.numpy(), volume + (width - 1) / 2.0, atol=1e-5)


def test_test_time_mirroring_is_skipped_for_volumes_over_its_voxel_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    volume = random_volume((1, 6, 10, 12), seed=5)
    voxels = 6 * 10 * 12
    for limit, passes, logged in ((voxels, 2, "mirror_axes=2"), (voxels - 1, 1, "mirror_axes=none")):
        model = RampModel()
        spec = InferenceSpec((8, 16, 16), 0.5, 1, whole_volume_max_voxels=10**6, mirror_axes=(2,),
                             mirror_max_voxels=limit)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.infer"):
            infer(model, volume, spec)
        assert len(model.calls) == passes
        assert logged in caplog.text


def test_test_time_mirroring_leaves_a_mirror_equivariant_model_unchanged() -> None:
    volume = random_volume((1, 20, 37, 29), seed=4)
    spec = InferenceSpec((8, 16, 16), 0.5, 3, mirror_axes=(1, 2))
    logits, _, windows = sliding_window_logits(Identity(), volume, spec, torch.device("cpu"), 3)
    assert windows > 1
    np.testing.assert_allclose(logits.numpy(), volume, rtol=1e-6, atol=1e-6)
