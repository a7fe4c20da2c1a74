"""Deterministic UIDs for the results of one analysis (SEG and SR series/instances, tracking UIDs).

Each UID is ``2.25.<n>`` (PS3.5 §B.2: a UID derived from a UUID), where ``n`` is the 128-bit integer of
a name-based UUID (RFC 4122 version 5) of the sorted input SOP Instance UIDs, the model's name and
version, and the output kind. The same input analysed by the same model therefore always yields the
same result UIDs, so a resend or a re-run is recognised by a PACS as the same object; a changed input
(another instance, or a new model version) yields new ones. This module derives strings only: it reads
no files and knows nothing of DICOM encoding.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

#: Fixed namespace of our result UIDs (uuid5 of the product's DNS-like name); never change it, or every
#: result UID changes.
RESULT_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-edge-node:result-uid")

#: Output kinds that `derive_result_uid` accepts besides ``tracking:<n>``.
RESULT_KINDS = (
    "seg-series",
    "seg-instance",
    "seg-dimension-organization",
    "sr-series",
    "sr-instance",
    "device-observer",
    "study-finding",
)


def derive_result_uid(
    source_sop_instance_uids: Iterable[str],
    model_name: str,
    model_version: str,
    kind: str,
) -> str:
    """Derive one result UID under the ``2.25`` root.

    Parameters
    ----------
    source_sop_instance_uids
        SOP Instance UIDs (0008,0018) of the analysed instances, in any order (they are sorted and
        de-duplicated first, so the order in which files were found does not matter).
    model_name, model_version
        The model's manifest name and version.
    kind
        One of `RESULT_KINDS`, or ``"tracking:<n>"`` with ``n`` a positive integer (the n-th finding).

    Returns
    -------
    str
        ``"2.25."`` followed by the decimal 128-bit integer of a version-5 UUID; at most 44 characters,
        within the 64 allowed for a UI value.

    Raises
    ------
    ValueError
        For an unknown kind or an empty model name.
    """
    if kind not in RESULT_KINDS:
        prefix, _, number = kind.partition(":")
        if prefix != "tracking" or not number.isdigit() or int(number) < 1:
            raise ValueError(f"unknown result UID kind {kind!r}; use one of {RESULT_KINDS} or 'tracking:<n>'")
    if not model_name:
        raise ValueError("a result UID needs the model's name")
    uids = sorted({str(u).strip() for u in source_sop_instance_uids})
    # A newline cannot occur in a UID, so the joined name is unambiguous.
    name = "\n".join([kind, model_name, model_version, *uids])
    return f"2.25.{uuid.uuid5(RESULT_UID_NAMESPACE, name).int}"


@dataclass(frozen=True, slots=True)
class ResultUids:
    """The UIDs of one analysis' outputs, derived once from its inputs (see `plan_result_uids`)."""

    seg_series_instance_uid: str
    seg_sop_instance_uid: str
    seg_dimension_organization_uid: str
    sr_series_instance_uid: str
    sr_sop_instance_uid: str
    device_observer_uid: str
    study_finding_tracking_uid: str
    source_sop_instance_uids: tuple[str, ...]
    model_name: str
    model_version: str

    def tracking_uid(self, n: int) -> str:
        """The tracking UID (TID 4108, Tracking Unique Identifier) of the n-th finding (1-based)."""
        return derive_result_uid(self.source_sop_instance_uids, self.model_name, self.model_version, f"tracking:{n}")


def plan_result_uids(source_sop_instance_uids: Iterable[str], model_name: str, model_version: str) -> ResultUids:
    """Derive every result UID of one analysis of the given instances by the given model."""
    uids = tuple(sorted({str(u).strip() for u in source_sop_instance_uids}))
    if not uids:
        raise ValueError("result UIDs need at least one source SOP Instance UID")

    def derive(kind: str) -> str:
        return derive_result_uid(uids, model_name, model_version, kind)

    return ResultUids(
        seg_series_instance_uid=derive("seg-series"),
        seg_sop_instance_uid=derive("seg-instance"),
        seg_dimension_organization_uid=derive("seg-dimension-organization"),
        sr_series_instance_uid=derive("sr-series"),
        sr_sop_instance_uid=derive("sr-instance"),
        device_observer_uid=derive("device-observer"),
        study_finding_tracking_uid=derive("study-finding"),
        source_sop_instance_uids=uids,
        model_name=model_name,
        model_version=model_version,
    )
