"""A tiny, deterministic model bundle for tests: real CT behaviour without training.

`make_tiny_bundle` writes a bundle folder (``model.toml`` + weights) whose network is an ``fcn3d`` with
weights set by hand, so that on CT normalised by its own plan (HU window −1000..400 → [0, 1]):

- label 1 "Lung": voxels in −950..−500 HU;
- label 2 "Nodule": soft-tissue voxels (≥ −300 HU) that form a blob (≥ 35 % soft tissue in a 5-voxel
  neighbourhood, so thin vessels stay out) inside lung (≥ 50 % lung in a 13-voxel neighbourhood, so
  the chest wall and the mediastinum stay out);
- everything else background; the study-level head's logit is the largest nodule logit.

Layers (``fcn3d``): 1×1×1 conv → three steep sigmoids at −950, −500 and −300 HU; a 7×7×7 conv with
dilation 2 → lung, soft tissue, lung context (mean over 13³ voxels) and blob (mean of soft tissue over
offsets ±2); a 1×1×1 classifier. Same input → same output, bit for bit, on CPU.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

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


def _normalised(hu: float) -> float:
    return (hu - HU_MIN) / (HU_MAX - HU_MIN)


def tiny_network(*, classification_head: bool = True) -> FCN3D:
    """The hand-weighted network (see the module docstring), in eval mode."""
    net = FCN3D(in_channels=1, out_channels=3, channels=(3, 4), kernel_sizes=(1, _KERNEL),
                dilations=(1, _DILATION), activation="sigmoid",
                classification_head=classification_head)
    conv1, conv2 = net.features[0], net.features[2]
    with torch.no_grad():
        # Layer 1: s_lo = [x > -950 HU], s_hi = [x > -500 HU], s_soft = [x > -300 HU].
        thresholds = torch.tensor([_normalised(-950.0), _normalised(-500.0), _normalised(-300.0)])
        conv1.weight.copy_(torch.full((3, 1, 1, 1, 1), _STEEPNESS))
        conv1.bias.copy_(-_STEEPNESS * thresholds)
        # Layer 2 (7×7×7, dilation 2): lung, soft, lung context, blob.
        w = torch.zeros(4, 3, _KERNEL, _KERNEL, _KERNEL)
        c = _KERNEL // 2
        w[0, 0, c, c, c], w[0, 1, c, c, c] = _GAIN, -_GAIN  # lung = s_lo - s_hi
        w[1, 2, c, c, c] = _GAIN  # soft tissue
        w[2, 0], w[2, 1] = _GAIN / _KERNEL**3, -_GAIN / _KERNEL**3  # lung fraction over 13³ voxels
        w[3, 2, c - 1 : c + 2, c - 1 : c + 2, c - 1 : c + 2] = _GAIN / 27.0  # soft fraction, offsets ±2
        conv2.weight.copy_(w)
        conv2.bias.copy_(torch.tensor([-0.5, -0.5, -0.5, -0.35]) * _GAIN)
        # Classifier: background 0; lung = A(lung - 0.5); nodule = A(soft + context + blob - 2.5).
        head = torch.zeros(3, 4, 1, 1, 1)
        head[1, 0] = _LOGIT_SCALE
        head[2, 1:4] = _LOGIT_SCALE
        net.seg_head.weight.copy_(head)
        net.seg_head.bias.copy_(torch.tensor([0.0, -0.5, -2.5]) * _LOGIT_SCALE)
        if classification_head:
            net.cls_head.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
            net.cls_head.bias.zero_()
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
                     patch_size_zyx: Sequence[int] = (16, 64, 64), batch_size: int = 2,
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
    patch_size_zyx, batch_size
        Sliding-window settings written to ``[inference]``.
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
        "channels = [3, 4]",
        f"kernel_sizes = [1, {_KERNEL}]",
        f"dilations = [1, {_DILATION}]",
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
        "overlap = 0.25",
        f"batch_size = {int(batch_size)}",
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
