"""Errors of the analysis pipeline: the split between permanent and transient trouble.

A worker decides from the class alone what happens to a job: `InputRejectedError` (the series cannot be
analysed as it is: missing slices, gantry tilt, no pixel data, ...) moves the job to REJECTED and is never
retried; `TransientPipelineError` (a resource was exhausted or briefly unavailable) sends it to
RETRY_WAIT. This module holds the classes only; it must not import anything of `node`.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error the pipeline raises on purpose."""


class InputRejectedError(PipelineError):
    """The input cannot be analysed; retrying would give the same answer (permanent).

    Parameters
    ----------
    reason
        A short machine-friendly code (``snake_case``) such as ``"missing_slices"``, ``"gantry_tilt"``
        or ``"no_pixel_data"``; it is stored in the job record and logged as ``reason=...``.
    message
        A human sentence that names the problem and, where one exists, the fix. It must not contain
        patient-identifying data.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[InputRejectedError], tuple[str, str]]:
        # Survives pickling (a worker child process reports it to its parent intact).
        return (type(self), (self.reason, self.message))


class TransientPipelineError(PipelineError):
    """A resource problem (disk, memory, device busy); the job is retried later."""
