"""Load a bundle's weights onto a device, checked against the manifest's sha256, and keep them warm.

The loader owns three things: choosing the torch device (`resolve_device`), setting torch's CPU threads
once per process (`configure_torch`), and turning a `ModelSpec` into a ready `ModelHandle` in eval mode
(`load_model`), cached per (model name, version, device) so that a worker pays the load once. It reads
only the bundle's files; it knows nothing of DICOM or of the pipeline's stages.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.networks import CANDIDATE_ARCHITECTURES, build_network, fold_batch_norm, widen_single_channel_inputs
from models.spec import ArchitectureSpec, ModelError, ModelSpec, WeightsFormat, WeightsSpec

log = logging.getLogger(__name__)


class WeightsError(ModelError):
    """A weights file that is missing, altered (sha256 mismatch) or does not fit the architecture.

    Permanent for the bundle: retrying cannot help; the message names the file and the fix.
    """


class DeviceError(ModelError):
    """A configured device that this machine does not have (e.g. ``cuda`` without a CUDA GPU)."""


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """A loaded model ready for inference: the manifest, the module in eval mode and its device.

    ``module(x)`` takes ``[B, C_in, Z, Y, X]`` float32 on ``device`` and returns what
    `models.networks.split_outputs` understands. ``candidates`` is the candidate stage's classifier
    (``[candidates]`` in the manifest), or None.
    """

    spec: ModelSpec
    module: nn.Module
    device: torch.device
    candidates: nn.Module | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.spec.name, self.spec.version, str(self.device))


_cache: dict[tuple[str, str, str], ModelHandle] = {}
_cache_lock = threading.Lock()
_threads_configured: int | None = None


def resolve_device(name: str = "auto") -> torch.device:
    """Turn the configured device name into a torch device.

    Parameters
    ----------
    name
        ``"auto"`` (the first CUDA GPU when one is usable, else the CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.

    Raises
    ------
    DeviceError
        A CUDA device is named but CUDA is unavailable or N is out of range; an unknown name.
    """
    value = (name or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} configured but CUDA is not available on this machine; "
                              "set [pipeline] device = \"auto\" or \"cpu\"")
        index = 0
        if value != "cuda":
            try:
                index = int(value.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"device {name!r} is not cuda:N with a number N") from None
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise DeviceError(f"device {name!r} does not exist: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    raise DeviceError(f"device {name!r} is unknown; use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")


def configure_torch(threads: int = 0) -> None:
    """Set torch's intra-op CPU threads, once per process.

    Parameters
    ----------
    threads
        Threads for CPU kernels; 0 leaves torch's default (one per core). Later calls with another value
        are ignored with a debug line: changing the pool while a model runs costs more than it gains.
    """
    global _threads_configured
    if _threads_configured is not None:
        if threads != _threads_configured:
            log.debug("event=torch_threads_unchanged requested=%d kept=%d", threads, _threads_configured)
        return
    if threads > 0:
        torch.set_num_threads(threads)
    _threads_configured = threads
    log.info("event=torch_configured threads=%d", torch.get_num_threads())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_weights(spec: ModelSpec, weights: WeightsSpec | None = None) -> Path:
    """Check that a weights file of the bundle (the network's, or ``weights``: e.g. the candidate
    stage's) exists and matches the manifest's sha256; return its path.

    Raises
    ------
    WeightsError
        Missing file, or a hash mismatch naming the file, the expected and the actual hash.
    """
    weights = weights or spec.weights
    path = spec.bundle_dir / weights.file
    if not path.is_file():
        raise WeightsError(f"model {spec.name} {spec.version}: weights file {path} is missing; "
                           "reinstall the bundle")
    actual = sha256_file(path)
    if actual != weights.sha256:
        raise WeightsError(f"model {spec.name} {spec.version}: weights file {path} has sha256 {actual}, "
                           f"the manifest expects {weights.sha256}; the file is damaged or does "
                           "not belong to this model.toml")
    return path


def load_model(spec: ModelSpec, device: torch.device | str = "auto") -> ModelHandle:
    """Load (or fetch warm from the cache) the model of a manifest onto a device.

    Parameters
    ----------
    spec
        The bundle's manifest.
    device
        A torch device or a name for `resolve_device`.

    Raises
    ------
    WeightsError
        Missing or altered weights, or weights that do not fit the architecture.
    DeviceError
        An unusable device name.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device)
    key = (spec.name, spec.version, str(target))
    with _cache_lock:
        handle = _cache.get(key)
        if handle is not None and handle.spec == spec:
            return handle
        started = time.perf_counter()
        path = verify_weights(spec)
        module = _load_module(spec, path, target)
        candidates = None
        if spec.candidates is not None:
            candidates = _prepare(_load_state_dict(spec, spec.candidates.architecture,
                                                   verify_weights(spec, spec.candidates.weights),
                                                   CANDIDATE_ARCHITECTURES), target)
        handle = ModelHandle(spec=spec, module=module, device=target, candidates=candidates)
        _cache[key] = handle
    log.info("event=model_loaded model=%s version=%s device=%s format=%s seconds=%.3f", spec.name,
             spec.version, target, spec.weights.format.value, time.perf_counter() - started)
    return handle


def clear_cache() -> None:
    """Forget every warm model (tests; a worker reloading its bundles)."""
    with _cache_lock:
        _cache.clear()


def _load_module(spec: ModelSpec, path: Path, device: torch.device) -> nn.Module:
    if spec.weights.format is WeightsFormat.TORCHSCRIPT:
        try:
            with warnings.catch_warnings():
                # torch ≥ 2.9 deprecates TorchScript in favour of torch.export, but it is the format
                # users' existing segmentation models ship in (issue 3, item 3).
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.",
                                        category=DeprecationWarning)
                module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise WeightsError(f"model {spec.name}: {path} is not a TorchScript file: "
                               f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        return module.eval()
    return _prepare(_load_state_dict(spec, spec.architecture, path), device)


def _load_state_dict(spec: ModelSpec, architecture: ArchitectureSpec, path: Path,
                     registry: dict[str, type[nn.Module]] | None = None) -> nn.Module:
    """Build ``architecture`` and load the state_dict at ``path`` into it (strictly), in eval mode."""
    network = build_network(architecture) if registry is None else build_network(architecture, registry)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad pickle/zip
        raise WeightsError(f"model {spec.name}: {path} is not a torch state_dict file: "
                           f"{type(exc).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model {spec.name}: {path} holds a {type(state).__name__}, not a state_dict")
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"model {spec.name}: {path} does not fit architecture "
                           f"{architecture.name} with these params: "
                           f"{str(exc).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"model {spec.name}: {path} does not fit architecture {architecture.name} with "
            f"these params: missing {list(result.missing_keys)[:5]}, unexpected "
            f"{list(result.unexpected_keys)[:5]}")
    return network.eval()


def _prepare(network: nn.Module, device: torch.device) -> nn.Module:
    """A loaded network made ready for inference on ``device``."""
    # Inference only: batch normalisation folded into the convolutions before it (the same function,
    # without a pass over the activations per normalisation).
    fold_batch_norm(network)
    if device.type == "cpu":
        # A one-channel first convolution would run on PyTorch's generic kernel; with a zero channel
        # added it runs on oneDNN's (the same outputs, in less than half the time).
        widen_single_channel_inputs(network)
        # Channels-last 3-D weights and activations: oneDNN's convolutions are faster on them (the
        # default model's whole-volume window: 0.91 s against 1.55 s on a 2-core CPU); `pipeline.infer`
        # passes channels-last input.
        return network.to(device, memory_format=torch.channels_last_3d)
    return network.to(device)
