"""The worker's writer of outcomes, on a broker stub: what it does when a write is refused."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import pytest

from aqueue._exceptions import BrokerConnectionError, BrokerError
from aqueue._worker._completer import Completer
from aqueue._worker._unreachable import Unreachable
from aqueue.brokers import Completion, Delivery, Outcome


class RefusesOne:
    """Refuses any write that holds one outcome (as Redis refuses an argument over its
    proto-max-bulk-len: a protocol error, not a lost connection)."""

    def __init__(self, refused: str) -> None:
        self.refused = refused
        self.writes: list[list[str]] = []

    async def finish(self, queue: str, completions: Sequence[Completion], ttl: float) -> list[bool]:
        ids = [c.delivery.job_id for c in completions]
        self.writes.append(ids)
        if self.refused in ids:
            raise BrokerError("Protocol error: invalid bulk length")
        return [True] * len(ids)


def _completion(job_id: str) -> Completion:
    d = Delivery(job_id=job_id, task="t", payload=b"{}", attempt=1, token=1, priority=0,
                 enqueued_at=0.0, receipt="1-0", consumer="w")
    return Completion(d, Outcome.SUCCEEDED, 0.0, result=b"1")


async def test_an_outcome_the_broker_refuses_does_not_take_the_others_in_its_write() -> None:
    # The whole write was given up: the jobs beside it, done, were delivered and run again (and,
    # written beside it each time, dead-lettered for their deliveries).
    broker = RefusesOne("refused")
    applied: list[str] = []
    written: list[str] = []

    async def settled() -> None:
        return None

    completer = Completer(
        broker, "q", 60.0,  # type: ignore[arg-type]
        lambda cs: written.extend(c.delivery.job_id for c in cs), settled,
        lambda cs: applied.extend(c.delivery.job_id for c in cs), Unreachable(),
    )
    for job_id in ("a", "refused", "c"):
        completer.put(_completion(job_id))
    async with anyio.create_task_group() as tg:
        tg.start_soon(completer.run)
        with anyio.fail_after(10):
            await completer.drained()
        tg.cancel_scope.cancel()
    assert broker.writes == [["a", "refused", "c"], ["a"], ["refused"], ["c"]]
    assert applied == ["a", "c"]
    assert sorted(written) == ["a", "c", "refused"]



class AwayAFewTimes:
    """Out of reach for the first `times` writes."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.written: list[str] = []

    async def finish(self, queue: str, completions: Sequence[Completion], ttl: float) -> list[bool]:
        if self.left:
            self.left -= 1
            raise BrokerConnectionError("cannot reach Redis: Connection refused")
        self.written += [c.delivery.job_id for c in completions]
        return [True] * len(completions)


async def test_outcomes_kept_through_an_outage_are_told_as_the_worker_tells_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each failed write was a warning of its own, every 2 s at most while Redis was away, and
    # nothing said when the outcomes got through.
    broker = AwayAFewTimes(4)

    async def settled() -> None:
        return None

    completer = Completer(broker, "q", 60.0, lambda cs: None, settled, lambda cs: None,  # type: ignore[arg-type]
                          Unreachable())
    completer.put(_completion("a"))
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(completer.run)
            with anyio.fail_after(10):
                await completer.drained()
            tg.cancel_scope.cancel()
    assert broker.written == ["a"]  # kept, and written once Redis answered
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned
    assert warned[0].startswith("broker unreachable (writing 1 job outcome(s)): cannot reach Redis")
    assert warned[1].startswith("broker reachable again after ")
