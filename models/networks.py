"""Network architectures that model bundles name in ``[architecture]`` and store as a state_dict.

Every network maps a batch ``[B, C_in, Z, Y, X]`` to ``(seg_logits [B, C_out, Z, Y, X], cls_logit
[B, 1] or None)``: segmentation logits on the input grid (channel c = label value c, channel 0 =
background) and, when the network has a study-level head, one "finding present" logit per window.
`split_outputs` brings the outputs of any model (a TorchScript file returning a tensor, a tuple or a
list) to that pair. This module knows nothing of DICOM, manifests on disk or devices.

- ``unet3d`` (`UNet3D`): a 3-D U-Net (Çiçek et al. 2016, in nnU-Net's plain-convolution form) with
  configurable width, depth, normalisation and optional residual blocks, plus an optional
  classification head pooling the bottleneck and/or the last decoder features.
- ``fcn3d`` (`FCN3D`): a plain fully convolutional stack without down-sampling; small enough to set by
  hand (the tests' tiny model) or to serve as a fast baseline.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.spec import ArchitectureSpec, SpecError


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True, eps=1e-5)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"norm must be 'instance', 'batch' or 'group', got {kind!r}")


def global_mean_max(x: Tensor) -> list[Tensor]:
    """``[mean, max]`` of each channel of ``x`` ``[B, C, Z, Y, X]`` over its voxels, each ``[B, C]``.

    On a channels-last tensor (the CPU layout, `models.loader`) the voxels × channels view costs
    nothing: the sum is then one matrix product with a row of ones and the maximum a reduction over
    rows, about 5x faster on a CPU than reducing over three strided axes (0.03 s against 0.16 s for
    12 channels of 2.4 million voxels in bfloat16; the head pools a full-resolution decoder level).
    """
    b, c = x.shape[0], x.shape[1]
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        rows = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
        ones = torch.ones((b, 1, rows.shape[1]), dtype=rows.dtype, device=rows.device)
        total = torch.bmm(ones, rows).reshape(b, c)
        return [total / float(rows.shape[1]), rows.max(dim=1)[0]]
    flat = x.reshape(b, c, -1)
    return [flat.mean(dim=2), flat.amax(dim=2)]


class ConvBlock(nn.Module):
    """Two 3×3×3 convolutions, each followed by normalisation and LeakyReLU; the first may stride.

    With ``residual`` the block adds its (projected when the shape changes) input before the last
    activation, as in residual encoders.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "instance",
                 residual: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.residual = residual
        if residual and (stride != 1 or in_channels != out_channels):
            self.project: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(norm, out_channels))
        else:
            self.project = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.dropout(y)
        y = self.norm2(self.conv2(y))
        if self.residual:
            y = y + self.project(x)
        return self.act(y)


class UNet3D(nn.Module):
    """A 3-D U-Net with an optional study-level classification head.

    Parameters
    ----------
    in_channels, out_channels
        Input channels (1 for CT) and output classes including background.
    width
        Feature channels at full resolution; each level doubles them, capped at ``max_width``.
    depth
        Resolution levels (``depth - 1`` stride-2 down-samplings). Inputs whose sizes are not a multiple
        of ``2 ** (depth - 1)`` are padded internally and the output is cropped back.
    norm
        ``"instance"`` (default; batch-size independent, so sliding-window batching cannot change the
        result), ``"batch"`` or ``"group"``.
    residual
        Residual convolution blocks.
    classification_head
        Add the study-level head: global average and max pooling of the features named by
        ``head_features`` (``"bottleneck"``, ``"decoder"`` = last decoder level, or ``"both"``) → a
        linear layer → one logit per input.
    dropout
        Channel dropout inside the blocks (training only).
    deep_supervision
        Number of coarser decoder levels (at most ``depth - 2``) that get their own 1×1×1 segmentation
        head for training (nnU-Net's deep supervision): `forward_train` returns their logits too, so
        that those levels learn from the labels directly. `forward` never runs them: inference and
        TorchScript exports see ``(seg, cls)`` as for every network.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, width: int = 16, depth: int = 4,
                 norm: str = "instance", residual: bool = False, classification_head: bool = False,
                 head_features: str = "bottleneck", max_width: int = 320, dropout: float = 0.0,
                 deep_supervision: int = 0) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("depth, width, in_channels and out_channels must be positive")
        if head_features not in ("bottleneck", "decoder", "both"):
            raise ValueError(f"head_features must be 'bottleneck', 'decoder' or 'both', got {head_features!r}")
        if not 0 <= deep_supervision <= max(0, depth - 2):
            raise ValueError(f"deep_supervision must be between 0 and depth - 2 = {max(0, depth - 2)}, "
                             f"got {deep_supervision}")
        _norm(norm, 8)  # validates the name early
        widths = [min(width * 2 ** level, max_width) for level in range(depth)]
        self.multiple = 2 ** (depth - 1)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for level, channels in enumerate(widths):
            self.encoders.append(ConvBlock(previous, channels, stride=1 if level == 0 else 2,
                                           norm=norm, residual=residual, dropout=dropout))
            previous = channels
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth - 2, -1, -1):
            self.upsamplers.append(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2,
                                                      bias=False))
            self.decoders.append(ConvBlock(2 * widths[level], widths[level], norm=norm,
                                           residual=residual, dropout=dropout))
        self.seg_head = nn.Conv3d(widths[0], out_channels, 1)
        # Auxiliary heads, finest first: level k (k = 1 .. deep_supervision) of the decoder.
        self.aux_heads = nn.ModuleList(nn.Conv3d(widths[k], out_channels, 1)
                                       for k in range(1, deep_supervision + 1))
        self.head_features = head_features
        self.has_head = classification_head
        pooled = 0
        if head_features in ("bottleneck", "both"):
            pooled += 2 * widths[-1]
        if head_features in ("decoder", "both"):
            pooled += 2 * widths[0]
        self.cls_head = nn.Linear(pooled, 1) if classification_head else nn.Identity()

    def _run(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], list[Tensor]]:
        """Segmentation logits, head logit and the decoder's outputs, coarsest level first."""
        size = x.shape[2:]
        pads: list[int] = []
        for n in (int(size[2]), int(size[1]), int(size[0])):  # F.pad order: last axis first
            pads += [0, (-n) % self.multiple]
        if sum(pads) > 0:
            x = F.pad(x, pads)
        skips: list[Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        bottleneck = x
        decoded: list[Tensor] = []
        for i, (up, decoder) in enumerate(zip(self.upsamplers, self.decoders)):
            x = up(x)
            x = decoder(torch.cat([x, skips[-2 - i]], dim=1))
            decoded.append(x)
        seg = self.seg_head(x)
        seg = seg[:, :, : int(size[0]), : int(size[1]), : int(size[2])]
        cls: Optional[Tensor] = None
        if self.has_head:
            pooled: list[Tensor] = []
            if self.head_features in ("bottleneck", "both"):
                pooled += global_mean_max(bottleneck)
            if self.head_features in ("decoder", "both"):
                pooled += global_mean_max(x)
            cls = self.cls_head(torch.cat(pooled, dim=1))
        return seg, cls, decoded

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        seg, cls, _ = self._run(x)
        return seg, cls

    @torch.jit.unused
    def forward_train(self, x: Tensor) -> tuple[Tensor, Optional[Tensor], list[Tensor]]:
        """`forward` plus the deep-supervision outputs: ``(seg, cls, [aux_1, ...])``, ``aux_k`` the
        logits of decoder level k on the input grid down-sampled ``2 ** k`` times (ceiling); an empty
        list without ``deep_supervision``."""
        seg, cls, decoded = self._run(x)
        size = [int(n) for n in x.shape[2:]]
        aux: list[Tensor] = []
        for k, head in enumerate(self.aux_heads, start=1):
            f = 2 ** k
            aux.append(head(decoded[-1 - k])[:, :, : -(-size[0] // f), : -(-size[1] // f), : -(-size[2] // f)])
        return seg, cls, aux


class FCN3D(nn.Module):
    """A plain fully convolutional network: hidden convolutions ("same" padding) → 1×1×1 classifier.

    Parameters
    ----------
    in_channels, out_channels
        Input channels and output classes including background.
    channels, kernel_sizes, dilations
        One entry per hidden layer: its width, cubic kernel size (odd) and dilation.
    activation
        ``"relu"``, ``"leaky_relu"`` or ``"sigmoid"`` after every hidden layer.
    classification_head
        Add a head: global max pooling of the segmentation logits → linear → one logit.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 channels: tuple[int, ...] | list[int] = (16, 16),
                 kernel_sizes: tuple[int, ...] | list[int] = (3, 3),
                 dilations: tuple[int, ...] | list[int] | None = None, activation: str = "relu",
                 classification_head: bool = False) -> None:
        super().__init__()
        dilations = tuple(dilations) if dilations is not None else (1,) * len(channels)
        if not (len(channels) == len(kernel_sizes) == len(dilations)):
            raise ValueError("channels, kernel_sizes and dilations need one entry per hidden layer")
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError("kernel sizes must be odd (the output stays on the input grid)")
        acts: dict[str, Callable[[], nn.Module]] = {
            "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid}
        if activation not in acts:
            raise ValueError(f"activation must be one of {', '.join(acts)}, got {activation!r}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width, kernel, dilation in zip(channels, kernel_sizes, dilations):
            layers += [nn.Conv3d(previous, width, kernel, padding=dilation * (kernel // 2),
                                 dilation=dilation), acts[activation]()]
            previous = width
        self.features = nn.Sequential(*layers)
        self.seg_head = nn.Conv3d(previous, out_channels, 1)
        self.has_head = classification_head
        self.cls_head = nn.Linear(out_channels, 1) if classification_head else nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        seg = self.seg_head(self.features(x))
        cls: Optional[Tensor] = None
        if self.has_head:
            cls = self.cls_head(seg.amax(dim=(2, 3, 4)))
        return seg, cls


class PatchClassifier3D(nn.Module):
    """A small 3-D classifier of cubic patches: one logit per patch (``[B, 1]``), e.g. "this candidate is
    a nodule" (`pipeline.candidates`).

    A stem convolution at full resolution, then ``levels`` `ConvBlock` s that each halve the grid
    (stride 2) and double the width, global average and max pooling, and a linear layer. Most of the
    work is on the coarser grids, so a hundred 24³ patches take a fraction of a second on a CPU.

    Parameters
    ----------
    in_channels
        Input channels (1: the windowed CT patch).
    width
        Channels of the stem; level n has ``width * 2 ** (n + 1)``.
    levels
        Strided blocks after the stem.
    norm
        ``"batch"`` (default), ``"instance"`` or ``"group"``.
    dropout
        Dropout before the linear layer (training only).
    """

    def __init__(self, in_channels: int = 1, width: int = 8, levels: int = 3, norm: str = "batch",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or levels < 1:
            raise ValueError("in_channels, width and levels must be positive")
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width),
                                  nn.LeakyReLU(0.01, inplace=True))
        blocks: list[nn.Module] = []
        channels = width
        for _ in range(levels):
            blocks.append(ConvBlock(channels, channels * 2, stride=2, norm=norm))
            channels *= 2
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(2 * channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x))
        return self.head(self.dropout(torch.cat(global_mean_max(features), dim=1)))


def fold_batch_norm(network: nn.Module) -> int:
    """Fold every batch normalisation that follows a convolution in a `ConvBlock` into that
    convolution's weights and bias, for inference; returns how many were folded.

    In evaluation mode a batch normalisation is a fixed per-channel scale and shift, so the folded
    convolution computes the same function (to float rounding) without a pass over the activations:
    on a CPU those passes took a fifth of the default model's inference time. Only for a network in
    evaluation mode that will not be trained again; instance and group normalisation (statistics of
    each input) are left as they are.
    """
    if network.training:
        raise ValueError("fold_batch_norm needs a network in evaluation mode")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for block in network.modules():
        if not isinstance(block, ConvBlock):
            continue
        for conv_name, norm_name in (("conv1", "norm1"), ("conv2", "norm2")):
            conv, norm = getattr(block, conv_name), getattr(block, norm_name)
            if isinstance(norm, nn.BatchNorm3d) and isinstance(conv, nn.Conv3d):
                setattr(block, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(block, norm_name, nn.Identity())
                folded += 1
        project = block.project
        if (isinstance(project, nn.Sequential) and len(project) == 2 and isinstance(project[0], nn.Conv3d)
                and isinstance(project[1], nn.BatchNorm3d)):
            block.project = nn.Sequential(fuse_conv_bn_eval(project[0], project[1]), nn.Identity())
            folded += 1
    return folded


class ZeroChannelConv3d(nn.Module):
    """A convolution of a one-channel input, run as the same convolution of that input with an added
    all-zero channel (whose weights are zero): the same function, computed by oneDNN's channels-last
    kernels instead of PyTorch's generic 3-D convolution, which is what a one-channel input gets on a
    CPU. The default model's first convolution (1 -> 12 channels, 3x3x3, on a 2-million-voxel lung
    crop, float32, 2-core AVX2 CPU) then takes 0.085 s instead of 0.19 s, and a whole network pass
    1.33 s instead of 1.44 s. Built by `widen_single_channel_inputs`; for inference only.
    """

    def __init__(self, conv: nn.Conv3d, channels: int = 2) -> None:
        super().__init__()
        if conv.in_channels != 1 or conv.groups != 1 or channels < 2:
            raise ValueError("ZeroChannelConv3d widens a one-channel, ungrouped convolution to >= 2 channels")
        weight = conv.weight.detach()
        widened = torch.zeros((weight.shape[0], channels, *weight.shape[2:]), dtype=weight.dtype,
                              device=weight.device)
        widened[:, :1] = weight
        self.weight = nn.Parameter(widened, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.channels = channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ZeroChannelConv3d supports zero padding given in voxels only")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != 1:
            raise ValueError(f"expected a one-channel input, got {x.shape[1]} channels")
        shape = (x.shape[0], self.channels, x.shape[2], x.shape[3], x.shape[4])
        wide = torch.zeros(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last_3d)
        wide[:, :1] = x
        return F.conv3d(wide, self.weight, self.bias, self.stride, self.padding, self.dilation)


def widen_single_channel_inputs(network: nn.Module, channels: int = 2) -> int:
    """Replace every `ConvBlock` first convolution that reads a one-channel input by a
    `ZeroChannelConv3d` (same outputs, faster on a CPU); returns how many were replaced.

    For a network in evaluation mode that will not be trained again, after `fold_batch_norm` (the
    replacement keeps the folded bias).
    """
    if network.training:
        raise ValueError("widen_single_channel_inputs needs a network in evaluation mode")
    widened = 0
    for block in network.modules():
        if isinstance(block, ConvBlock) and isinstance(block.conv1, nn.Conv3d) and block.conv1.in_channels == 1 \
                and block.conv1.groups == 1:
            block.conv1 = ZeroChannelConv3d(block.conv1, channels)
            widened += 1
    return widened


ARCHITECTURES: dict[str, type[nn.Module]] = {"unet3d": UNet3D, "fcn3d": FCN3D}
#: Networks of a bundle's candidate stage (``[candidates.architecture]``): one logit per patch.
CANDIDATE_ARCHITECTURES: dict[str, type[nn.Module]] = {"patch_classifier3d": PatchClassifier3D}


def build_network(architecture: ArchitectureSpec,
                  registry: Mapping[str, type[nn.Module]] = ARCHITECTURES) -> nn.Module:
    """Instantiate the network a manifest names, with its parameters.

    Raises
    ------
    SpecError
        Unknown architecture, unknown parameter (named) or a value the constructor rejects.
    """
    cls = registry.get(architecture.name)
    if cls is None:
        raise SpecError(f"architecture.name {architecture.name!r} is unknown; use one of "
                        f"{', '.join(registry)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    params = dict(architecture.params)
    for key in sorted(params):
        if key not in accepted:
            raise SpecError(f"unknown key architecture.params.{key} for {architecture.name} "
                            f"(allowed: {', '.join(sorted(accepted))})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"architecture.params for {architecture.name}: {exc}") from None


def split_outputs(output: Any) -> tuple[Tensor, Tensor | None]:
    """Bring a model's raw output to ``(seg_logits [B, C, Z, Y, X], cls_logit [B, 1] or None)``.

    Accepts a tensor (segmentation only), a tuple or list ``(seg,)`` or ``(seg, cls)`` (``cls`` may be
    None, shaped ``[B]`` or ``[B, 1]``), or a mapping with ``"seg"``/``"seg_logits"`` and optionally
    ``"cls"``/``"cls_logit"`` — the forms TorchScript exports of segmentation networks use.

    Raises
    ------
    TypeError
        Any other form, or a segmentation output that is not 5-D.
    """
    cls: Tensor | None = None
    if isinstance(output, Tensor):
        seg = output
    elif isinstance(output, (tuple, list)) and 1 <= len(output) <= 2:
        seg = output[0]
        cls = output[1] if len(output) == 2 else None
    elif isinstance(output, Mapping):
        seg = output.get("seg_logits", output.get("seg"))
        cls = output.get("cls_logit", output.get("cls"))
    else:
        raise TypeError(f"model output of type {type(output).__name__} is not a tensor, "
                        "(seg, cls) tuple or mapping")
    if not isinstance(seg, Tensor) or seg.dim() != 5:
        raise TypeError("the model's segmentation output must be a 5-D tensor [B, C, Z, Y, X]")
    if cls is not None:
        if not isinstance(cls, Tensor):
            raise TypeError("the model's classification output must be a tensor or None")
        cls = cls.reshape(seg.shape[0], -1)[:, :1]
    return seg, cls
