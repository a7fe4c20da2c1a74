"""Logging set-up: key=value lines on stderr, a PHI redaction filter as safety net, quiet libraries.

Log lines are ``<time> level=<LEVEL> logger=<name> event=<what> key=value ...`` (journald adds its own
time and unit). Code never logs patient names, IDs, birth dates or accession numbers; the
`PhiRedactionFilter` additionally scrubs ``key=value`` pairs and dataset dump lines that name those
attributes, in case a library or an exception message carries them. pynetdicom and pydicom log at
WARNING and above only.
"""

from __future__ import annotations

import logging
import re
import sys

_PHI_KEYS = (
    r"patient_?name|patient_?id|patient_?birth_?date|accession_?number|other_?patient_?ids|"
    r"patient'?s\s+name|patient\s+id|patient'?s\s+birth\s+date|accession\s+number|"
    r"PatientName|PatientID|PatientBirthDate|AccessionNumber|OtherPatientIDs"
)
_KEY_VALUE = re.compile(rf"(?i)\b({_PHI_KEYS})(\s*[=:]\s*|\s+\w\w:\s*)(\"[^\"]*\"|'[^']*'|[^\s,;]+)")
# pydicom element reprs: "(0010,0010) Patient's Name  PN: ..." / "(0008,0050) ..." up to the line end
_ELEMENT_LINE = re.compile(r"(?i)\((0010,00(10|20|30|32|40|50)|0010,1000|0010,1001|0008,0050)\)[^\n]*")
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """Replace the values of patient-identifying attributes in ``text`` with ``<redacted>``."""
    text = _ELEMENT_LINE.sub(lambda m: f"({m.group(1)}) {REDACTED}", text)
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


class PhiRedactionFilter(logging.Filter):
    """Formats the record's message once and redacts it (also the exception text, if any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = redact(formatted)
        return True


FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def setup_logging(level: str = "INFO", stream: object = None) -> logging.Handler:
    """Install one stderr handler with the redaction filter on the root logger; return it.

    Parameters
    ----------
    level
        ``log.level``: DEBUG, INFO, WARNING or ERROR.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edge_node", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(PhiRedactionFilter())
    handler._edge_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_libraries()
    return handler


def quiet_libraries() -> None:
    """pynetdicom and pydicom at WARNING (their INFO/DEBUG output includes identifiers)."""
    for name in ("pynetdicom", "pydicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
