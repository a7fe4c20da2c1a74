"""The synthetic chest CT generator: deterministic per seed, labels that agree with the image, the
requested nodules, documented parameter ranges, and DICOM series that read back exactly and pass
dciodvfy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from models.phantom_dicom import SUPPORTED_TRANSFER_SYNTAXES, write_phantom_series
from models.phantoms import (
    LABEL_LUNG,
    LABEL_NODULE,
    STRUCTURES,
    Phantom,
    PhantomError,
    generate_phantom,
    sample_phantom_params,
)
from tests.support import require_tool

SMALL = (40, 96, 96)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return generate_phantom(11, shape_zyx=SMALL, nodules=3, nodule_diameter_mm=(8.0, 16.0))


@pytest.fixture(scope="module")
def tiny() -> Phantom:
    """Three small slices, with contrast (so the Contrast/Bolus module is written too)."""
    return generate_phantom(6, shape_zyx=(3, 64, 64), nodules=0, contrast=True)


@pytest.fixture(scope="module")
def fine_phantom() -> Phantom:
    """Finer grid (2 mm voxels) with mid-sized nodules of every kind, for the HU checks."""
    return generate_phantom(
        21,
        spacing_mm=(2.0, 2.0, 2.0),
        slice_thickness_mm=2.0,
        nodules=5,
        nodule_diameter_mm=(10.0, 20.0),
        noise_sigma_hu=15.0,
    )


def test_same_seed_gives_identical_arrays(phantom: Phantom) -> None:
    again = generate_phantom(11, shape_zyx=SMALL, nodules=3, nodule_diameter_mm=(8.0, 16.0))
    assert again.params == phantom.params
    assert np.array_equal(again.hu_zyx, phantom.hu_zyx)
    assert np.array_equal(again.labels_zyx, phantom.labels_zyx)
    assert np.array_equal(again.nodule_ids_zyx, phantom.nodule_ids_zyx)
    assert again.nodules == phantom.nodules


def test_different_seeds_give_different_anatomy(phantom: Phantom) -> None:
    other = generate_phantom(12, shape_zyx=SMALL, nodules=3)
    assert other.params != phantom.params
    assert not np.array_equal(other.labels_zyx, phantom.labels_zyx)


def test_arrays_have_documented_types_and_shapes(phantom: Phantom) -> None:
    assert phantom.hu_zyx.dtype == np.int16 and phantom.hu_zyx.shape == SMALL
    assert phantom.labels_zyx.dtype == np.uint8 and phantom.labels_zyx.shape == SMALL
    assert set(np.unique(phantom.labels_zyx)) <= {0, LABEL_LUNG, LABEL_NODULE}
    assert set(np.unique(phantom.structures_zyx)) <= set(STRUCTURES)
    assert phantom.hu_zyx.min() >= -1024 and phantom.hu_zyx.max() <= 3071
    assert np.allclose(np.diag(phantom.affine_lps)[:3], phantom.spacing_mm[::-1])


def test_lung_label_has_lung_attenuation(phantom: Phantom, fine_phantom: Phantom) -> None:
    for ph in (phantom, fine_phantom):
        lung = ph.labels_zyx == LABEL_LUNG
        assert lung.mean() > 0.03
        assert -950 <= np.median(ph.hu_zyx[lung]) <= -700
        # air outside the body, soft tissue around the lungs
        assert np.median(ph.hu_zyx[ph.structures_zyx == 0]) < -900


def test_nodule_voxels_have_their_kinds_attenuation(fine_phantom: Phantom) -> None:
    assert len(fine_phantom.nodules) >= 3
    for truth in fine_phantom.nodules:
        values = fine_phantom.hu_zyx[fine_phantom.nodule_ids_zyx == truth.index]
        median = float(np.median(values))
        if truth.kind == "solid":
            assert -150 <= median <= 120, truth
        elif truth.kind == "ground_glass":
            assert -800 <= median <= -200, truth
        else:
            assert -750 <= median <= 60, truth


@pytest.mark.parametrize("kind", ["solid", "part_solid", "ground_glass"])
def test_each_nodule_kind_can_be_requested(kind: str) -> None:
    ph = generate_phantom(5, spacing_mm=(3.0, 3.0, 3.0), nodules=2, nodule_kinds=[kind], nodule_diameter_mm=(10, 14))
    assert ph.nodules and all(n.kind == kind for n in ph.nodules)
    solid_like = np.median(ph.hu_zyx[ph.nodule_zyx])
    assert (solid_like > -250) if kind == "solid" else (solid_like < -100)


def test_nodule_labels_stay_inside_the_lung_region(phantom: Phantom, fine_phantom: Phantom) -> None:
    for ph in (phantom, fine_phantom):
        nodule = ph.labels_zyx == LABEL_NODULE
        assert nodule.any()
        assert np.array_equal(nodule, ph.nodule_ids_zyx > 0)
        ring = ndimage.binary_dilation(nodule, iterations=1) & ~nodule
        # the ring around a nodule is lung (or lung wall for a juxtapleural one), never outside air
        assert np.all(ph.structures_zyx[ring] != 0)
        assert (ph.labels_zyx[ring] == LABEL_LUNG).mean() > 0.5


def test_requested_nodule_count_and_diameters_are_honoured() -> None:
    ph = generate_phantom(3, shape_zyx=(48, 96, 96), nodules=4, nodule_diameter_mm=(6.0, 12.0))
    assert len(ph.nodules) == 4
    assert all(6.0 <= n.diameter_mm <= 12.0 for n in ph.nodules)
    assert sorted(n.index for n in ph.nodules) == [1, 2, 3, 4]
    for n in ph.nodules:
        assert n.voxel_count == int((ph.nodule_ids_zyx == n.index).sum()) > 0
        k, j, i = (int(round(c)) for c in n.center_zyx_vox)
        assert ph.lung_zyx[k, j, i]
        assert np.allclose(ph.index_to_lps(n.center_zyx_vox), n.center_lps_mm)


def test_zero_nodules_gives_no_nodule_label() -> None:
    ph = generate_phantom(4, shape_zyx=(24, 64, 64), nodules=0)
    assert ph.nodules == () and not ph.nodule_zyx.any()


def test_some_studies_have_no_nodules_by_default() -> None:
    counts = [len(sample_phantom_params(seed, shape_zyx=(24, 64, 64)).nodules) for seed in range(12)]
    assert 0 in counts and max(counts) >= 2


def test_sampled_geometry_stays_in_documented_ranges() -> None:
    for seed in range(8):
        p = sample_phantom_params(seed, nodules=0)
        assert 0.5 <= p.pixel_spacing_mm <= 1.0
        assert 0.6 <= p.slice_thickness_mm <= 5.0
        assert p.shape_zyx[1:] == (512, 512) and p.shape_zyx[0] <= 320
        assert 10 <= p.noise_sigma_hu <= 40


def test_bad_arguments_raise_phantom_error() -> None:
    with pytest.raises(PhantomError, match="shape_zyx"):
        generate_phantom(1, shape_zyx=(0, 10, 10))
    with pytest.raises(PhantomError, match="square"):
        generate_phantom(1, spacing_mm=(1.0, 0.7, 0.8))
    with pytest.raises(PhantomError, match="nodule_kinds"):
        generate_phantom(1, shape_zyx=(8, 32, 32), nodule_kinds=["calcified"])


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(p) for p in paths]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def test_written_series_reads_back_with_geometry_and_hu(tmp_path: Path) -> None:
    ph = generate_phantom(8, shape_zyx=(12, 64, 64), nodules=1)
    paths = write_phantom_series(ph, tmp_path / "a")
    assert len(paths) == 12
    datasets = _read_series(paths)
    volume = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    assert np.array_equal(volume, ph.hu_zyx)
    first = datasets[0]
    assert first.Modality == "CT" and first.BodyPartExamined == "CHEST"
    assert first.Manufacturer == "EdgeNode Phantom"
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert np.allclose([float(v) for v in first.PixelSpacing], ph.spacing_mm[1:], atol=1e-5)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    expected = ph.index_to_lps(np.stack([np.arange(12), np.zeros(12), np.zeros(12)], axis=1))
    assert np.allclose(positions, expected, atol=1e-4)
    assert len({d.SOPInstanceUID for d in datasets}) == 12
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    assert all(d.SOPInstanceUID.startswith("2.25.") and len(d.SOPInstanceUID) <= 64 for d in datasets)
    assert datasets[-1].InstanceNumber == 1  # head-first numbering: the top slice first
    # same seed, same files
    again = write_phantom_series(generate_phantom(8, shape_zyx=(12, 64, 64), nodules=1), tmp_path / "b")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


@pytest.mark.parametrize("tsuid", [ts for ts in SUPPORTED_TRANSFER_SYNTAXES if ts != SUPPORTED_TRANSFER_SYNTAXES[0]])
def test_compressed_and_implicit_series_decode_to_the_same_hu(tmp_path: Path, tsuid: str, tiny: Phantom) -> None:
    ph = tiny
    try:
        paths = write_phantom_series(ph, tmp_path, transfer_syntax_uid=tsuid, pixel_representation=0)
    except PhantomError as exc:
        pytest.skip(str(exc))
    datasets = _read_series(paths)
    assert datasets[0].file_meta.TransferSyntaxUID == tsuid
    volume = np.stack([d.pixel_array.astype(np.int32) + int(d.RescaleIntercept) for d in datasets])
    assert np.array_equal(volume, ph.hu_zyx)


def test_non_ascii_patient_name_survives_with_utf8(tmp_path: Path, tiny: Phantom) -> None:
    ph = tiny
    paths = write_phantom_series(ph, tmp_path, patient_name="Yamada^Tarou=山田^太郎")
    ds = pydicom.dcmread(paths[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Yamada^Tarou=山田^太郎"


@pytest.mark.dicom3tools
@pytest.mark.parametrize("tsuid", [SUPPORTED_TRANSFER_SYNTAXES[0], SUPPORTED_TRANSFER_SYNTAXES[3]])
def test_dciodvfy_reports_no_errors_on_a_written_instance(tmp_path: Path, tsuid: str, tiny: Phantom) -> None:
    dciodvfy = require_tool("dciodvfy")
    ph = tiny
    paths = write_phantom_series(ph, tmp_path, transfer_syntax_uid=tsuid)
    result = subprocess.run([dciodvfy, str(paths[1])], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    warnings = [line for line in report.splitlines() if line.startswith("Warning")]
    print("\n".join(warnings))
    assert errors == [], report


def test_tissues_have_realistic_attenuation(fine_phantom: Phantom) -> None:
    ph = fine_phantom
    names = {name: value for value, name in STRUCTURES.items()}

    def median(name: str) -> float:
        values = ph.hu_zyx[ph.structures_zyx == names[name]]
        assert values.size > 50, name
        return float(np.median(values))

    assert -140 <= median("fat") <= -50
    assert 10 <= median("muscle") <= 90
    assert median("bone") >= 150
    assert 0 <= median("heart") <= 400
    assert median("air") <= -900


@pytest.mark.parametrize("attachment", ["vessel", "pleura"])
def test_attached_nodules_touch_what_they_are_attached_to(attachment: str) -> None:
    ph = generate_phantom(
        17, spacing_mm=(2.5, 2.5, 2.5), nodules=3, nodule_attachments=[attachment], nodule_diameter_mm=(8, 16),
        noise_sigma_hu=10.0,
    )
    assert ph.nodules and all(n.attached == attachment for n in ph.nodules)
    names = {name: value for value, name in STRUCTURES.items()}
    for n in ph.nodules:
        mine = ph.nodule_ids_zyx == n.index
        ring = ndimage.binary_dilation(mine, iterations=2) & ~mine
        around = set(np.unique(ph.structures_zyx[ring]).tolist())
        if attachment == "vessel":
            assert names["vessel"] in around, n
        else:
            wall = {names[s] for s in ("muscle", "bone", "fat", "mediastinum", "heart", "abdomen", "great_vessel")}
            assert around & wall, n


def test_cli_writes_a_series_and_the_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.phantoms import main

    out = tmp_path / "series"
    code = main(["--seed", "1", "--out", str(out), "--shape", "4,48,48", "--nodules", "1", "--truth", str(tmp_path / "t.npz")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "event=phantom_written" in printed and "files=4" in printed
    assert len(list(out.glob("*.dcm"))) == 4
    truth = np.load(tmp_path / "t.npz")
    assert truth["labels_zyx"].shape == (4, 48, 48)
    assert main(["--seed", "1", "--out", str(out), "--shape", "0,48,48"]) == 2


def test_noise_has_the_requested_standard_deviation(fine_phantom: Phantom) -> None:
    ph = fine_phantom
    liver = ndimage.binary_erosion(ph.structures_zyx == 12, iterations=3)  # abdomen: uniform tissue
    values = ph.hu_zyx[liver].astype(np.float64)
    assert values.size > 1000
    robust_sigma = 1.4826 * np.median(np.abs(values - np.median(values)))
    assert abs(robust_sigma - ph.params.noise_sigma_hu) < 0.25 * ph.params.noise_sigma_hu


def test_nodule_label_volume_matches_its_nominal_size(fine_phantom: Phantom) -> None:
    for n in fine_phantom.nodules:
        nominal_ml = 4 / 3 * np.pi * (n.diameter_mm / 2) ** 3 / 1000
        # lobulation, axis ratios and (for juxtapleural ones) the pleura change it, within bounds
        assert 0.4 <= n.volume_ml / nominal_ml <= 1.8, n


def test_an_oblique_orientation_moves_the_slices_along_its_normal(tmp_path: Path, tiny: Phantom) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    iop = (1.0, 0.0, 0.0, 0.0, c, s)
    paths = write_phantom_series(tiny, tmp_path, image_orientation_patient=iop)
    datasets = _read_series(paths)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    steps = np.diff(positions, axis=0)
    assert np.allclose(steps, tiny.spacing_mm[0] * normal, atol=1e-4)
    assert np.allclose([float(v) for v in datasets[0].ImageOrientationPatient], iop, atol=1e-6)
    with pytest.raises(PhantomError, match="orthogonal"):
        write_phantom_series(tiny, tmp_path / "bad", image_orientation_patient=(1, 0, 0, 1, 0, 0))


@pytest.mark.parametrize(
    ("spacing", "thickness"), [(1.14183, 1.14183), (2.5, 5.0), (5.0, 1.0), (0.7, 0.9), (3.3, 3.3)]
)
def test_equal_overlapping_and_gapped_slices_all_render(spacing: float, thickness: float) -> None:
    ph = generate_phantom(
        0, shape_zyx=(12, 40, 40), spacing_mm=(spacing, 8.0, 8.0), slice_thickness_mm=thickness, nodules=0
    )
    assert ph.slice_thickness_mm == thickness and ph.spacing_mm[0] == spacing
    assert ph.labels_zyx.shape == (12, 40, 40)


def test_gantry_tilt_tilts_the_planes_but_not_the_table_motion(tmp_path: Path, tiny: Phantom) -> None:
    paths = write_phantom_series(tiny, tmp_path, gantry_tilt_deg=15.0)
    datasets = _read_series(paths)
    assert float(datasets[0].GantryDetectorTilt) == 15.0
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    assert np.allclose(iop, [1, 0, 0, 0, np.cos(np.radians(15)), np.sin(np.radians(15))], atol=1e-6)
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    assert np.allclose(np.diff(positions, axis=0), [0.0, 0.0, tiny.spacing_mm[0]], atol=1e-4)
