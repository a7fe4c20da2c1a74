"""The receiver's error hierarchy: transient (resources; the sender retries) versus permanent (input rejected).

`handlers` turns every `TransientStoreError` into 0xA700 and every `RejectedInstanceError` into the
status it carries; nothing else may escape a handler. This module defines data only.
"""

from __future__ import annotations


class ReceiverError(Exception):
    """Base class of every error raised by the receiver."""


class TransientStoreError(ReceiverError):
    """A resource problem (spool not writable, disk full, queue full): answer 0xA700, the sender retries."""


class SpoolError(TransientStoreError):
    """Writing, syncing or renaming a spool file failed (the underlying OSError is chained)."""


class SpoolFullError(TransientStoreError):
    """Free space on the data disk is below ``storage.min_free_mb``."""


class QueueFullError(TransientStoreError):
    """The indexer's bounded queue (``receiver.queue_size``) is full."""


class RejectedInstanceError(ReceiverError):
    """The instance itself is unusable or conflicts with what is stored: a permanent failure status.

    Attributes
    ----------
    status
        The C-STORE failure status (0xC000-class) to answer.
    attribute
        The DICOM keyword the problem is about (for the log line), or ``""``.
    """

    def __init__(self, status: int, attribute: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.attribute = attribute


class HeaderError(RejectedInstanceError):
    """A required header attribute is missing or malformed, or the dataset cannot be parsed."""


class ConflictingStudyError(RejectedInstanceError):
    """The SOP Instance UID is already stored under another Study Instance UID."""


class ChangedContentRejectedError(RejectedInstanceError):
    """Changed content for a stored SOP Instance UID with ``receiver.on_changed_content = "reject"``."""


class StateTransitionError(ReceiverError):
    """A conditional UPDATE matched no row: the record was not in the state the transition requires."""
