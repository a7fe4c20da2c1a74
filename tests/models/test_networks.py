"""Networks: shapes, heads, TorchScript, the architecture list, output forms, and the tiny model's behaviour."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from models.networks import (ARCHITECTURES, CANDIDATE_ARCHITECTURES, FCN3D, PatchClassifier3D, UNet3D,
                             ZeroChannelConv3d, build_network, fold_batch_norm,
                             global_mean_max, split_outputs, widen_single_channel_inputs)
from models.spec import KNOWN_ARCHITECTURES, KNOWN_CANDIDATE_ARCHITECTURES, ArchitectureSpec, SpecError
from tests.models.tiny_bundle import tiny_network


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
@pytest.mark.parametrize("residual", [False, True])
def test_unet_keeps_the_input_grid_for_sizes_that_are_not_multiples(norm: str, residual: bool) -> None:
    net = UNet3D(in_channels=1, out_channels=3, width=4, depth=3, norm=norm, residual=residual).eval()
    with torch.inference_mode():
        seg, cls = net(torch.randn(2, 1, 9, 13, 17))
    assert seg.shape == (2, 3, 9, 13, 17) and cls is None


@pytest.mark.parametrize("head_features", ["bottleneck", "decoder", "both"])
def test_unet_classification_head_gives_one_logit_per_input(head_features: str) -> None:
    net = UNet3D(out_channels=2, width=4, depth=3, classification_head=True,
                 head_features=head_features).eval()
    with torch.inference_mode():
        seg, cls = net(torch.randn(3, 1, 8, 16, 16))
    assert seg.shape == (3, 2, 8, 16, 16)
    assert cls is not None and cls.shape == (3, 1)


def test_the_heads_pooling_gives_each_channels_mean_and_maximum_in_either_memory_layout() -> None:
    x = torch.randn(2, 5, 6, 7, 9) * 3 + 1
    x[1, 3, 2, 4, 8] = 50.0  # one channel's maximum in one input only
    expected_mean, expected_max = x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        mean, maximum = global_mean_max(x.contiguous(memory_format=layout))
        torch.testing.assert_close(mean, expected_mean, rtol=1e-5, atol=1e-5)
        assert torch.equal(maximum, expected_max) and float(maximum[1, 3]) == 50.0
    # Gradients reach the input through both statistics (the head trains on channels-last batches).
    leaf = x.clone().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    sum(t.sum() for t in global_mean_max(leaf)).backward()
    assert leaf.grad is not None and float(leaf.grad[1, 3, 2, 4, 8]) == pytest.approx(1.0 + 1.0 / (6 * 7 * 9))


def test_unet_with_instance_norm_gives_each_window_the_same_output_in_any_batch() -> None:
    """Sliding-window batching must not change results: no statistic is shared across the batch."""
    net = UNet3D(out_channels=2, width=4, depth=3, classification_head=True).eval()
    x = torch.randn(3, 1, 8, 16, 16)
    with torch.inference_mode():
        seg_batch, cls_batch = net(x)
        seg_one, cls_one = net(x[1:2])
    torch.testing.assert_close(seg_batch[1:2], seg_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_batch[1:2], cls_one, rtol=1e-5, atol=1e-5)


def test_unet_and_fcn_can_be_scripted_with_identical_outputs() -> None:
    x = torch.randn(1, 1, 8, 12, 12)
    for net in (UNet3D(out_channels=3, width=4, depth=2, classification_head=True).eval(),
                FCN3D(out_channels=3, channels=(4,), kernel_sizes=(3,), classification_head=True).eval()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(net)
        with torch.inference_mode():
            assert all(torch.equal(a, b) for a, b in zip(net(x), scripted(x)))


def test_deep_supervision_heads_train_the_coarser_levels_and_never_change_inference() -> None:
    net = UNet3D(out_channels=3, width=4, depth=4, classification_head=True, deep_supervision=2)
    x = torch.randn(2, 1, 9, 13, 17)
    seg, cls, aux = net.forward_train(x)
    # Level k's logits on the input grid down-sampled 2**k times (ceiling), one channel per class.
    assert seg.shape == (2, 3, 9, 13, 17) and cls is not None
    assert [tuple(a.shape) for a in aux] == [(2, 3, 5, 7, 9), (2, 3, 3, 4, 5)]
    # The auxiliary heads receive gradients: they learn from the labels.
    sum(a.sum() for a in aux).backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.aux_heads)
    # Inference (and a TorchScript export) gives exactly what the same network without the heads gives.
    plain = UNet3D(out_channels=3, width=4, depth=4, classification_head=True).eval()
    net.eval()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("aux_heads.")}
    plain.load_state_dict(state)
    with torch.inference_mode():
        out, out_plain = net(x), plain(x)
    assert len(out) == 2 and torch.equal(out[0], out_plain[0]) and torch.equal(out[1], out_plain[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    with torch.inference_mode():
        assert torch.equal(scripted(x)[0], out[0])
    # Without deep supervision the training pass has no auxiliary outputs; too many levels is an error.
    assert UNet3D(out_channels=3, width=4, depth=3).forward_train(x)[2] == []
    with pytest.raises(ValueError, match="deep_supervision"):
        UNet3D(width=4, depth=3, deep_supervision=2)


@pytest.mark.parametrize("residual", [False, True])
def test_folding_batch_norm_into_the_convolutions_keeps_the_outputs(residual: bool) -> None:
    net = UNet3D(out_channels=3, width=4, depth=3, norm="batch", residual=residual, classification_head=True)
    # Statistics and affine parameters far from the identity, as after training.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 8, 16, 16) * 3 + 1)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    net.eval()
    x = torch.randn(2, 1, 9, 13, 17)
    with torch.inference_mode():
        seg, cls = net(x)
    # 5 blocks of two convolutions; with residual blocks each also projects its input (the shape changes).
    assert fold_batch_norm(net) == 5 * 2 + (5 if residual else 0)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    with torch.inference_mode():
        seg_folded, cls_folded = net(x)
    torch.testing.assert_close(seg_folded, seg, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cls_folded, cls, rtol=1e-4, atol=1e-4)
    # Per-input normalisations cannot be folded; a network that is still training must not be.
    instance = UNet3D(out_channels=3, width=4, depth=3, norm="instance").eval()
    assert fold_batch_norm(instance) == 0
    with pytest.raises(ValueError, match="evaluation mode"):
        fold_batch_norm(UNet3D(out_channels=3, width=4, depth=3, norm="batch").train())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_widening_the_one_channel_input_keeps_the_outputs(memory_format: torch.memory_format) -> None:
    net = UNet3D(out_channels=3, width=4, depth=3, norm="batch", classification_head=True).eval()
    fold_batch_norm(net)  # as the loader does: the widened convolution must keep the folded bias
    x = torch.randn(2, 1, 9, 13, 17).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        seg, cls = net(x)
    assert widen_single_channel_inputs(net) == 1
    first = net.encoders[0].conv1
    assert isinstance(first, ZeroChannelConv3d) and first.bias is not None
    assert torch.count_nonzero(first.weight[:, 1:]) == 0
    with torch.inference_mode():
        seg_wide, cls_wide = net(x)
    torch.testing.assert_close(seg_wide, seg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cls_wide, cls, rtol=1e-5, atol=1e-5)
    # Nothing else reads one channel; widening twice changes nothing more.
    assert widen_single_channel_inputs(net) == 0


def test_widening_leaves_multichannel_inputs_and_refuses_a_training_network() -> None:
    two = UNet3D(in_channels=2, out_channels=2, width=4, depth=2).eval()
    assert widen_single_channel_inputs(two) == 0
    with pytest.raises(ValueError, match="evaluation mode"):
        widen_single_channel_inputs(UNet3D(out_channels=2, width=4, depth=2).train())
    strided = ZeroChannelConv3d(torch.nn.Conv3d(1, 3, 3, stride=2, padding=1, bias=False), channels=4)
    x = torch.randn(1, 1, 7, 8, 9)
    reference = torch.nn.functional.conv3d(x, strided.weight[:, :1], None, 2, 1)
    torch.testing.assert_close(strided(x), reference)
    with pytest.raises(ValueError, match="one-channel input"):
        strided(torch.randn(1, 2, 7, 8, 9))
    with pytest.raises(ValueError, match="one-channel"):
        ZeroChannelConv3d(torch.nn.Conv3d(2, 3, 3))


def test_the_spec_knows_exactly_the_networks_architectures() -> None:
    assert set(ARCHITECTURES) == set(KNOWN_ARCHITECTURES)
    assert set(CANDIDATE_ARCHITECTURES) == set(KNOWN_CANDIDATE_ARCHITECTURES)
    assert not set(ARCHITECTURES) & set(CANDIDATE_ARCHITECTURES)


def test_the_patch_classifier_gives_one_logit_per_patch_of_any_size_and_folds_for_inference() -> None:
    torch.manual_seed(0)
    net = build_network(ArchitectureSpec("patch_classifier3d", {"width": 4, "levels": 2}), CANDIDATE_ARCHITECTURES)
    with pytest.raises(SpecError, match="unknown"):
        build_network(ArchitectureSpec("patch_classifier3d", {}))  # not a segmentation network
    for size in (24, 17):
        assert net(torch.randn(3, 1, size, size, size)).shape == (3, 1)
    net.train()
    for _ in range(3):  # running statistics that differ from the initial ones
        net(torch.randn(8, 1, 16, 16, 16) * 2.0 + 1.0)
    net.eval()
    x = torch.randn(5, 1, 16, 16, 16)
    expected = net(x)
    assert fold_batch_norm(net) == 4  # two per strided block
    torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        PatchClassifier3D(width=0)


def test_build_network_passes_params_and_names_an_unknown_one() -> None:
    net = build_network(ArchitectureSpec("unet3d", {"out_channels": 3, "width": 4, "depth": 2}))
    assert isinstance(net, UNet3D) and net.seg_head.out_channels == 3
    with pytest.raises(SpecError, match="unknown key architecture.params.widht"):
        build_network(ArchitectureSpec("unet3d", {"widht": 4}))
    with pytest.raises(SpecError, match="norm must be"):
        build_network(ArchitectureSpec("unet3d", {"norm": "layer"}))
    with pytest.raises(SpecError, match="unknown"):
        build_network(ArchitectureSpec("resnet", {}))


def test_split_outputs_accepts_tensor_tuple_and_mapping_forms() -> None:
    seg = torch.zeros(2, 3, 4, 4, 4)
    cls = torch.ones(2)
    assert split_outputs(seg)[1] is None
    assert split_outputs((seg,))[1] is None
    assert split_outputs((seg, None))[1] is None
    assert split_outputs([seg, cls])[1].shape == (2, 1)  # type: ignore[union-attr]
    got_seg, got_cls = split_outputs({"seg_logits": seg, "cls_logit": cls[:, None]})
    assert got_seg is seg and got_cls is not None and got_cls.shape == (2, 1)
    with pytest.raises(TypeError, match="5-D"):
        split_outputs(torch.zeros(2, 3, 4, 4))
    with pytest.raises(TypeError):
        split_outputs("logits")


def test_light_unet_is_small_enough_for_cpu_inference() -> None:
    """The default model's scale (width 8, depth 4) stays well under a million parameters."""
    net = UNet3D(out_channels=3, width=8, depth=4, classification_head=True)
    assert sum(p.numel() for p in net.parameters()) < 1_000_000


def chest_like_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """24×64×64 HU volume: body, two lungs with a mediastinum, one nodule of radius 4 voxels."""
    z, y, x = np.mgrid[:24, :64, :64]
    hu = np.full((24, 64, 64), -1000.0, np.float32)
    hu[((y - 32) / 30) ** 2 + ((x - 32) / 30) ** 2 < 1] = 40.0
    lung = ((((y - 32) / 20) ** 2 + ((x - 17) / 10) ** 2 < 1)
            | (((y - 32) / 20) ** 2 + ((x - 47) / 10) ** 2 < 1))
    hu[lung] = -850.0
    nodule = (z - 12) ** 2 + (y - 30) ** 2 + (x - 17) ** 2 < 16
    hu[nodule] = 30.0
    hu += np.random.default_rng(0).normal(0.0, 20.0, hu.shape).astype(np.float32)
    return hu, lung & ~nodule, nodule


def normalised(hu: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((np.clip(hu, -1000, 400) + 1000) / 1400).astype(np.float32))[None, None]


def test_tiny_model_labels_lung_and_nodule_and_flags_the_study() -> None:
    hu, lung, nodule = chest_like_volume()
    net = tiny_network()
    with torch.inference_mode():
        seg, cls = net(normalised(hu))
    labels = seg[0].argmax(0).numpy()
    assert cls is not None and float(cls) > 0
    assert (labels[lung] == 1).mean() > 0.95
    assert ((labels == 2) & nodule).sum() / nodule.sum() > 0.8
    assert ((labels == 2) & ~nodule).sum() == 0

    without = hu.copy()
    without[nodule] = -850.0
    with torch.inference_mode():
        seg, cls = net(normalised(without))
    assert (seg[0].argmax(0) == 2).sum() == 0 and float(cls) < 0  # type: ignore[arg-type]


def test_tiny_model_is_deterministic_bit_for_bit() -> None:
    hu, _, _ = chest_like_volume()
    with torch.inference_mode():
        a = tiny_network()(normalised(hu))
        b = tiny_network()(normalised(hu))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
