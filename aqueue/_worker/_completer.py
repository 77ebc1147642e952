"""Writes completions to the broker in batches: whatever ended while the last write was in flight
goes in the next one, so a busy worker makes one round trip for many jobs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from aqueue._exceptions import BrokerConnectionError, BrokerError
from aqueue._worker._unreachable import Unreachable
from aqueue.brokers import Broker, Completion

logger = logging.getLogger("aqueue")

MAX_BATCH = 500


class Completer:
    def __init__(
        self,
        broker: Broker,
        queue: str,
        result_ttl: float,
        on_written: Callable[[list[Completion]], None],
        reclaim_settled: Callable[[], Awaitable[None]],
        on_applied: Callable[[list[Completion]], None],
        unreachable: Unreachable,
    ) -> None:
        self._broker, self._queue, self._ttl = broker, queue, result_ttl
        self._unreachable = unreachable  # the worker's: an outage is told once, whoever meets it
        self._on_written = on_written
        self._on_applied = on_applied  # those the broker took, of each batch written
        self._reclaim_settled = reclaim_settled
        self._pending: list[Completion] = []
        self._writing = 0  # outcomes in the write under way
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()

    def put(self, completion: Completion) -> None:
        self._pending.append(completion)
        self._idle = anyio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    @property
    def woken(self) -> bool:
        """Completions wait for `run` to take them: it is due to run, or busy writing others."""
        return self._wake.is_set()

    async def run(self) -> None:
        """Write batches until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._writing = len(batch)
                try:
                    await self._write(batch)
                finally:
                    self._writing = 0
            self._idle.set()

    async def drained(self) -> None:
        """Wait until everything put so far is written."""
        await self._idle.wait()

    @property
    def unwritten(self) -> int:
        """Outcomes put and not written yet (those of a write under way included)."""
        return len(self._pending) + self._writing

    async def _write(self, batch: list[Completion]) -> None:
        backoff = 0.05
        sent = [c.delivery for c in batch]
        while True:
            try:
                applied = await self._broker.finish(self._queue, batch, self._ttl)
                self._unreachable.reached("writing job outcomes")
                self._on_applied([c for c, ok in zip(batch, applied, strict=True) if ok])
                if not all(applied):
                    # This worker's own reclaim, under way, may be what took those jobs over.
                    await self._reclaim_settled()
                # A completion whose job came back to this worker while it was being written was
                # refused under its old delivery (unless a success): write it again under the new one.
                retry = [c for c, ok, d in zip(batch, applied, sent, strict=True)
                         if not ok and c.delivery is not d]
                batch = [c for c, ok, d in zip(batch, applied, sent, strict=True)
                         if ok or c.delivery is d]
                for c in retry:
                    self.put(c)
                break
            except BrokerConnectionError as exc:
                # Outcomes are never dropped for a lost connection: wait for the broker to return.
                self._unreachable.failed(f"writing {len(batch)} job outcome(s)", exc)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except BrokerError:
                if len(batch) > 1:
                    # One outcome Redis refuses (an argument over its proto-max-bulk-len, say)
                    # must not take the others with it: each is written alone.
                    for c in batch:
                        await self._write([c])
                    return
                # Not a connection problem: the lease lapses and the job is delivered again.
                logger.exception("writing the outcome of job %s failed; it will be redelivered",
                                 batch[0].delivery.job_id)
                break
        self._on_written(batch)
