"""Rate limits: at most `limit` uses per window of `per` seconds, across every worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from aqueue._checks import check_count, check_name
from aqueue._decorating import around
from aqueue._exceptions import RateLimitExceeded
from aqueue._time import Seconds, finite_seconds

if TYPE_CHECKING:
    from aqueue._queue import Queue

F = TypeVar("F", bound=Callable[..., Any])


class RateLimit:
    """`async with queue.rate_limit("key", limit=10, per=60):`, or a decorator below `@queue.task`.

    Each use is one atomic hit on the broker; windows are aligned to the epoch on the broker's
    clock (Redis's), so every worker counts in the same window whatever its host's clock says.
    Over the limit, `RateLimitExceeded(retry_after=...)`; inside a job with `retry=True` the job
    runs again in the next window without using a retry; with `retry=False` it is retried by its
    task's policy, none of its retries before the next window.
    """

    def __init__(self, queue: Queue, key: str, limit: int, per: Seconds, retry: bool = True) -> None:
        per = finite_seconds(per, "rate limit per")
        check_name(key, "a rate limit's key")
        check_count(limit, "a rate limit's limit")
        self.queue, self.key, self.limit, self.per, self.retry = queue, key, limit, per, retry

    def __repr__(self) -> str:
        return f"<RateLimit {self.key!r} {self.limit}/{self.per}s>"

    async def hit(self) -> None:
        """Count one use, or raise `RateLimitExceeded`."""
        wait = await self.queue.broker.rate_limit_hit(self.queue.name, self.key, self.limit, self.per)
        if wait > 0:
            raise RateLimitExceeded(self.key, wait, reschedule=self.retry)

    async def __aenter__(self) -> RateLimit:
        await self.hit()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def __call__(self, fn: F) -> F:
        return around(fn, self._guard)  # type: ignore[return-value]

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        await self.hit()
        yield
