"""The pipeline's error classes: what a worker relies on to tell permanent from transient trouble."""

from __future__ import annotations

import pickle

from pipeline.errors import InputRejectedError, PipelineError, TransientPipelineError


def test_input_rejected_carries_reason_and_message_and_survives_pickling() -> None:
    error = InputRejectedError("missing_slices", "2 slice(s) missing")
    assert isinstance(error, PipelineError)
    assert str(error) == "missing_slices: 2 slice(s) missing"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.reason, copy.message) == (InputRejectedError, "missing_slices", "2 slice(s) missing")


def test_transient_and_permanent_errors_are_distinct_branches() -> None:
    assert issubclass(TransientPipelineError, PipelineError)
    assert not issubclass(TransientPipelineError, InputRejectedError)
    assert not issubclass(InputRejectedError, TransientPipelineError)
