"""The public surface: sorted `__all__`, every name importable, private modules stay private."""

from __future__ import annotations

import copy

import pytest

import aqueue
import aqueue.brokers


def test_all_is_sorted_and_importable() -> None:
    for module in (aqueue, aqueue.brokers):
        assert list(module.__all__) == sorted(module.__all__)
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_contract_names_are_exported() -> None:
    wanted = {
        "Queue", "MemoryBroker", "RedisBroker", "Broker", "Job", "JobState", "JobInfo",
        "ResultGroup", "JobContext", "current_job", "TaskError", "JobCancelled", "JobRevoked",
        "JobExpired", "JobNotFound", "JobError", "AqueueError", "TaskTimeout", "RetryTask",
        "CancelExecution", "Signal", "crontab", "every", "LockTimeout", "TaskLocked",
        "RateLimitExceeded", "SerializationError",
    }
    assert wanted <= set(aqueue.__all__)
    assert {"Broker", "MemoryBroker", "RedisBroker"} <= set(aqueue.brokers.__all__)


def test_error_tree() -> None:
    for error in (aqueue.TaskError, aqueue.JobCancelled, aqueue.JobRevoked, aqueue.JobExpired,
                  aqueue.JobNotFound):
        assert issubclass(error, aqueue.JobError)
    assert issubclass(aqueue.JobError, aqueue.AqueueError)
    assert not issubclass(aqueue.TaskTimeout, TimeoutError)
    assert not issubclass(aqueue.RetryTask, aqueue.AqueueError)
    assert not issubclass(aqueue.CancelExecution, aqueue.AqueueError)


@pytest.mark.parametrize("error", [
    aqueue.TaskError({"error": "ValueError('x')", "type": "ValueError", "job_id": "j1", "attempt": 2}),
    aqueue.JobCancelled("job j1 was cancelled", job_id="j1"),
    aqueue.JobNotFound("no job j1", job_id="j1"),
    aqueue.RateLimitExceeded("api", 1.5, reschedule=True),
    aqueue.RetryTask(delay=3),
    aqueue.CancelExecution(retry=False),
    aqueue.TaskTimeout("job j1 timed out"),
])
def test_errors_survive_copying(error: BaseException) -> None:
    # A copy (and a process pool's pickle, which rebuilds an error the same way): those with
    # arguments of their own were rebuilt from their message (TaskError and RateLimitExceeded
    # raised, RetryTask refused its delay, CancelExecution took the message for `retry`, JobError
    # lost its job id).
    for again in (copy.copy(error), copy.deepcopy(error)):
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert vars(again) == vars(error)
