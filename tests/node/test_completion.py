"""Study completion: the pure policy, series planning, and a study split across associations."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from node.completion import decide_completion, plan_series
from node.records import CompletionPolicy, SeriesSummary, SkipReason, StudySnapshot
from tests.node.conftest import make_ct, make_series, send, wait_for

POLICY = CompletionPolicy(quiet_seconds=10.0, max_wait_seconds=900.0)


def snap(first: float, last: float, count: int = 3, expected: int | None = None) -> StudySnapshot:
    return StudySnapshot("1.2.3", 1, first, last, count, expected)


def test_study_is_not_complete_within_quiet_seconds_and_says_when_to_look_again():
    d = decide_completion(snap(100.0, 105.0), POLICY, now=110.0)
    assert (d.complete, d.reason, d.due_at) == (False, "waiting", 115.0)


def test_study_completes_quiet_seconds_after_its_last_instance():
    d = decide_completion(snap(100.0, 105.0), POLICY, now=115.0)
    assert (d.complete, d.reason) == (True, "quiet")


def test_study_completes_max_wait_seconds_after_its_first_instance_even_if_instances_keep_coming():
    d = decide_completion(snap(100.0, 999.0), POLICY, now=1000.0)
    assert (d.complete, d.reason) == (True, "max_wait")


def test_study_completes_early_when_expected_count_is_reached():
    d = decide_completion(snap(100.0, 105.0, count=5, expected=5), POLICY, now=106.0)
    assert (d.complete, d.reason) == (True, "expected_count")


@pytest.mark.parametrize(
    ("summary", "reason"),
    [
        (SeriesSummary("1.1", "SR", 1, 0, 1), SkipReason.NO_PIXEL_DATA),
        (SeriesSummary("1.2", "CT", 1, 1, 1), SkipReason.SINGLE_SLICE),
        (SeriesSummary("1.3", "CT", 1, 1, 120), None),  # one enhanced multi-frame instance
        (SeriesSummary("1.4", "CT", 40, 40, 1), None),
    ],
)
def test_series_plan_skips_series_that_cannot_be_analysed_with_the_reason(summary, reason):
    [plan] = plan_series([summary])
    assert plan.skip_reason == reason


def _study_row(node, study_uid):
    return node.db().execute(
        "SELECT state, generation, completion_reason FROM studies WHERE study_instance_uid = ?", [study_uid]
    ).fetchone()


def test_study_split_across_three_associations_completes_once_per_generation(node_factory):
    node = node_factory(completion={"quiet_seconds": 1.5, "check_interval_seconds": 0.1})
    study, series = generate_uid(), generate_uid()
    slices = [make_ct(study, series, i) for i in range(9)]
    # association 1, then a gap shorter than quiet_seconds, then association 2: one generation
    assert send(node.port, slices[:3]) == [0] * 3
    time.sleep(0.5)  # the gap under test (not synchronisation)
    assert send(node.port, slices[3:6]) == [0] * 3
    node.wait_indexed(6)
    assert _study_row(node, study)[0] == "RECEIVING"
    wait_for(lambda: _study_row(node, study)[0] == "DISPATCHED", timeout=10, what="completion")
    assert _study_row(node, study) == ("DISPATCHED", 1, "quiet")
    jobs = node.db().execute("SELECT series_instance_uid, generation, state FROM jobs").fetchall()
    assert jobs == [(series, 1, "PENDING")]
    # association 3 after a gap longer than quiet_seconds: the study re-opens as generation 2
    assert send(node.port, slices[6:]) == [0] * 3
    wait_for(lambda: node.count("SELECT count(*) FROM jobs") == 2, timeout=10, what="the second generation's job")
    assert _study_row(node, study) == ("DISPATCHED", 2, "quiet")
    assert node.db().execute("SELECT generation, state FROM jobs ORDER BY job_id").fetchall() == [
        (1, "PENDING"), (2, "PENDING")]
    assert node.count("SELECT count(*) FROM instances WHERE generation = 2") == 3


def test_completed_study_records_skipped_series_with_reasons(node_factory):
    node = node_factory(completion={"quiet_seconds": 0.5, "check_interval_seconds": 0.1})
    study = generate_uid()
    ct = make_series(3, study_uid=study)
    single = [make_ct(study, generate_uid(), 0)]
    no_pixels = [make_ct(study, generate_uid(), 0, with_pixels=False)]
    assert send(node.port, ct + single + no_pixels) == [0] * 5
    wait_for(lambda: node.count("SELECT count(*) FROM studies WHERE state = 'DISPATCHED'") == 1, what="completion")
    skipped = dict(node.db().execute("SELECT series_instance_uid, reason FROM skipped_series").fetchall())
    assert skipped == {single[0].SeriesInstanceUID: "single_slice", no_pixels[0].SeriesInstanceUID: "no_pixel_data"}
    assert node.db().execute("SELECT series_instance_uid FROM jobs").fetchall() == [(ct[0].SeriesInstanceUID,)]


def test_identical_resend_after_completion_does_not_reopen_the_study(node_factory):
    node = node_factory(completion={"quiet_seconds": 0.5, "check_interval_seconds": 0.1})
    series = make_series(3)
    assert send(node.port, series) == [0] * 3
    wait_for(lambda: node.count("SELECT count(*) FROM jobs") == 1, what="completion")
    assert send(node.port, series) == [0] * 3
    time.sleep(1.0)  # longer than quiet_seconds: a wrong re-open would have completed again by now
    assert node.count("SELECT count(*) FROM jobs") == 1
    assert node.count("SELECT max(generation) FROM studies") == 1


def test_completion_timers_survive_a_restart(tmp_path):
    from config.load import load_settings
    from tests.node.conftest import start_in_process, write_config

    settings = load_settings(write_config(tmp_path, completion={"quiet_seconds": 1.5, "check_interval_seconds": 0.1}),
                             env={})
    first = start_in_process(settings)
    series = make_series(3)
    try:
        assert send(first.port, series) == [0] * 3
        first.wait_indexed(3)
    finally:
        first.stop()  # before quiet_seconds have passed
    second = start_in_process(settings)
    try:
        wait_for(lambda: second.count("SELECT count(*) FROM jobs") == 1, timeout=10, what="completion after restart")
        row = second.db().execute("SELECT first_received_at, completed_at FROM studies").fetchone()
        # completed on the stored arrival time, not on the restart time
        assert row[1] - row[0] < 1.5 + 3.0
    finally:
        second.stop()


@hsettings(max_examples=200, deadline=None)
@given(
    first=st.floats(0, 1e6), gap=st.floats(0, 1e4), quiet=st.floats(0.1, 1e3), extra=st.floats(0, 1e4),
    elapsed=st.floats(0, 3e4),
)
def test_decide_completion_fires_exactly_when_a_timer_has_run_out(first, gap, quiet, extra, elapsed):
    policy = CompletionPolicy(quiet_seconds=quiet, max_wait_seconds=quiet + extra)
    snapshot = snap(first, first + gap)
    now = first + elapsed
    decision = decide_completion(snapshot, policy, now)
    due = min(snapshot.last_received_at + policy.quiet_seconds, first + policy.max_wait_seconds)
    assert decision.complete == (now >= due)
    if not decision.complete:
        assert decision.due_at == due > now
