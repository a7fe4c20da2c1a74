"""Frozen records and enumerations that cross the receiver's module boundaries.

The SCP processes hand `ReceivedFile` records to the indexer, the indexer stores `InstanceHeader`
values, the scheduler builds `StudySnapshot` values for the pure completion policy and gets a
`CompletionDecision` back. States and their allowed transitions live here as data (`STUDY_TRANSITIONS`,
`JOB_TRANSITIONS`); `node.state` enforces them with conditional UPDATEs. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path


class StudyState(enum.StrEnum):
    """Lifecycle of one study generation (see ARCHITECTURE.md, "State machines")."""

    RECEIVING = "RECEIVING"
    DISPATCHED = "DISPATCHED"
    DISCARDED = "DISCARDED"


class JobState(enum.StrEnum):
    """Lifecycle of one analysis job (one image series of one study generation)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    RETRY_WAIT = "RETRY_WAIT"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


#: study state -> states it may move to. DISPATCHED -> RECEIVING is the re-open of a new generation.
STUDY_TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.DISPATCHED, StudyState.DISCARDED}),
    StudyState.DISPATCHED: frozenset({StudyState.RECEIVING}),
    StudyState.DISCARDED: frozenset({StudyState.RECEIVING}),
}

#: job state -> states it may move to.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.RETRY_WAIT, JobState.REJECTED, JobState.FAILED, JobState.PENDING}
    ),
    JobState.RETRY_WAIT: frozenset({JobState.PENDING}),
    JobState.SUCCEEDED: frozenset(),
    JobState.REJECTED: frozenset(),
    JobState.FAILED: frozenset(),
}


class StoreOutcome(enum.StrEnum):
    """What the spool did with a received instance."""

    NEW = "NEW"  # first copy of this SOP Instance UID
    IDENTICAL = "IDENTICAL"  # byte-identical re-send; nothing changed on disk
    REPLACED = "REPLACED"  # changed content, stored copy replaced (policy keep_newest)
    KEPT_FIRST = "KEPT_FIRST"  # changed content, stored copy kept (policy keep_first)


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses of this SCP (PS3.4 Annex B.2.3; 0xC000-0xCFFF = "Cannot understand").

    The 0xC0xx codes are ours within the standard's "Cannot understand" range; each names one
    problem so a sender's log tells the fix. 0xC211 (pynetdicom's "handler raised") is never sent.
    """

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    UNREADABLE_DATASET = 0xC001
    BAD_STUDY_INSTANCE_UID = 0xC010
    BAD_SERIES_INSTANCE_UID = 0xC011
    BAD_SOP_INSTANCE_UID = 0xC012
    SOP_INSTANCE_UID_MISMATCH = 0xC013
    INSTANCE_OF_OTHER_STUDY = 0xC020
    CHANGED_CONTENT_REJECTED = 0xC021


class SkipReason(enum.StrEnum):
    """Why a series of a completed study gets no job."""

    NO_PIXEL_DATA = "no_pixel_data"
    SINGLE_SLICE = "single_slice"


# PS3.5 §9.1: components of digits separated by ".", at most 64 characters. Leading zeros inside a
# component are not conformant but some modalities send them; we accept them (tolerant on input) but
# never characters that could mean anything to a file system.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a syntactically usable UID (PS3.5 §9.1; leading zeros tolerated)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.match(value) is not None


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The few header attributes the index and routing need, read without decoding pixels.

    Attribute names follow the DICOM keywords in snake_case. ``image_position_patient`` is in LPS mm
    (Image Position (Patient), 0020,0032); ``slice_thickness_mm`` is Slice Thickness (0018,0050).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    body_part_examined: str = ""
    series_description: str = ""
    series_number: int | None = None
    image_type: str = ""
    slice_thickness_mm: float | None = None
    instance_number: int | None = None
    image_position_patient: tuple[float, float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    has_pixel_data: bool = False


@dataclass(frozen=True, slots=True)
class ReceivedFile:
    """One instance durably in the spool, handed from an SCP process (or the import folder) to the indexer.

    ``relative_path`` is relative to ``storage.data_dir``; ``received_at`` is wall-clock seconds since
    the epoch (the completion timers survive restarts because they are stored as such).
    """

    header: InstanceHeader
    relative_path: str
    size_bytes: int
    received_at: float
    calling_ae_title: str
    outcome: StoreOutcome = StoreOutcome.NEW


@dataclass(frozen=True, slots=True)
class StudySnapshot:
    """What the completion policy needs to know about one receiving study generation (times in epoch s)."""

    study_instance_uid: str
    generation: int
    generation_started_at: float
    last_received_at: float
    instance_count: int
    expected_instance_count: int | None = None


@dataclass(frozen=True, slots=True)
class CompletionPolicy:
    """``[completion]`` as the pure policy sees it."""

    quiet_seconds: float
    max_wait_seconds: float


@dataclass(frozen=True, slots=True)
class CompletionDecision:
    """``complete`` with the rule that fired (``reason``), or the epoch time to look again (``due_at``)."""

    complete: bool
    reason: str
    due_at: float


@dataclass(frozen=True, slots=True)
class SeriesSummary:
    """One series of one study generation, as the scheduler sees it when the study completes."""

    series_instance_uid: str
    modality: str
    instance_count: int
    pixel_instance_count: int
    max_frames: int


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A row of the ``jobs`` table."""

    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    generation: int
    state: JobState
    attempts: int
    created_at: float
    updated_at: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QuarantinedFile:
    """A spool file the indexer could not use, moved aside with the reason."""

    path: Path
    reason: str
