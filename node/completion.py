"""Pure completion and series-planning policies: no clock, no SQL, no I/O.

`decide_completion` answers "is this study generation complete at ``now``?" from a `StudySnapshot`:
complete ``quiet_seconds`` after its last instance (a study may span several associations), or
``max_wait_seconds`` after the first instance of the generation, or as soon as an expected instance
count is reached. Because the snapshot's times are stored epoch seconds, the timers survive restarts.
`plan_series` decides which series of a completed generation get a job and why the others are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from node.records import CompletionDecision, CompletionPolicy, SeriesSummary, SkipReason, StudySnapshot


def decide_completion(snapshot: StudySnapshot, policy: CompletionPolicy, now: float) -> CompletionDecision:
    """Decide whether a receiving study generation is complete.

    Parameters
    ----------
    snapshot
        Times in epoch seconds.
    policy
        ``quiet_seconds`` and ``max_wait_seconds`` (seconds).
    now
        Epoch seconds.

    Returns
    -------
    CompletionDecision
        ``complete`` with ``reason`` one of ``expected_count``, ``quiet``, ``max_wait``; otherwise
        ``due_at`` is the earliest epoch time at which the answer can change (``reason`` = ``waiting``).
    """
    expected = snapshot.expected_instance_count
    if expected is not None and expected > 0 and snapshot.instance_count >= expected:
        return CompletionDecision(True, "expected_count", now)
    quiet_due = snapshot.last_received_at + policy.quiet_seconds
    max_due = snapshot.generation_started_at + policy.max_wait_seconds
    if now >= quiet_due:
        return CompletionDecision(True, "quiet", now)
    if now >= max_due:
        return CompletionDecision(True, "max_wait", now)
    return CompletionDecision(False, "waiting", min(quiet_due, max_due))


@dataclass(frozen=True, slots=True)
class SeriesPlan:
    """One series of a completed generation: a job (``skip_reason is None``) or skipped with the reason."""

    series_instance_uid: str
    skip_reason: SkipReason | None


def plan_series(summaries: Iterable[SeriesSummary]) -> list[SeriesPlan]:
    """One job per image series; no pixel data or a single single-frame image → skipped with the reason."""
    plans = []
    for s in sorted(summaries, key=lambda x: x.series_instance_uid):
        if s.pixel_instance_count == 0:
            plans.append(SeriesPlan(s.series_instance_uid, SkipReason.NO_PIXEL_DATA))
        elif s.pixel_instance_count == 1 and s.max_frames <= 1:
            plans.append(SeriesPlan(s.series_instance_uid, SkipReason.SINGLE_SLICE))
        else:
            plans.append(SeriesPlan(s.series_instance_uid, None))
    return plans
