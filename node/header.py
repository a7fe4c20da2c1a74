"""Read the few header attributes the receiver needs from a DICOM file or encoded stream, never pixels.

Encoded bytes in a little-endian syntax (what the receiver sees) are walked directly (`_fast_header`,
about a tenth of pydicom's cost); files, big endian and anything unusual go through pydicom, whose
``defer_size`` skips large values (pixel data, overlays, big private blobs); nothing is decompressed. Validation is limited to what the
receiver must enforce: Study, Series and SOP Instance UIDs present and syntactically valid (PS3.5 §9.1).
Everything else is taken as sent (tolerant on input). This module must not log attribute values.
"""

from __future__ import annotations

import struct
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
    if isinstance(source, (bytes, bytearray, memoryview)):
        fast = _fast_header(source)
        if fast is not None:
            return fast
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


# ---------------------------------------------------------------------------------------- fast path
# The receive path parses one header per instance; pydicom's reader costs about 0.75 ms for a CT
# header, a sixth of the per-instance budget. `_fast_header` walks the encoded elements directly for
# the little-endian syntaxes the receiver accepts and reads only the attributes above; anything
# unusual (big endian, a non-ASCII value, a malformed or missing UID, odd nesting) returns None and
# the pydicom path decides, so results and error statuses are the same either way (tests compare the
# two on every file of pydicom's test corpus).

_IMPLICIT_LE = "1.2.840.10008.1.2"
_FAST_SYNTAXES = frozenset({
    _IMPLICIT_LE, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
})
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_WANTED = {
    0x00080008: "image_type", 0x00080016: "sop_class", 0x00080018: "sop_instance", 0x00080060: "modality",
    0x0008103E: "series_description", 0x00180015: "body_part", 0x00180050: "slice_thickness",
    0x0020000D: "study", 0x0020000E: "series", 0x00200011: "series_number", 0x00200013: "instance_number",
    0x00200032: "position", 0x00280008: "frames", 0x00280010: "rows", 0x00280011: "columns",
}
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_MAX_DEPTH = 16


class _Unusual(Exception):
    """Leave this one to pydicom."""


def _element(buf: Any, offset: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value offset, value length) of the element at ``offset``."""
    if offset + 8 > len(buf):
        raise _Unusual
    group, elem = _TAG.unpack_from(buf, offset)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, offset + 8, _U32.unpack_from(buf, offset + 4)[0]
    vr = bytes(buf[offset + 4:offset + 6])
    if not vr.isalpha() or not vr.isupper():
        raise _Unusual
    if vr in _LONG_VRS:
        if offset + 12 > len(buf):
            raise _Unusual
        return tag, vr, offset + 12, _U32.unpack_from(buf, offset + 8)[0]
    return tag, vr, offset + 8, _U16.unpack_from(buf, offset + 6)[0]


def _skip_sequence(buf: Any, offset: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence whose first item starts at ``offset``."""
    if depth > _MAX_DEPTH:
        raise _Unusual
    while True:
        tag, _, start, length = _element(buf, offset, True)
        if tag == _SEQUENCE_END:
            return start
        if tag != _ITEM:
            raise _Unusual
        offset = _skip_item(buf, start, implicit, depth + 1) if length == _UNDEFINED else start + length


def _skip_item(buf: Any, offset: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length item whose data set starts at ``offset``."""
    while True:
        tag, vr, start, length = _element(buf, offset, implicit)
        if tag == _ITEM_END:
            return start
        if length == _UNDEFINED:
            if vr not in (None, b"SQ", b"UN"):
                raise _Unusual
            offset = _skip_sequence(buf, start, implicit or vr == b"UN", depth + 1)
        else:
            offset = start + length
        if offset > len(buf):
            raise _Unusual


def _ascii(raw: bytes) -> str:
    if not raw.isascii():
        raise _Unusual  # a character set to honour: pydicom's job
    return raw.decode("ascii")


def _fast_header(buf: Any) -> InstanceHeader | None:
    """The header of a Part 10 encoding in ``buf`` without pydicom, or None to let pydicom decide."""
    try:
        if len(buf) < 144 or bytes(buf[128:132]) != b"DICM":
            return None
        offset, meta = 132, {}
        while offset + 8 <= len(buf) and _TAG.unpack_from(buf, offset)[0] == 0x0002:
            tag, _, start, length = _element(buf, offset, False)
            if length == _UNDEFINED or start + length > len(buf):
                return None
            meta[tag] = bytes(buf[start:start + length])
            offset = start + length
        syntax = _ascii(meta.get(0x00020010, b"")).strip("\x00 ")
        if syntax not in _FAST_SYNTAXES:
            return None
        implicit = syntax == _IMPLICIT_LE
        found: dict[str, bytes] = {}
        has_pixel_data = False
        end = len(buf)
        while offset < end:
            tag, vr, start, length = _element(buf, offset, implicit)
            if tag >> 16 == 0xFFFE or tag >> 16 == 0x0002:
                return None
            if tag in _PIXEL_TAGS:
                # A truncated pixel data element is left to pydicom (which rejects such data sets).
                if length == _UNDEFINED:
                    _skip_sequence(buf, start, True, 0)
                elif start + length > end:
                    return None
                has_pixel_data = True
                break
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN"):
                    return None
                offset = _skip_sequence(buf, start, implicit or vr == b"UN", 0)
                continue
            if start + length > end:
                return None
            name = _WANTED.get(tag)
            if name is not None:
                found[name] = bytes(buf[start:start + length])
            offset = start + length
        return _header_from_values(found, meta, syntax, has_pixel_data)
    except (_Unusual, struct.error, UnicodeDecodeError):
        return None


def _header_from_values(found: dict[str, bytes], meta: dict[int, bytes], syntax: str,
                        has_pixel_data: bool) -> InstanceHeader:
    def text(name: str) -> str:
        raw = found.get(name)
        if raw is None:
            return ""
        value = _ascii(raw).rstrip("\x00 ")
        # pydicom keeps the values of a multi-valued element as split (padding inside kept); a single
        # value goes through `_text`'s strip.
        return value if "\\" in value else value.strip()

    def uid(name: str) -> str:
        value = text(name)
        if not is_valid_uid(value):
            raise _Unusual  # missing or malformed: pydicom's path names the status and the attribute
        return value

    def real(name: str) -> float | None:
        value = text(name)
        if not value or "\\" in value:
            return None
        try:
            return float(value)
        except ValueError:
            return None

    def integer(name: str) -> int | None:
        number = real(name)  # IS values such as "5.0" are integers too, as pydicom reads them
        return int(number) if number is not None and number.is_integer() else None

    def unsigned(name: str) -> int | None:
        raw = found.get(name)
        if raw is None:
            return None
        if len(raw) != 2:
            raise _Unusual
        return int(_U16.unpack(raw)[0])

    position = None
    parts = text("position").split("\\") if found.get("position") else []
    if len(parts) == 3:
        try:
            position = (float(parts[0]), float(parts[1]), float(parts[2]))
        except ValueError:
            position = None
    sop_class = text("sop_class") or _ascii(meta.get(0x00020002, b"")).strip("\x00 ")
    frames = integer("frames")
    return InstanceHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=uid("sop_instance"),
        study_instance_uid=uid("study"),
        series_instance_uid=uid("series"),
        transfer_syntax_uid=syntax,
        modality=text("modality"),
        body_part_examined=text("body_part"),
        series_description=text("series_description"),
        series_number=integer("series_number"),
        image_type=text("image_type"),
        slice_thickness_mm=real("slice_thickness"),
        instance_number=integer("instance_number"),
        image_position_patient=position,
        rows=unsigned("rows"),
        columns=unsigned("columns"),
        number_of_frames=frames if frames and frames > 0 else 1,
        has_pixel_data=has_pixel_data,
    )
