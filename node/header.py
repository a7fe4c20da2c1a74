"""Read the few header attributes the receiver needs from a DICOM file or encoded stream, never pixels.

Large values (pixel data, overlays, big private blobs) are skipped with pydicom's ``defer_size`` so a
512×512 CT costs well under a millisecond; nothing is decompressed. Validation is limited to what the
receiver must enforce: Study, Series and SOP Instance UIDs present and syntactically valid (PS3.5 §9.1).
Everything else is taken as sent (tolerant on input). This module must not log attribute values.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from node.errors import HeaderError
from node.records import InstanceHeader, StoreStatus, is_valid_uid

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DEFER_BYTES = 4096


def parse_header(source: bytes | Path | BinaryIO) -> InstanceHeader:
    """Parse a Part 10 file (preamble + file meta + dataset) into an `InstanceHeader`.

    Parameters
    ----------
    source
        The encoded file as bytes, a path, or a binary file object positioned at its start.

    Raises
    ------
    HeaderError
        The data is not parseable DICOM (status 0xC001), or a required UID is missing or malformed
        (0xC010 study, 0xC011 series, 0xC012 SOP instance); ``attribute`` names the keyword.
    """
    fp: Any = BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        ds = pydicom.dcmread(fp, defer_size=_DEFER_BYTES, force=True)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError, NotImplementedError) as exc:
        raise HeaderError(StoreStatus.UNREADABLE_DATASET, "", f"dataset cannot be parsed ({type(exc).__name__})") from None
    try:
        return _header_from_dataset(ds)
    except HeaderError:
        raise
    except Exception as exc:  # a malformed element surfaces lazily on first access
        raise HeaderError(StoreStatus.UNREADABLE_DATASET, "", f"header element cannot be decoded ({type(exc).__name__})") from None


def _uid(ds: Any, keyword: str, status: StoreStatus) -> str:
    value = ds.get(keyword)
    text = "" if value is None else str(value).strip("\x00 ")
    if not text:
        raise HeaderError(status, keyword, f"{keyword} is missing")
    if not is_valid_uid(text):
        raise HeaderError(status, keyword, f"{keyword} is malformed (PS3.5 §9.1: digits and dots, at most 64 characters)")
    return text


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _float(ds: Any, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _position(ds: Any) -> tuple[float, float, float] | None:
    try:
        value = ds.get("ImagePositionPatient")
        if value is None or len(value) != 3:
            return None
        return (float(value[0]), float(value[1]), float(value[2]))
    except (TypeError, ValueError):
        return None


def _header_from_dataset(ds: Any) -> InstanceHeader:
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    sop_instance_uid = _uid(ds, "SOPInstanceUID", StoreStatus.BAD_SOP_INSTANCE_UID)
    study_instance_uid = _uid(ds, "StudyInstanceUID", StoreStatus.BAD_STUDY_INSTANCE_UID)
    series_instance_uid = _uid(ds, "SeriesInstanceUID", StoreStatus.BAD_SERIES_INSTANCE_UID)
    sop_class_uid = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    frames = _int(ds, "NumberOfFrames")
    return InstanceHeader(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        transfer_syntax_uid=transfer_syntax,
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        image_type=_text(ds, "ImageType"),
        slice_thickness_mm=_float(ds, "SliceThickness"),
        instance_number=_int(ds, "InstanceNumber"),
        image_position_patient=_position(ds),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=frames if frames and frames > 0 else 1,
        has_pixel_data=any(k in ds for k in _PIXEL_KEYWORDS),
    )
