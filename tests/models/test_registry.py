"""The model registry (discovery, bad bundles skipped) and the loader (sha256, formats, cache, device)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import loader
from models.loader import (
    DeviceError,
    ModelHandle,
    WeightsError,
    configure_torch,
    load_model,
    resolve_device,
    sha256_file,
)
from models.registry import ModelNotFoundError, ModelRegistry, default_model_dir
from models.spec import SeriesCandidate, load_spec
from tests.models.tiny_bundle import make_tiny_bundle


@pytest.fixture(autouse=True)
def cold_model_cache() -> Iterator[None]:
    """Each test starts and ends without warm models (they hold tmp_path bundles)."""
    loader.clear_cache()
    yield
    loader.clear_cache()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    make_tiny_bundle(tmp_path / "models" / "tiny")
    return tmp_path / "models"


def set_manifest_line(bundle: Path, old: str, new: str) -> None:
    manifest = bundle / "model.toml"
    text = manifest.read_text(encoding="utf-8")
    assert old in text
    manifest.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_registry_discovers_bundles_sorted_by_name(model_dir: Path) -> None:
    make_tiny_bundle(model_dir / "another", name="another_model")
    registry = ModelRegistry(model_dir)
    assert [spec.name for spec in registry.list()] == ["another_model", "tiny_test_model"]
    assert registry.get("tiny_test_model").bundle_dir == model_dir / "tiny"
    assert "tiny_test_model" in registry and len(registry) == 2
    assert registry.problems == []


def test_registry_accepts_a_single_bundle_folder(model_dir: Path) -> None:
    registry = ModelRegistry(model_dir / "tiny")
    assert [spec.name for spec in registry.list()] == ["tiny_test_model"]


def test_bad_bundles_are_reported_and_skipped_never_raising(model_dir: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    broken = model_dir / "broken_toml"
    broken.mkdir()
    (broken / "model.toml").write_text("name = ", encoding="utf-8")
    unknown = make_tiny_bundle(model_dir / "unknown_key", name="unknown_key")
    set_manifest_line(unknown, "[series]\n", "[series]\nslices = 3\n")
    no_weights = make_tiny_bundle(model_dir / "no_weights", name="no_weights")
    (no_weights / "weights.pt").unlink()
    duplicate = make_tiny_bundle(model_dir / "zz_duplicate")
    (model_dir / "not_a_bundle").mkdir()

    with caplog.at_level(logging.WARNING, logger="models.registry"):
        registry = ModelRegistry(model_dir)

    assert [spec.name for spec in registry.list()] == ["tiny_test_model"]
    reasons = {problem.path.name: problem.reason for problem in registry.problems}
    assert set(reasons) == {"broken_toml", "unknown_key", "no_weights", "zz_duplicate"}
    assert "invalid TOML" in reasons["broken_toml"]
    assert "unknown key series.slices" in reasons["unknown_key"]
    assert "weights file weights.pt is missing" in reasons["no_weights"]
    assert "already provided" in reasons["zz_duplicate"]
    assert duplicate.exists()
    skipped = [r.getMessage() for r in caplog.records if "event=model_bundle_skipped" in r.getMessage()]
    assert len(skipped) == 4


def test_missing_model_dir_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "nowhere")
    assert registry.list() == [] and registry.problems[0].reason == "model directory does not exist"


def test_get_unknown_model_names_the_available_ones(model_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="available: tiny_test_model"):
        ModelRegistry(model_dir).get("chest_ct")


def test_select_returns_the_models_whose_criteria_accept_the_series(model_dir: Path) -> None:
    make_tiny_bundle(model_dir / "thick", name="needs_many_slices", min_slices=100)
    registry = ModelRegistry(model_dir)
    candidate = SeriesCandidate(modality="CT", body_part="CHEST", slice_count=40, slice_thickness_mm=1.0)
    assert [spec.name for spec in registry.select(candidate)] == ["tiny_test_model"]
    assert registry.select(SeriesCandidate(modality="MR", slice_count=40)) == []
    reasons = {spec.name: (ok, why) for spec, ok, why in registry.decisions(candidate)}
    assert reasons["needs_many_slices"] == (False, "40 slices, fewer than 100")


def test_default_registry_reads_the_shipped_bundles_without_raising() -> None:
    registry = ModelRegistry()
    assert registry.model_dir == default_model_dir()
    for spec in registry.list():
        assert spec.bundle_dir.parent == default_model_dir()


def test_load_model_checks_sha256_and_names_file_expected_and_actual(model_dir: Path) -> None:
    bundle = model_dir / "tiny"
    spec = load_spec(bundle)
    with (bundle / "weights.pt").open("ab") as f:
        f.write(b"\0")
    actual = sha256_file(bundle / "weights.pt")
    with pytest.raises(WeightsError) as excinfo:
        load_model(spec, "cpu")
    message = str(excinfo.value)
    assert str(bundle / "weights.pt") in message
    assert spec.weights.sha256 in message and actual in message


def test_load_model_rejects_weights_that_do_not_fit_the_architecture(model_dir: Path) -> None:
    bundle = model_dir / "tiny"
    torch.save({"features.0.weight": torch.zeros(1)}, bundle / "weights.pt")
    sha = sha256_file(bundle / "weights.pt")
    set_manifest_line(bundle, load_spec(bundle).weights.sha256, sha)
    with pytest.raises(WeightsError, match="does not fit architecture fcn3d"):
        load_model(load_spec(bundle), "cpu")


def test_torchscript_file_that_is_not_one_is_a_weights_error(model_dir: Path) -> None:
    bundle = make_tiny_bundle(model_dir / "ts", torchscript=True, name="ts")
    (bundle / "weights.ts").write_bytes(b"not a zip")
    set_manifest_line(bundle, load_spec(bundle).weights.sha256, sha256_file(bundle / "weights.ts"))
    with pytest.raises(WeightsError, match="not a TorchScript file"):
        load_model(load_spec(bundle), "cpu")


def test_state_dict_and_torchscript_bundles_compute_the_same(model_dir: Path) -> None:
    plain = load_model(load_spec(model_dir / "tiny"), "cpu")
    scripted = load_model(load_spec(make_tiny_bundle(model_dir / "ts", torchscript=True)), "cpu")
    x = torch.linspace(0, 1, 16 * 20 * 24).reshape(1, 1, 16, 20, 24)
    with torch.inference_mode():
        seg_a, cls_a = plain.module(x)
        seg_b, cls_b = scripted.module(x)
    # The same function to float32 rounding: the state_dict path runs channels-last on a CPU, which
    # on some CPUs (AVX2-only ones) picks another kernel with another summation order (measured
    # difference 2e-6 on logits up to 15).
    torch.testing.assert_close(seg_a, seg_b, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cls_a, cls_b, rtol=1e-6, atol=1e-5)
    assert not plain.module.training and not scripted.module.training


def test_loaded_models_stay_warm_per_name_version_and_device(model_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    spec = load_spec(model_dir / "tiny")
    with caplog.at_level(logging.INFO, logger="models.loader"):
        first = load_model(spec, "cpu")
        second = load_model(spec, torch.device("cpu"))
    assert isinstance(first, ModelHandle) and first is second
    assert first.key == ("tiny_test_model", "1.0.0", "cpu")
    assert sum("event=model_loaded" in r.getMessage() for r in caplog.records) == 1
    loader.clear_cache()
    assert load_model(spec, "cpu") is not first


def test_resolve_device_maps_auto_and_cpu_and_rejects_unusable_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(DeviceError, match="unknown"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(DeviceError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_configure_torch_sets_threads_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(loader, "_threads_configured", None)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    configure_torch(2)
    configure_torch(1)
    configure_torch(2)
    assert calls == [2]


def test_bundle_copied_elsewhere_still_loads(model_dir: Path, tmp_path: Path) -> None:
    """Weights are found relative to the manifest, so a bundle can be moved or installed anywhere."""
    moved = tmp_path / "installed" / "tiny"
    shutil.copytree(model_dir / "tiny", moved)
    handle = load_model(ModelRegistry(moved.parent).get("tiny_test_model"), "cpu")
    assert handle.spec.bundle_dir == moved


def test_checkpoints_with_a_state_dict_entry_or_data_parallel_prefixes_load(model_dir: Path) -> None:
    bundle = model_dir / "tiny"
    reference = load_model(load_spec(bundle), "cpu")
    state = {f"module.{k}": v for k, v in reference.module.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 7}, bundle / "weights.pt")
    set_manifest_line(bundle, load_spec(bundle).weights.sha256, sha256_file(bundle / "weights.pt"))
    loader.clear_cache()
    handle = load_model(load_spec(bundle), "cpu")
    for key, value in reference.module.state_dict().items():
        assert torch.equal(handle.module.state_dict()[key], value)
