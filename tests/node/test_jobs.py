"""Job rows for the analysis worker: atomic claim, retry, re-queue after a dead worker, conditional transitions."""

from __future__ import annotations

import io
import time

import pytest

from node import state
from node.db import connect
from node.errors import StateTransitionError
from node.indexer import reconcile
from node.migrations import migrate
from node.records import JobState, StudySnapshot
from node.spool import Spool
from tests.node.conftest import make_series


@pytest.fixture
def db_with_job(tmp_path):
    spool = Spool(tmp_path / "data", fsync=False)
    spool.prepare()
    db = connect(spool.database_path)
    migrate(db)
    series = make_series(3)
    for ds in series:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        spool.store(ds.SOPInstanceUID, ds.StudyInstanceUID, buf.getvalue())
    reconcile(spool, db)
    [snapshot] = state.list_receiving_studies(db)
    state.complete_study(db, snapshot, "quiet")
    return db, series


def test_claim_takes_the_pending_job_once(db_with_job):
    db, series = db_with_job
    job = state.claim_next_job(db)
    assert (job.state, job.attempts, job.series_instance_uid) == (JobState.RUNNING, 1, series[0].SeriesInstanceUID)
    assert state.claim_next_job(db) is None
    assert len(state.list_job_instance_paths(db, job)) == 3


def test_finished_job_cannot_be_finished_again(db_with_job):
    db, _ = db_with_job
    job = state.claim_next_job(db)
    state.transition_job(db, job.job_id, JobState.RUNNING, JobState.SUCCEEDED)
    with pytest.raises(StateTransitionError):
        state.transition_job(db, job.job_id, JobState.RUNNING, JobState.FAILED)
    with pytest.raises(StateTransitionError):
        state.transition_job(db, job.job_id, JobState.SUCCEEDED, JobState.PENDING)


def test_retry_waits_until_due_then_is_claimed_again(db_with_job):
    db, _ = db_with_job
    job = state.claim_next_job(db)
    state.mark_job_retry(db, job.job_id, "out of memory", next_attempt_at=time.time() + 3600)
    assert state.release_due_retries(db) == 0
    assert state.release_due_retries(db, now=time.time() + 7200) == 1
    assert state.claim_next_job(db).attempts == 2


def test_running_jobs_of_a_dead_worker_return_to_pending(db_with_job):
    db, _ = db_with_job
    state.claim_next_job(db)
    assert state.requeue_running_jobs(db) == 1
    assert state.claim_next_job(db) is not None


def test_stale_completion_snapshot_is_refused(db_with_job):
    db, series = db_with_job
    stale = StudySnapshot(series[0].StudyInstanceUID, 1, 0.0, 0.0, 3)
    with pytest.raises(StateTransitionError):
        state.complete_study(db, stale, "quiet")
