"""The completion scheduler: a thread that completes studies and creates their jobs.

Every ``completion.check_interval_seconds`` it takes snapshots of the receiving study generations, asks
the pure `node.completion.decide_completion`, and for each complete one calls
`node.state.complete_study`, which marks it DISPATCHED and creates one PENDING job per image series
(skipped series recorded with the reason) in the same transaction. A study whose snapshot went stale
(an instance arrived meanwhile) is simply looked at again next tick. One log line per completed study.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from config.settings import CompletionSettings
from node import state
from node.completion import decide_completion
from node.db import connect
from node.errors import StateTransitionError
from node.records import CompletionPolicy

log = logging.getLogger(__name__)


def run_completion_pass(db: Any, policy: CompletionPolicy, now: float | None = None) -> int:
    """Complete every study generation that is due; return how many completed."""
    now = time.time() if now is None else now
    completed = 0
    for snapshot in state.list_receiving_studies(db):
        decision = decide_completion(snapshot, policy, now)
        if not decision.complete:
            continue
        try:
            outcome = state.complete_study(db, snapshot, decision.reason)
        except StateTransitionError:
            log.debug("event=completion_deferred study_instance_uid=%s", snapshot.study_instance_uid)
            continue
        completed += 1
        log.info(
            "event=study_completed study_instance_uid=%s generation=%d reason=%s instances=%d jobs=%d skipped=%d%s",
            snapshot.study_instance_uid, snapshot.generation, decision.reason, snapshot.instance_count,
            len(outcome.job_ids), len(outcome.skipped),
            "".join(f" skipped_series_reason={p.skip_reason}" for p in outcome.skipped[:5]),
        )
    return completed


class Scheduler:
    """Runs `run_completion_pass` periodically in its own thread with its own connection."""

    def __init__(self, database_path: Any, settings: CompletionSettings) -> None:
        self.database_path = database_path
        self.policy = CompletionPolicy(settings.quiet_seconds, settings.max_wait_seconds)
        self.interval = settings.check_interval_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        db = connect(self.database_path)
        try:
            while not self._stop.wait(self.interval):
                try:
                    run_completion_pass(db, self.policy)
                except Exception as exc:  # outermost loop: log and try again next tick
                    log.error("event=scheduler_failed error_type=%s error=%r", type(exc).__name__, str(exc)[:200])
        finally:
            db.conn.close()
