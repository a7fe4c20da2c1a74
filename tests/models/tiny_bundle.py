"""A tiny, deterministic model bundle for tests: real CT behaviour without training.

`make_tiny_bundle` writes a bundle folder (``model.toml`` + weights) whose network is an ``fcn3d`` with
weights set by hand, so that on CT normalised by its own plan (HU window −1000..400 → [0, 1]):

- label 1 "Lung": voxels in −950..−500 HU;
- label 2 "Nodule": soft tissue (≥ −300 HU) within 2 voxels of a nodule core. A core is a soft-tissue
  voxel that is part of a blob (≥ 35 % soft tissue over offsets ±2), lies in lung (≥ 50 % lung in the
  13³ neighbourhood, so the chest wall and the mediastinum stay out) and has lung on both sides along
  each of the three axes at 2, 4 or 6 voxels (a vessel running along an axis does not);
- everything else background; the study-level head's logit is the largest nodule logit.

Layers (``fcn3d``, sigmoid activations): 1×1×1 → three steep steps at −950, −500 and −300 HU; 7×7×7 with
dilation 2 → lung, soft tissue, lung context, blob and the nine directional lung tests; 1×1×1 → nodule
cores per distance; 5×5×5 → cores grown by 2 voxels; a 1×1×1 classifier. On the phantoms of
`models.phantoms` resampled to 2 mm and cropped to the lungs it reaches lung Dice ≈ 0.96 and finds most
solid nodules with some vessel false positives (ground-glass nodules, below −300 HU, are missed): a
test fixture, not a detector. Same input → same output, bit for bit, on CPU.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import nn

from models.networks import FCN3D

HU_MIN = -1000.0
HU_MAX = 400.0
MODEL_NAME = "tiny_test_model"
MODEL_VERSION = "1.0.0"

_STEEPNESS = 60.0  # per unit of normalised intensity: a transition about 23 HU wide
_GAIN = 20.0
_LOGIT_SCALE = 10.0
_KERNEL = 7
_DILATION = 2
_DIRECTION_OFFSETS = (1, 2, 3)  # kernel offsets: 2, 4 and 6 voxels


def _normalised(hu: float) -> float:
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


def _set(layer: nn.Conv3d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    layer.weight.copy_(weight)
    if layer.bias is not None:
        layer.bias.copy_(bias)


def tiny_network(*, classification_head: bool = True) -> FCN3D:
    """The hand-weighted network (see the module docstring), in eval mode."""
    distances = len(_DIRECTION_OFFSETS)
    net = FCN3D(in_channels=1, out_channels=3, channels=(3, 4 + 3 * distances, 2 + distances, 3),
                kernel_sizes=(1, _KERNEL, 1, 5), dilations=(1, _DILATION, 1, 1), activation="sigmoid",
                classification_head=classification_head)
    conv1, conv2, conv3, conv4 = (cast(nn.Conv3d, net.features[i]) for i in (0, 2, 4, 6))
    g = _GAIN
    with torch.no_grad():
        # Layer 1 (1×1×1): s_lo = [> -950 HU], s_hi = [> -500 HU], s_soft = [> -300 HU].
        thresholds = torch.tensor([_normalised(-950.0), _normalised(-500.0), _normalised(-300.0)])
        _set(conv1, torch.full((3, 1, 1, 1, 1), _STEEPNESS), -_STEEPNESS * thresholds)
        # Layer 2 (7×7×7, dilation 2: kernel offset k is 2k voxels); lung = s_lo - s_hi.
        w = torch.zeros(4 + 3 * distances, 3, _KERNEL, _KERNEL, _KERNEL)
        b = torch.zeros(4 + 3 * distances)
        c = _KERNEL // 2
        w[0, 0, c, c, c], w[0, 1, c, c, c], b[0] = g, -g, -0.5 * g  # lung here
        w[1, 2, c, c, c], b[1] = g, -0.5 * g  # soft tissue here
        w[2, 0], w[2, 1], b[2] = g / _KERNEL**3, -g / _KERNEL**3, -0.5 * g  # ≥ 50 % lung in 13³
        w[3, 2, c - 1 : c + 2, c - 1 : c + 2, c - 1 : c + 2], b[3] = g / 27, -0.35 * g  # blob
        for n, (k, axis) in enumerate(itertools.product(_DIRECTION_OFFSETS, range(3))):
            for sign in (-1, 1):  # lung on both sides along one axis: what a tube lacks on its own
                tap = [c, c, c]
                tap[axis] += sign * k
                w[4 + n, 0, tap[0], tap[1], tap[2]] = g
                w[4 + n, 1, tap[0], tap[1], tap[2]] = -g
            b[4 + n] = -1.5 * g
        _set(conv2, w, b)
        # Layer 3 (1×1×1): lung, soft, and per distance a nodule core = soft AND context AND blob AND
        # lung on both sides along all three axes.
        w3 = torch.zeros(2 + distances, 4 + 3 * distances, 1, 1, 1)
        b3 = torch.zeros(2 + distances)
        w3[0, 0], b3[0] = g, -0.5 * g
        w3[1, 1], b3[1] = g, -0.5 * g
        for i in range(distances):
            terms = [1, 2, 3, 4 + 3 * i, 5 + 3 * i, 6 + 3 * i]
            w3[2 + i, terms] = g
            b3[2 + i] = -(len(terms) - 0.5) * g
        _set(conv3, w3, b3)
        # Layer 4 (5×5×5): lung, soft, and "a nodule core within 2 voxels" (grows cores to edges).
        w4 = torch.zeros(3, 2 + distances, 5, 5, 5)
        w4[0, 0, 2, 2, 2] = g
        w4[1, 1, 2, 2, 2] = g
        w4[2, 2:] = g
        _set(conv4, w4, torch.tensor([-0.5, -0.5, -0.5]) * g)
        # Classifier: background 0; lung = A(lung - 0.5); nodule = A(soft + near core - 1.5).
        head = torch.zeros(3, 3, 1, 1, 1)
        head[1, 0] = _LOGIT_SCALE
        head[2, 1:3] = _LOGIT_SCALE
        _set(net.seg_head, head, torch.tensor([0.0, -0.5, -1.5]) * _LOGIT_SCALE)
        if classification_head:
            _set(cast(nn.Linear, net.cls_head), torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1))
    return net.eval()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def make_tiny_bundle(dest: Path, *, torchscript: bool = False,
                     resample_spacing_mm: Sequence[float] | None = None,
                     patch_size_zyx: Sequence[int] = (32, 96, 96), batch_size: int = 2,
                     whole_volume_max_voxels: int = 2_000_000,
                     classification_head: bool = True, name: str = MODEL_NAME,
                     segmentation_type: str = "BINARY", min_slices: int = 4) -> Path:
    """Write the tiny model bundle into ``dest`` (created if needed) and return the folder.

    Parameters
    ----------
    dest
        The bundle folder; ``model.toml`` and ``weights.pt`` (state_dict) or ``weights.ts``
        (TorchScript) are written there. To use it as a model directory, pass ``dest.parent`` or
        ``dest`` itself to `models.registry.ModelRegistry`.
    torchscript
        Save a scripted module instead of a state_dict.
    resample_spacing_mm
        Add a resample step to this spacing (z, y, x in mm) to the plan; None = analyse on the source
        grid.
    patch_size_zyx, batch_size, whole_volume_max_voxels
        Sliding-window settings written to ``[inference]``; by default a volume of up to 2 million
        voxels (every test series) is run as one window of its own size, the fastest on a CPU. Pass
        0 to exercise the sliding window.
    classification_head
        Whether the network has the study-level head (the study finding's source is ``head`` either way;
        without it the pipeline falls back to the largest component score).
    name, segmentation_type, min_slices
        Manifest values, for tests that need two bundles, a FRACTIONAL SEG, or other routing.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    net = tiny_network(classification_head=classification_head)
    if torchscript:
        weights = dest / "weights.ts"
        with warnings.catch_warnings():  # TorchScript is deprecated in torch ≥ 2.9, still supported
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.",
                                    category=DeprecationWarning)
            torch.jit.save(torch.jit.script(net), str(weights))
        fmt = "torchscript"
    else:
        weights = dest / "weights.pt"
        torch.save(net.state_dict(), weights)
        fmt = "state_dict"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    steps: list[dict[str, Any]] = []
    if resample_spacing_mm is not None:
        steps.append({"op": "resample", "spacing_mm": [float(v) for v in resample_spacing_mm]})
    steps += [{"op": "clip", "min": HU_MIN, "max": HU_MAX},
              {"op": "normalize", "mode": "window", "min": HU_MIN, "max": HU_MAX}]
    lines = [
        f"name = {_toml_value(name)}",
        f"version = {_toml_value(MODEL_VERSION)}",
        'description = "Hand-weighted test model: lung by HU window, nodule = soft-tissue blob in lung"',
        'family = { value = "123110", scheme = "DCM", meaning = "Artificial Intelligence" }',
        "",
        "[architecture]",
        'name = "fcn3d"',
        "[architecture.params]",
        "in_channels = 1",
        "out_channels = 3",
        f"channels = [3, {4 + 3 * len(_DIRECTION_OFFSETS)}, {2 + len(_DIRECTION_OFFSETS)}, 3]",
        f"kernel_sizes = [1, {_KERNEL}, 1, 5]",
        f"dilations = [1, {_DILATION}, 1, 1]",
        'activation = "sigmoid"',
        f"classification_head = {_toml_value(classification_head)}",
        "",
        "[weights]",
        f"file = {_toml_value(weights.name)}",
        f"sha256 = {_toml_value(sha256)}",
        f"format = {_toml_value(fmt)}",
        "",
        "[series]",
        'modality = ["CT"]',
        'body_part = ["CHEST", "LUNG", "THORAX"]',
        f"min_slices = {min_slices}",
        "max_slice_thickness_mm = 5.0",
        'image_type_excludes = ["LOCALIZER"]',
        "",
    ]
    for step in steps:
        lines.append("[[preprocess]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in step.items()]
    lines += [
        "",
        "[inference]",
        f"patch_size_zyx = {_toml_value([int(v) for v in patch_size_zyx])}",
        "overlap = 0.5",
        f"batch_size = {int(batch_size)}",
        f"whole_volume_max_voxels = {int(whole_volume_max_voxels)}",
        "gaussian_sigma_scale = 0.125",
        "",
        "[[labels]]",
        "value = 1",
        'name = "Lung"',
        'category = { value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }',
        'type = { value = "39607008", scheme = "SCT", meaning = "Lung" }',
        "color_rgb = [128, 174, 128]",
        "threshold = 0.5",
        "",
        "[[labels]]",
        "value = 2",
        'name = "Nodule"',
        'category = { value = "49755003", scheme = "SCT", meaning = "Morphologically Abnormal Structure" }',
        'type = { value = "27925004", scheme = "SCT", meaning = "Nodule" }',
        "color_rgb = [241, 214, 145]",
        "threshold = 0.5",
        "min_size_mm3 = 10.0",
        "is_finding = true",
        'finding_site = { value = "39607008", scheme = "SCT", meaning = "Lung" }',
        "",
        "[segmentation]",
        f"type = {_toml_value(segmentation_type)}",
        "",
        "[study_finding]",
        'name = "Nodule present"',
        'code = { value = "27925004", scheme = "SCT", meaning = "Nodule" }',
        "threshold = 0.5",
        'source = "head"',
        "",
        "[outputs]",
        'seg_series_description = "Tiny test model SEG - NOT FOR DIAGNOSTIC USE"',
        'sr_series_description = "Tiny test model SR - NOT FOR DIAGNOSTIC USE"',
        "",
    ]
    (dest / "model.toml").write_text("\n".join(lines), encoding="utf-8")
    return dest
