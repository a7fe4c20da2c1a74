"""Write a `models.phantoms.Phantom` as a DICOM CT Image Storage series (one file per slice).

Builds realistic single-frame CT instances with pydicom — SOP Common, Patient, General Study, Patient
Study, General Series, Frame of Reference, General Equipment, General Acquisition, General Image, Image
Plane, Image Pixel, Contrast/Bolus (when the phantom has contrast), CT Image and VOI LUT modules (PS3.3
A.3) — whose UIDs are derived from the phantom's parameters under the 2.25 root, so the same seed and
arguments give byte-identical files. It must not know anything of the receiver, the spool or the
pipeline; it only writes files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from models.phantoms import PhantomError

if TYPE_CHECKING:
    from models.phantoms import Phantom

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
#: Implementation Class UID of the files we write (2.25 form of a fixed name) and its version name.
IMPLEMENTATION_CLASS_UID = UID("2.25." + str(int.from_bytes(hashlib.sha256(b"edge-node-phantom-writer").digest()[:16], "big")))
IMPLEMENTATION_VERSION_NAME = "EDGENODE_PH_1"
MANUFACTURER = "EdgeNode Phantom"
AXIAL_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Transfer syntaxes the writer can produce (the compressed ones are lossless only).
SUPPORTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def phantom_uid(*parts: object) -> str:
    """A UID under the 2.25 root (PS3.5 B.2) from a SHA-256 of ``parts`` (128 bits, ≤ 44 chars)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.9g}"
    return text


def write_phantom_series(
    phantom: Phantom,
    out_dir: Path,
    *,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    patient_name: str = "PHANTOM^CHEST",
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic chest CT phantom",
    study_description: str = "CT CHEST",
    specific_character_set: str | None = None,
    position_offset_lps_mm: Sequence[float] = (0.0, 0.0, 0.0),
    image_orientation_patient: Sequence[float] = AXIAL_IOP,
    gantry_tilt_deg: float = 0.0,
    pixel_representation: int = 1,
    accession_number: str = "",
    file_prefix: str = "IM",
) -> list[Path]:
    """Write ``phantom`` into ``out_dir`` as one CT Image Storage file per slice.

    Parameters
    ----------
    phantom
        The phantom; slice ``k`` of ``hu_zyx`` becomes one instance.
    out_dir
        Created if missing. Files are named ``{file_prefix}{InstanceNumber:05d}.dcm``.
    transfer_syntax_uid
        One of `SUPPORTED_TRANSFER_SYNTAXES`: Explicit/Implicit VR Little Endian, or lossless RLE,
        JPEG 2000 or JPEG-LS (encoded by pydicom's encoders; pylibjpeg-openjpeg for JPEG 2000, pyjpegls
        for JPEG-LS).
    patient_name, patient_id
        Patient Name (PN, may be non-ASCII: set ``specific_character_set`` or ``ISO_IR 192`` is used)
        and Patient ID (default ``PH`` + the seed).
    study_instance_uid, series_instance_uid
        Default: derived from the phantom's parameters (deterministic, 2.25 root).
    series_number, series_description, study_description, accession_number
        Written as given.
    specific_character_set
        Specific Character Set (0008,0005); ``None`` writes none for ASCII names and ``ISO_IR 192``
        otherwise.
    position_offset_lps_mm
        Added to every Image Position (Patient): the series lies shifted in patient space (the
        phantom's truth in LPS shifts by the same vector).
    image_orientation_patient
        Image Orientation (Patient): row and column direction cosines (default axial). Another
        orientation rotates the whole grid about voxel (0, 0, 0) — slice ``k`` lies at origin +
        k × spacing × (row × column) — for loader tests of oblique series; the phantom's truth in
        LPS then no longer applies (its voxel indices still do).
    gantry_tilt_deg
        Gantry/Detector Tilt (0018,1120): the image planes tilt about the x axis (column cosine
        (0, cos t, sin t)) while the table still moves along z, so slice k lies at origin + k × spacing ×
        (0, 0, 1) — the sheared geometry of a tilted acquisition, for loader tests. Exclusive with a
        non-axial ``image_orientation_patient``.
    pixel_representation
        1: signed 16-bit (Bits Stored 16); 0: unsigned with Bits Stored 12. Both store HU + 1024 with
        Rescale Intercept −1024 and Rescale Slope 1.

    Returns
    -------
    list[Path]
        The written files in slice order (``k`` ascending, inferior → superior). Instance Number 1 is
        the most superior slice, as a head-first scan numbers them.

    Raises
    ------
    PhantomError
        Unsupported transfer syntax or pixel representation, or an encoder that is not installed.
    """
    tsuid = UID(str(transfer_syntax_uid))
    if tsuid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise PhantomError(f"transfer_syntax_uid {tsuid} is not supported; use one of {SUPPORTED_TRANSFER_SYNTAXES}")
    if pixel_representation not in (0, 1):
        raise PhantomError(f"pixel_representation must be 0 or 1, got {pixel_representation}")
    if tsuid not in _UNCOMPRESSED:
        _check_encoder(tsuid)
    params = phantom.params
    iop = np.asarray([float(v) for v in image_orientation_patient])
    step_direction: Any = None
    if gantry_tilt_deg:
        if not np.allclose(iop, AXIAL_IOP):
            raise PhantomError("gantry_tilt_deg needs the default axial image_orientation_patient")
        tilt = np.radians(float(gantry_tilt_deg))
        iop = np.array([1.0, 0.0, 0.0, 0.0, np.cos(tilt), np.sin(tilt)])
        step_direction = np.array([0.0, 0.0, 1.0])
    if iop.shape != (6,) or not np.allclose(np.linalg.norm(iop.reshape(2, 3), axis=1), 1.0, atol=1e-4) or abs(
        float(iop[:3] @ iop[3:])
    ) > 1e-4:
        raise PhantomError("image_orientation_patient must be two orthogonal unit vectors (six values)")
    normal = np.cross(iop[:3], iop[3:])
    if step_direction is None:
        step_direction = normal
    offset = tuple(float(v) for v in position_offset_lps_mm)
    if len(offset) != 3:
        raise PhantomError("position_offset_lps_mm must hold three values (x, y, z) in mm")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    key = f"edge-node-phantom:{params.digest()}"
    study_uid = study_instance_uid or phantom_uid(key, "study", patient_id, patient_name)
    series_uid = series_instance_uid or phantom_uid(
        key, "series", study_uid, series_number, offset, tuple(iop), gantry_tilt_deg
    )
    for_uid = phantom_uid(key, "frame-of-reference", study_uid, offset, tuple(iop), gantry_tilt_deg)
    seed = int(phantom.seed)
    day = dt.date(2024, 1, 1) + dt.timedelta(days=seed % 730)
    date = day.strftime("%Y%m%d")
    seconds = 7 * 3600 + (seed * 7919) % (11 * 3600)
    study_time = f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"
    age = 25 + seed % 60
    charset = specific_character_set
    if charset is None and not patient_name.isascii():
        charset = "ISO_IR 192"

    nz, ny, nx = phantom.shape_zyx
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = tsuid if tsuid in _UNCOMPRESSED else ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    # SOP Common
    if charset:
        ds.SpecificCharacterSet = charset
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = study_time
    ds.SOPClassUID = CT_IMAGE_STORAGE
    # General Study / Series / Equipment dates
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.AcquisitionDate = date
    ds.ContentDate = date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.AcquisitionTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "EdgeNode Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM1"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Synthetic Chest CT"
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id if patient_id is not None else f"PH{seed:08d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = params.patient_sex
    ds.PatientAge = f"{age:03d}Y"
    # Contrast/Bolus (PS3.3 C.7.6.4)
    if params.contrast:
        ds.ContrastBolusAgent = "IOHEXOL 350"
        ds.ContrastBolusRoute = "IV"
    # CT acquisition
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = _ds_number(params.slice_thickness_mm)
    ds.KVP = _ds_number(params.kvp)
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "edge-node-phantom 1"
    fov = max(ny, nx) * params.pixel_spacing_mm
    ds.ReconstructionDiameter = _ds_number(fov)
    ds.DistanceSourceToDetector = "1040"
    ds.DistanceSourceToPatient = "570"
    ds.GantryDetectorTilt = _ds_number(float(gantry_tilt_deg))
    ds.TableHeight = _ds_number(150.0 - params.center_y_mm * 0.1)
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = int(round(params.tube_current_ma))
    ds.Exposure = int(round(params.tube_current_ma * 0.5))
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = int(round(params.kvp * params.tube_current_ma / 1000))
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds_number(v) for v in iop]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.PixelSpacing = [_ds_number(params.pixel_spacing_mm)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if pixel_representation == 1 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if tsuid not in _UNCOMPRESSED:
        ds.LossyImageCompression = "00"

    stored = phantom.hu_zyx.astype(np.int32) + 1024
    stored = stored.astype(np.int16 if pixel_representation == 1 else np.uint16)
    origin = np.asarray(phantom.affine_lps[:3, 3]) + np.asarray(offset)
    dz = float(phantom.spacing_mm[0])
    paths: list[Path] = []
    for k in range(nz):
        instance = nz - k
        ipp = tuple(float(c) for c in origin + k * dz * step_direction)
        sop_uid = phantom_uid(series_uid, "instance", k)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds_number(v) for v in ipp]
        ds.SliceLocation = _ds_number(float(np.dot(origin + k * dz * step_direction, normal)))
        plane = np.ascontiguousarray(stored[k])
        if tsuid in _UNCOMPRESSED:
            ds.PixelData = plane.astype("<i2" if pixel_representation == 1 else "<u2", copy=False).tobytes()
            ds["PixelData"].VR = "OW"
            ds.file_meta.TransferSyntaxUID = tsuid
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.compress(tsuid, plane, generate_instance_uid=False)
        path = out_dir / f"{file_prefix}{instance:05d}.dcm"
        tmp = path.with_name(path.name + ".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _check_encoder(tsuid: UID) -> None:
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder, RLELosslessEncoder

    encoder: Any = {
        RLELossless: RLELosslessEncoder,
        JPEG2000Lossless: JPEG2000LosslessEncoder,
        JPEGLSLossless: JPEGLSLosslessEncoder,
    }[tsuid]
    if not encoder.is_available:
        raise PhantomError(
            f"no encoder for {tsuid.name} is installed ({', '.join(encoder.missing_dependencies)}); "
            "install one or write Explicit VR Little Endian"
        )
