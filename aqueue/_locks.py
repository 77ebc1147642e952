"""Distributed locks: token-owned, renewed while held, released only by their holder."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.lowlevel import RunVar

from aqueue import _outage
from aqueue._background import Background
from aqueue._checks import check_name
from aqueue._decorating import around
from aqueue._exceptions import BrokerConnectionError, BrokerError, ConfigurationError, LockTimeout, TaskLocked
from aqueue._time import Seconds, finite_seconds, seconds

if TYPE_CHECKING:
    from aqueue._queue import Queue

logger = logging.getLogger("aqueue")

F = TypeVar("F", bound=Callable[..., Any])

# How long a request for a lock, or the release of one that failed, may take before it is given up
# on, whatever the timeout (a healthy Redis answers in well under a millisecond).
ATTEMPT_WITHIN = 1.0


@dataclass
class _Line:
    """The waiters of this process for one lock, in turn."""

    turn: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0
    # Shared: a waiter whose turn comes while the broker is out of reach gives up with the one
    # before it, not after a time out of reach of its own (the tenth after ten times as long).
    out_of_reach: _outage.OutOfReach = field(default_factory=_outage.OutOfReach)
    # The waits for a turn of the waiters with no timeout: ended by the waiter at the front once
    # the broker has been out of reach for RIDE_THROUGH s, whatever its own timeout (one behind a
    # waiter with a timeout of minutes waited out that timeout first).
    patient: set[anyio.CancelScope] = field(default_factory=set)

    def out_of_reach_too_long(self) -> bool:
        """A failed try counted; True once tries have failed for RIDE_THROUGH s in a row, and then
        the waiters with no timeout lined up behind give up."""
        if not self.out_of_reach.for_too_long():
            return False
        for wait in self.patient:
            wait.cancel()
        return True


# Per event loop: each lock's line, by where the broker keeps its data, queue and lock name.
_LINES: RunVar[dict[tuple[object, str, str], _Line]] = RunVar("aqueue_lock_lines")

# The locks each task holds in this process, by queue: one that a task asks for again, with no
# timeout, would wait for itself for ever (a lock is not re-entrant).
_held: set[tuple[object, str, str, object]] = set()


class Lock:
    """`async with queue.lock("name", ttl=30, timeout=None):`, or a decorator below `@queue.task`.

    Waits up to `timeout` seconds (None: for ever; 0: not at all) and raises `LockTimeout`. While
    held it is renewed every `ttl / 3` seconds, so a long holder never loses it; if the holder dies
    it frees itself after `ttl`. As a task decorator a held lock raises `TaskLocked`, at once or
    after waiting `timeout` seconds if one is given, and the job is retried by its task's policy.
    """

    def __init__(
        self, queue: Queue, name: str, ttl: Seconds = 30.0, timeout: Seconds | None = None
    ) -> None:
        check_name(name, "a lock's name")
        self.queue, self.name, self.ttl = queue, name, finite_seconds(ttl, "lock ttl")
        self.timeout = None if timeout is None else seconds(timeout, "lock timeout")
        if self.timeout == math.inf:
            raise ConfigurationError("lock timeout must be finite (None: wait for ever)")
        # One Lock object may be entered by several tasks at once: each holds its own token.
        self._stacks: dict[object, AsyncExitStack] = {}

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} ttl={self.ttl}>"

    async def __aenter__(self) -> Lock:
        stack = AsyncExitStack()
        await stack.enter_async_context(self.held(self.timeout))
        self._stacks[anyio.get_current_task().id] = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack = self._stacks.pop(anyio.get_current_task().id, None)
        if stack is None:
            # Left from another task than the one that entered it (an AsyncExitStack closed
            # elsewhere, a fixture's teardown): the one holder is released. Of several, which one
            # is meant cannot be told.
            if len(self._stacks) != 1:
                raise RuntimeError(f"lock {self.name!r} left from a task that did not enter it, "
                                   f"while {len(self._stacks)} tasks hold it through this object")
            _, stack = self._stacks.popitem()
        return await stack.__aexit__(exc_type, exc, tb)

    def __call__(self, fn: F) -> F:
        """As a task decorator: the job runs holding the lock, or raises `TaskLocked`."""
        return around(fn, self._for_job)  # type: ignore[return-value]

    @asynccontextmanager
    async def _for_job(self) -> AsyncIterator[None]:
        try:
            token = await self._acquire(self.timeout or 0)
        except LockTimeout:
            raise TaskLocked(f"lock {self.name!r} is held by another job") from None
        async with self._keep(token):
            yield

    @asynccontextmanager
    async def held(self, timeout: float | None) -> AsyncIterator[None]:
        token = await self._acquire(timeout)
        async with self._keep(token):
            yield

    async def _acquire(self, timeout: float | None) -> str:
        if timeout is None and self._holding() in _held:  # with a timeout, it times out
            raise RuntimeError(f"lock {self.name!r} is already held by this task: a lock is not "
                               "re-entrant, and would wait for itself for ever")
        deadline = None if timeout is None else anyio.current_time() + timeout
        if timeout == 0:  # one try, waiting for no one
            return await self._compete(timeout, deadline, _Line())
        # The waiters of this process line up, and only the first waits on the broker: a release
        # woke every waiter listening, and each tried the lock again (a hand-off cost a request
        # per waiter, and 200 waiters took 28 ms each).
        lines = _LINES.get(None)
        if lines is None:
            lines = {}
            _LINES.set(lines)
        key = (self.queue.broker._data_home(), self.queue.name, self.name)
        line = lines.get(key)
        if line is None:
            line = lines[key] = _Line()
        line.users += 1
        try:
            try:
                # A turn no one holds is taken at once: a timeout spent by now (a tiny one) still
                # makes the one try that timeout=0 makes. A caller cancelled already is not.
                await anyio.lowlevel.checkpoint_if_cancelled()
                line.turn.acquire_nowait()
            except anyio.WouldBlock:
                await self._wait_for_turn(line, timeout, deadline)
            try:
                return await self._compete(timeout, deadline, line)
            finally:
                line.turn.release()
        finally:
            line.users -= 1
            if not line.users:
                del lines[key]

    async def _wait_for_turn(self, line: _Line, timeout: float | None, deadline: float | None) -> None:
        """Wait for the waiters of this process before this one, until `deadline`."""
        left = math.inf if deadline is None else deadline - anyio.current_time()
        with anyio.move_on_after(left) as queued:
            if deadline is None:
                line.patient.add(queued)
            try:
                await line.turn.acquire()
            finally:
                line.patient.discard(queued)
        if queued.cancelled_caught:  # its turn never came
            if deadline is None:
                raise BrokerConnectionError(f"lock {self.name!r} not acquired: {self.queue.broker.url} "
                                            f"has been out of reach for {_outage.RIDE_THROUGH}s")
            if line.out_of_reach.since is not None:
                raise BrokerConnectionError(f"lock {self.name!r} not acquired within {timeout}s: "
                                            "the broker is out of reach")
            raise LockTimeout(f"lock {self.name!r} not acquired within {timeout}s")

    async def _compete(self, timeout: float | None, deadline: float | None, line: _Line) -> str:
        """Take the lock in the broker, waiting for its releases until `deadline`."""
        broker, queue = self.queue.broker, self.queue.name
        out_of_reach = line.out_of_reach
        closes = self.queue._closes
        # Requests that got no answer (a lost connection, a cut-off, a cancel): each may have
        # taken the lock. Their tokens are released once the broker answers again, or as the wait
        # ends, all within ATTEMPT_WITHIN; not at each loss: a release sent then is lost as well.
        lost: list[str] = []
        try:
            while True:
                token = uuid.uuid4().hex  # a token per request: a late release frees no later one
                # Each request is bounded by what is left of the timeout (the first one, which
                # even timeout=0 makes, by ATTEMPT_WITHIN at least) and cut off by the caller's
                # cancel: a slow Redis held the caller for its socket timeout, twice. What a
                # request with no answer may have taken is released by its token: free again
                # whether it was taken or not; if the release gets no answer either, it is
                # logged, and the lock, if taken, frees itself after its ttl (held by no one
                # till then).
                bound = math.inf if deadline is None else max(deadline - anyio.current_time(), ATTEMPT_WITHIN)
                taken = False
                try:
                    with anyio.move_on_after(bound) as attempt:
                        taken = await broker.lock_acquire(queue, self.name, token, self.ttl)
                except BrokerConnectionError as exc:
                    lost.append(token)
                    await self._ride_out(exc, line, deadline, closes)
                    continue
                except BaseException:
                    lost.append(token)
                    raise
                if attempt.cancelled_caught:
                    lost.append(token)
                    raise LockTimeout(f"lock {self.name!r} not acquired within {timeout}s (no answer from "
                                      "the broker in time)")
                out_of_reach.reached()  # answered
                if taken and self.queue._closes == closes:
                    return token  # so none of the requests with no answer holds it
                if taken:  # as the queue closed: left to its ttl, as a release would reopen it
                    lost.append(token)
                self._check_open(closes)  # closed while it asked: a release or a wait would reopen
                remaining = None if deadline is None else deadline - anyio.current_time()
                if lost and (remaining is None or remaining > 0):
                    ours = False
                    try:
                        with anyio.move_on_after(math.inf if remaining is None else remaining):
                            ours = await self._release_lost(lost, closes)
                    except BrokerConnectionError as exc:
                        await self._ride_out(exc, line, deadline, closes)
                        continue  # asked again: waiting for a release ours may never send
                    self._check_open(closes)  # a close during the release: asking again would reopen
                    if ours:
                        continue  # held by a request of ours with no answer: free now
                    remaining = None if deadline is None else deadline - anyio.current_time()
                if remaining is not None and remaining <= 0:
                    raise LockTimeout(f"lock {self.name!r} not acquired within {timeout}s")
                try:
                    # Bounded as a whole: the subscribe and the read of the lock's ttl before the
                    # wait itself held a waiter 10 s past its timeout when Redis stopped answering.
                    with anyio.move_on_after(math.inf if remaining is None else remaining):
                        await broker.lock_wait(queue, self.name, remaining)  # woken when released
                except BrokerConnectionError as exc:
                    await self._ride_out(exc, line, deadline, closes)
        except BaseException:
            if lost and self.queue._closes == closes:  # closed, a release would open it again
                with anyio.CancelScope(shield=True), anyio.move_on_after(ATTEMPT_WITHIN):
                    try:
                        await self._release_lost(lost, closes)
                    except Exception:  # said below; it must not replace what is raised
                        pass
            if lost:
                logger.warning("lock %r: %d request(s) whose answer was lost, or came as the queue closed, "
                               "may have taken it, not released (no answer, or the queue closed); it frees "
                               "itself within %ss", self.name, len(lost), self.ttl)
            raise

    async def _ride_out(
        self, exc: BrokerConnectionError, line: _Line, deadline: float | None, closes: int
    ) -> None:
        """After a lost connection: pause before trying again; raise `exc` once the deadline has
        passed, or, with none, once the broker has been out of reach for long."""
        out_of_reach = line.out_of_reach
        too_long = line.out_of_reach_too_long()  # counted, for the waiters lined up behind too
        if deadline is None:
            if too_long:
                raise exc
            await out_of_reach.pause()
        else:
            left = deadline - anyio.current_time()
            if left <= 0:
                raise exc
            await out_of_reach.pause(at_most=left)
        self._check_open(closes)

    def _check_open(self, closes: int) -> None:
        if self.queue._closes != closes:  # going on would open the broker again behind the close
            raise BrokerError(f"queue {self.queue.name!r} was closed while waiting for lock {self.name!r}")

    async def _release_lost(self, lost: list[str], closes: int) -> bool:
        """Release what the requests with no answer may have taken, forgetting each token the
        broker answers for; True if one of them held the lock. Raises BrokerConnectionError when
        the broker is out of reach again (the tokens not answered for are kept), BrokerError once
        the queue is closed (a release sent then would open the broker again)."""
        held = False
        for token in list(lost):
            self._check_open(closes)
            held = await self.queue.broker.lock_release(self.queue.name, self.name, token) or held
            lost.remove(token)
        return held

    @asynccontextmanager
    async def _keep(self, token: str) -> AsyncIterator[None]:
        """Renew while the body runs; release on the way out, whatever ends the body."""
        holding = self._holding()
        renewer = Background(self._renew(token))
        _held.add(holding)
        try:
            yield
        finally:
            _held.discard(holding)
            failure = await renewer.stop()
            if failure is not None:
                logger.error("renewing lock %r failed", self.name, exc_info=failure)
            await self._release(token)

    async def _release(self, token: str) -> None:
        """Release by `token`, whatever is being raised around it; a release that fails is logged,
        as raised it would replace what ended the body (an error, a cancellation, a success).
        The lock frees itself after its ttl."""
        with anyio.CancelScope(shield=True):
            try:
                await self.queue.broker.lock_release(self.queue.name, self.name, token)
            except Exception as exc:
                logger.warning("releasing lock %r failed; it frees itself within %ss: %s", self.name,
                               self.ttl, exc)

    def _holding(self) -> tuple[object, str, str, object]:
        # By where the broker keeps its data and by queue name, not by Queue or broker object: two
        # objects for one queue share its locks.
        return self.queue.broker._data_home(), self.queue.name, self.name, anyio.get_current_task().id

    async def _renew(self, token: str) -> None:
        """Extend the lock every ttl/3; after a renewal that failed, every ttl/10 (at most a
        second) until one takes: waiting a whole ttl/3 again lost the lock to a broker out of
        reach for little more than a third of its ttl. Once no renewal has taken for a whole
        ttl, the lock is lost: said, and no more is tried."""
        wait, held_until, failing = self.ttl / 3, anyio.current_time() + self.ttl, False
        while True:
            await anyio.sleep(wait)
            asked = anyio.current_time()
            try:
                extended = await self.queue.broker.lock_extend(self.queue.name, self.name, token,
                                                               self.ttl)
            except BrokerError as exc:
                if anyio.current_time() >= held_until:
                    logger.error("lock %r was lost while held: no renewal took within its ttl "
                                 "(%ss): %s", self.name, self.ttl, exc)
                    return
                if not failing:  # once per spell
                    logger.warning("renewing lock %r failed, trying again: %s", self.name, exc)
                wait, failing = min(self.ttl / 10, 1.0), True
                continue
            if not extended:
                logger.error("lock %r was lost while held: it is no longer ours (its ttl ran out, or "
                             "Redis lost the key: a restart or a failover without it)", self.name)
                return
            wait, held_until, failing = self.ttl / 3, asked + self.ttl, False
