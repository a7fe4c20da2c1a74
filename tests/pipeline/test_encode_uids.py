"""Result UIDs: deterministic, order-independent, distinct per kind/model/input, valid under 2.25."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.uids import derive_result_uid, plan_result_uids

UID_PATTERN = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")
SOURCES = ("1.2.3.4.1", "1.2.3.4.2", "1.2.3.4.3")


def test_same_inputs_give_the_same_uids_whatever_the_order() -> None:
    assert plan_result_uids(SOURCES, "m", "1") == plan_result_uids(reversed(SOURCES), "m", "1")


def test_every_output_kind_gets_its_own_uid() -> None:
    uids = plan_result_uids(SOURCES, "m", "1")
    values = [
        uids.seg_series_instance_uid,
        uids.seg_sop_instance_uid,
        uids.seg_dimension_organization_uid,
        uids.sr_series_instance_uid,
        uids.sr_sop_instance_uid,
        uids.device_observer_uid,
        uids.study_finding_tracking_uid,
        uids.tracking_uid(1),
        uids.tracking_uid(2),
    ]
    assert len(set(values)) == len(values)
    assert all(UID_PATTERN.match(v) and len(v) <= 64 for v in values)


def test_another_model_version_or_another_input_gives_new_uids() -> None:
    base = plan_result_uids(SOURCES, "m", "1")
    assert plan_result_uids(SOURCES, "m", "2").seg_sop_instance_uid != base.seg_sop_instance_uid
    assert plan_result_uids(SOURCES, "n", "1").seg_sop_instance_uid != base.seg_sop_instance_uid
    assert plan_result_uids(SOURCES[:2], "m", "1").seg_sop_instance_uid != base.seg_sop_instance_uid


def test_unknown_kinds_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        derive_result_uid(SOURCES, "m", "1", "seg")
    with pytest.raises(ValueError, match="kind"):
        derive_result_uid(SOURCES, "m", "1", "tracking:0")
    with pytest.raises(ValueError, match="at least one"):
        plan_result_uids([], "m", "1")


@given(
    st.lists(st.from_regex(r"1\.2\.[1-9][0-9]{0,20}(\.[1-9][0-9]{0,8}){0,6}", fullmatch=True), min_size=1, max_size=20),
    st.text(min_size=1, max_size=40),
    st.text(max_size=20),
)
def test_uids_are_valid_dicom_uids_for_any_input(sources: list[str], name: str, version: str) -> None:
    uid = derive_result_uid(sources, name, version, "sr-instance")
    assert UID_PATTERN.match(uid) and len(uid) <= 64
