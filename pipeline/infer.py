"""Run a loaded model over a preprocessed volume: sliding window, Gaussian blending, softmax.

`infer` takes the preprocessed array ``[C, Z, Y, X]`` and returns per-class probabilities on the same
grid plus the study-level logit. Windows of the manifest's patch size tile the volume with the given
overlap (the last window flush with the far edge, as nnU-Net places them); each window's logits are
weighted by a Gaussian importance map (centre trusted more than the edges) and the sums divided by the
summed weights, so the blend is an exact weighted mean: a model that returns its input reproduces the
input. A manifest may let a small enough volume run as one window of its own size
(``whole_volume_max_voxels``: no overlap computed twice, the fastest on a CPU), and may ask for
test-time mirroring (``mirror_axes``, up to ``mirror_max_voxels``: logits averaged over mirror
images of each window). A volume smaller than the window is padded (with each channel's minimum, i.e.
air for normalised CT) and cropped back. Windows go through the network in batches under
``torch.inference_mode``, with autocast (bf16, or fp16 where bf16 is unsupported) on CUDA. On CUDA
out-of-memory the whole volume is retried with half the batch, then (if the volume ran as one window)
with overlapping windows, then on the CPU, each step logged. This module knows nothing of DICOM,
geometry or the manifest's other sections; it must not change its input.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from models.loader import ModelHandle, load_model
from models.networks import split_outputs
from models.spec import InferenceSpec
from pipeline.errors import TransientPipelineError

log = logging.getLogger(__name__)

Window = tuple[slice, slice, slice]


@dataclass(frozen=True, slots=True)
class InferenceOutput:
    """The network's output on the preprocessed grid.

    ``probabilities_czyx``: float32 softmax probabilities ``[C_out, Z, Y, X]`` (channel c = label value
    c, 0 = background), same spatial shape as the input. ``study_logit``: the largest per-window
    classification logit, or None when the model has no study-level head. ``device`` where it finally
    ran, ``batch_size`` the batch that succeeded, ``windows`` the number of windows, ``seconds`` the
    wall time.
    """

    probabilities_czyx: NDArray[np.float32]
    study_logit: float | None
    device: str = "cpu"
    batch_size: int = 1
    windows: int = 0
    seconds: float = 0.0


def infer(model_handle: ModelHandle | nn.Module | Callable[[Tensor], Any],
          array_czyx: NDArray[np.float32], spec: InferenceSpec,
          device: torch.device | str | None = None) -> InferenceOutput:
    """Sliding-window inference with Gaussian blending, batching, AMP and out-of-memory fallback.

    Parameters
    ----------
    model_handle
        A `models.loader.ModelHandle` (its module and device are used), or any module/callable mapping
        ``[B, C, z, y, x]`` to an output `models.networks.split_outputs` understands, with the spatial
        size of its input.
    array_czyx
        Preprocessed input, ``[C, Z, Y, X]`` (a ``[Z, Y, X]`` array is taken as one channel).
    spec
        Window size (voxels, array order), overlap fraction, batch size, Gaussian sigma scale.
    device
        Where to run; None = the handle's device (CPU for a bare module).

    Returns
    -------
    InferenceOutput

    Raises
    ------
    pipeline.errors.TransientPipelineError
        Out of memory even with batch size 1 on the CPU.
    ValueError
        An input that is not 3-D/4-D or not finite, or a model whose output has another spatial size.
    """
    started = time.perf_counter()
    array = np.asarray(array_czyx, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or min(array.shape) < 1:
        raise ValueError(f"infer expects [C, Z, Y, X], got shape {np.shape(array_czyx)}")
    if not np.isfinite(array).all():
        raise ValueError("infer input contains NaN or infinite values")
    spec_handle: ModelHandle | None = None
    module: nn.Module | Callable[[Tensor], Any]
    if isinstance(model_handle, ModelHandle):
        spec_handle, module = model_handle, model_handle.module
    else:
        module = model_handle
    if device is None:
        target = spec_handle.device if spec_handle is not None else torch.device("cpu")
    else:
        target = torch.device(device)
    if spec_handle is not None and target != spec_handle.device:
        module = load_model(spec_handle.spec, target).module
    batch = max(1, int(spec.batch_size))
    while True:
        try:
            logits, study_logit, windows = sliding_window_logits(module, array, spec, target, batch)
            break
        except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
        # Out of memory; the failed attempt's tensors are gone once the except clause is left.
        _release(target)
        if batch > 1:
            log.warning("event=infer_out_of_memory device=%s batch_size=%d action=retry_batch_size_%d",
                        target, batch, batch // 2)
            batch //= 2
        elif _whole_volume(array.shape[1:], spec):
            log.warning("event=infer_out_of_memory device=%s batch_size=1 action=retry_with_windows",
                        target)
            spec = dataclasses.replace(spec, whole_volume_max_voxels=0)
        elif target.type != "cpu":
            log.warning("event=infer_out_of_memory device=%s batch_size=1 action=retry_on_cpu", target)
            cpu = torch.device("cpu")
            module = (load_model(spec_handle.spec, cpu).module if spec_handle is not None
                      else _module_on_cpu(module))
            target, batch = cpu, max(1, int(spec.batch_size))
        else:
            raise TransientPipelineError(
                "out of memory during inference on the CPU with batch size 1; free memory or lower "
                "the model's inference.patch_size_zyx / whole_volume_max_voxels")
    with torch.inference_mode():
        # softmax on the CPU: the volume-sized copy must not be what exhausts a full GPU
        probabilities = torch.softmax(logits.cpu(), dim=0).numpy().astype(np.float32, copy=False)
    del logits
    _release(target)
    seconds = time.perf_counter() - started
    mirrored = ",".join(str(a) for a in mirror_axes_for(array.shape[1:], spec)) or "none"
    log.info("event=infer_done device=%s windows=%d batch_size=%d mirror_axes=%s seconds=%.3f", target,
             windows, batch, mirrored, seconds)
    return InferenceOutput(probabilities_czyx=probabilities, study_logit=study_logit, device=str(target),
                           batch_size=batch, windows=windows, seconds=seconds)


def sliding_window_logits(module: nn.Module | Callable[[Tensor], Any], array_czyx: NDArray[np.float32],
                          spec: InferenceSpec, device: torch.device, batch_size: int
                          ) -> tuple[Tensor, float | None, int]:
    """Blend the model's logits over all windows; the core of `infer` without softmax or fallback.

    Returns
    -------
    tuple
        ``(logits [C_out, Z, Y, X] float32 on device, largest window classification logit or None,
        number of windows)``.

    Raises
    ------
    torch.cuda.OutOfMemoryError
        Left to the caller (`infer` retries).
    """
    shape = tuple(int(n) for n in array_czyx.shape[1:])
    patch = tuple(int(n) for n in spec.patch_size_zyx)
    overlap = spec.overlap
    mirror_axes = mirror_axes_for(shape, spec)
    if _whole_volume(shape, spec):
        patch = shape  # one window of the volume's own size (the manifest vouches the network takes it)
    elif spec.whole_volume_max_voxels > 0:
        patch, overlap = tile_patch(shape, spec.whole_volume_max_voxels), 0.0
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch))
    before = [(p - s) // 2 for s, p in zip(shape, padded_shape)]
    if padded_shape != shape:
        fill = array_czyx.reshape(array_czyx.shape[0], -1).min(axis=1)
        padded = np.empty((array_czyx.shape[0], *padded_shape), dtype=np.float32)
        padded[:] = fill[:, None, None, None]
        padded[(slice(None), *(slice(b, b + s) for b, s in zip(before, shape)))] = array_czyx
    else:
        padded = array_czyx
    windows = list(window_slices(padded_shape, patch, overlap))
    if len(windows) == 1:  # nothing to blend: uniform weights keep the logits exact
        importance = torch.ones(patch, dtype=torch.float32, device=device)
    else:
        importance = torch.from_numpy(gaussian_importance_map(patch, spec.gaussian_sigma_scale)).to(device)
    logits_sum: Tensor | None = None
    weight_sum = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    study_logit: float | None = None
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            batch = np.stack([padded[(slice(None), *w)] for w in chunk])
            x = torch.from_numpy(batch).to(device)
            if device.type == "cpu":
                # oneDNN's 3-D convolutions are faster on channels-last tensors (see `models.loader`).
                x = x.contiguous(memory_format=torch.channels_last_3d)
            seg, cls = _mirrored_outputs(module, x, mirror_axes)
            if tuple(seg.shape[2:]) != patch or seg.shape[0] != len(chunk):
                raise ValueError(f"model returned {tuple(seg.shape)} for input {tuple(batch.shape)}; "
                                 "segmentation output must keep the batch and spatial size")
            if logits_sum is None:
                logits_sum = torch.zeros((seg.shape[1], *padded_shape), dtype=torch.float32,
                                         device=device)
            for b, w in enumerate(chunk):
                logits_sum[(slice(None), *w)] += seg[b] * importance
                weight_sum[w] += importance
            if cls is not None:
                top = float(cls.float().max())
                study_logit = top if study_logit is None else max(study_logit, top)
    if logits_sum is None:  # unreachable: a non-empty volume has at least one window
        raise ValueError("no window to run")
    logits = logits_sum / weight_sum
    crop = (slice(None), *(slice(b, b + s) for b, s in zip(before, shape)))
    return logits[crop], study_logit, len(windows)


def mirror_axes_for(shape_zyx: tuple[int, ...], spec: InferenceSpec) -> tuple[int, ...]:
    """The test-time mirroring a volume of ``shape_zyx`` gets: the manifest's ``mirror_axes``, or none
    for a volume over ``mirror_max_voxels`` (0 = no limit), which keeps large volumes in time."""
    if spec.mirror_max_voxels and math.prod(int(n) for n in shape_zyx) > spec.mirror_max_voxels:
        return ()
    return tuple(spec.mirror_axes)


def _mirrored_outputs(module: nn.Module | Callable[[Tensor], Any], x: Tensor,
                      mirror_axes: tuple[int, ...]) -> tuple[Tensor, Tensor | None]:
    """The model's float32 segmentation logits and classification logits for ``x`` ``[B, C, z, y, x]``,
    averaged over ``x`` and its mirror images along every non-empty subset of ``mirror_axes`` (spatial
    axes 0–2), each output mirrored back first (test-time mirroring, as nnU-Net does)."""
    seg_sum: Tensor | None = None
    cls_sum: Tensor | None = None
    variants = [()] + [combo for n in range(1, len(mirror_axes) + 1)
                       for combo in itertools.combinations(mirror_axes, n)]
    for combo in variants:
        dims = [2 + axis for axis in combo]
        seg, cls = split_outputs(module(torch.flip(x, dims) if dims else x))
        seg = seg.float()
        if dims and seg.ndim == x.ndim:
            seg = torch.flip(seg, dims)
        seg_sum = seg if seg_sum is None else seg_sum + seg
        if cls is not None:
            cls_sum = cls.float() if cls_sum is None else cls_sum + cls.float()
    if seg_sum is None:  # unreachable: the unmirrored variant always runs
        raise ValueError("no forward pass")
    count = float(len(variants))
    return seg_sum / count, (cls_sum / count if cls_sum is not None else None)


#: Voxels shared by neighbouring tiles (`tile_patch`): 32 mm at 2 mm, beyond most of what a border sees.
TILE_OVERLAP_VOXELS = 16


def tile_patch(shape_zyx: tuple[int, ...], max_voxels: int) -> tuple[int, ...]:
    """The window for a volume too large to run whole: the fewest tiles of at most ``max_voxels``.

    A manifest that allows whole-volume inference up to ``max_voxels`` (``whole_volume_max_voxels``)
    vouches that its network takes any window of that size, so a larger volume is cut into the fewest
    near-equal tiles that fit, overlapping by `TILE_OVERLAP_VOXELS` (windows then start evenly from 0
    to the far edge). About 1.2x the work of the volume itself, where the manifest's sliding window
    (64x128x128, 25 % overlap) costs 3-5x on a typical chest crop.
    """
    best: tuple[int, ...] | None = None
    best_key: tuple[int, int] | None = None
    limit = max(1, max_voxels)
    for total in range(2, 4097):
        for nz in range(1, total + 1):
            if total % nz:
                continue
            for ny in range(1, total // nz + 1):
                if (total // nz) % ny:
                    continue
                nx = total // nz // ny
                patch = tuple(size if n == 1 else min(size, math.ceil(size / n) + TILE_OVERLAP_VOXELS)
                              for size, n in zip(shape_zyx, (nz, ny, nx)))
                voxels = math.prod(patch)
                if voxels <= limit and (best_key is None or (voxels, -min(patch)) < best_key):
                    best, best_key = patch, (voxels, -min(patch))
        if best is not None:
            return best
    return tuple(min(size, 32) for size in shape_zyx)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` voxels covering ``size`` ≥ ``patch`` voxels.

    Neighbours overlap by at least ``overlap`` × patch; starts are spread evenly from 0 to
    ``size - patch`` (so the last window ends at the edge), as nnU-Net's sliding window does.
    """
    if size <= patch:
        return [0]
    stride = max(1.0, patch * (1.0 - overlap))
    count = math.ceil((size - patch) / stride) + 1
    step = (size - patch) / (count - 1)
    return sorted({int(round(step * i)) for i in range(count)})


def window_slices(shape_zyx: tuple[int, ...], patch_zyx: tuple[int, ...],
                  overlap: float) -> Iterator[Window]:
    """Every window of the volume, z-major, as slices (order fixed: results never depend on batching)."""
    starts = [window_starts(s, p, overlap) for s, p in zip(shape_zyx, patch_zyx)]
    for z, y, x in itertools.product(*starts):
        yield (slice(z, z + patch_zyx[0]), slice(y, y + patch_zyx[1]), slice(x, x + patch_zyx[2]))


def gaussian_importance_map(patch_zyx: tuple[int, ...], sigma_scale: float) -> NDArray[np.float32]:
    """Separable Gaussian weights over a window: 1 at the centre, sigma = ``sigma_scale`` × size.

    Floored at 1e-3 of the peak so that voxels seen only near window edges keep a defined weight.
    """
    axes = []
    for n in patch_zyx:
        sigma = max(n * sigma_scale, 1e-6)
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Reduced precision where the hardware has it: on CUDA bfloat16 (else float16), on a CPU with
    native bfloat16 arithmetic (AVX512-BF16 or AMX) bfloat16 — about 2.5x faster 3-D convolutions
    there; elsewhere float32. The blending, softmax and everything after stay float32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (``EDGE_NODE_CPU_BF16=0`` turns it off)."""
    if os.environ.get("EDGE_NODE_CPU_BF16", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _whole_volume(shape_zyx: tuple[int, ...], spec: InferenceSpec) -> bool:
    """Whether the manifest lets this volume run as one window of its own size."""
    return 0 < math.prod(int(n) for n in shape_zyx) <= spec.whole_volume_max_voxels


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.cuda.OutOfMemoryError; the CPU allocator a RuntimeError; numpy a MemoryError."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "not enough memory" in text


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _module_on_cpu(module: Any) -> Any:
    """A CPU copy of a bare module (the caller's module stays where it is)."""
    if isinstance(module, nn.Module):
        return copy.deepcopy(module).to("cpu")
    return module
