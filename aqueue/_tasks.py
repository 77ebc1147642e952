"""Tasks: a function registered on a queue, callable here and now or enqueued to run on a worker."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from aqueue._checks import check_count, check_name, finite_at_least
from aqueue._exceptions import ConfigurationError
from aqueue._time import LONGEST, Seconds, When, epoch, longest, seconds, timedelta_or_seconds

if TYPE_CHECKING:
    from aqueue._jobs import Job, ResultGroup
    from aqueue._queue import Queue
    from aqueue._workflows import Signature

# A job carries its retries in its payload (JSON: 64-bit integers at most); a billion is "for ever".
MAX_RETRIES = 10**9

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class TaskPolicy:
    """How a task's jobs run. Set on the decorator; some fields overridable per call."""

    retries: int = 0
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    timeout: float | None = None
    priority: int = 0
    expires: When | None = None

    def __post_init__(self) -> None:
        check_count(self.retries, "retries", minimum=0, maximum=MAX_RETRIES)
        if self.expires is not None:
            epoch(self.expires, 0.0, "expires")  # a bad one fails here, not at every enqueue
        for what, value, least in (("retry_delay", self.retry_delay, 0),
                                   ("retry_backoff", self.retry_backoff, 1)):
            if not finite_at_least(value, least):
                raise ConfigurationError(f"{what} must be a finite number >= {least}, got {value!r}")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            raise ConfigurationError(f"timeout must be > 0 and finite, got {self.timeout}")
        check_priority(self.priority)

    def retry_wait(self, attempt: int) -> float:
        """Seconds before attempt `attempt + 1`, at most `LONGEST`: a backoff grown past what a
        float holds (jobs that retry themselves count attempts without end) is a wait, not an error."""
        if not self.retry_delay:
            return 0.0
        try:  # as floats: ints would be raised exactly (slowly) and fail float() past its range
            wait = float(self.retry_delay) * float(self.retry_backoff) ** (attempt - 1)
        except OverflowError:
            return LONGEST
        return min(wait, LONGEST)


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Options of one enqueue, on top of the task's policy."""

    delay: Seconds | None = None
    eta: datetime | None = None
    priority: int | None = None
    expires: When | None = None
    timeout: Seconds | None = None
    retries: int | None = None
    key: str | None = None


CALL_OPTION_NAMES = frozenset(option.name for option in fields(CallOptions))
SHAPES_KEPT = 64  # shapes of call a task remembers as good (see `Task.check_call`)

# Frozen: one instance serves every enqueue that sets no options.
NO_OPTIONS = CallOptions()


def unguarded(fn: Callable[P, Any]) -> Callable[P, Any]:
    """The user's own function under its guards (`@queue.lock`, `@queue.rate_limit`, see
    `aqueue._decorating`): what a task's direct call runs, and what tells an async task from a
    plain one."""
    while hasattr(fn, "__aqueue_guarded__"):
        fn = fn.__aqueue_guarded__
    return fn


def _parameters(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The signature a job's call meets: the function's own, not one it wraps (a decorator of
    the user's made with functools.wraps takes what its wrapper takes). None if inspect cannot
    read it."""
    try:
        return inspect.signature(fn, follow_wrapped=False)
    except (TypeError, ValueError):
        return None


class Task(Generic[P, R]):
    """A registered task. Subclasses type the direct call for async and plain functions."""

    def __init__(self, queue: Queue, fn: Callable[P, Any], name: str, policy: TaskPolicy) -> None:
        self.queue = queue
        self.fn = fn
        self.name = name
        self.policy = policy
        self.is_async = inspect.iscoroutinefunction(fn)
        self._direct = unguarded(fn)  # what a direct call runs: no lock, no rate limit
        # Whether the job's own code runs in a worker thread: a lock or rate limit wraps a plain
        # function in an async one, which only waits for the thread.
        self.in_thread = not inspect.iscoroutinefunction(self._direct)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn
        self._parameters = _parameters(self._direct)
        # The shapes of call found good (how many positional arguments, which keywords): a
        # call's validity depends on its shape alone, and a bind per job cost a map a third.
        self._shapes_taken: set[object] = set()

    def __repr__(self) -> str:
        return f"<Task {self.name} on {self.queue.name!r}>"

    def check_call(self, args: Sequence[Any], kwargs: Mapping[str, Any], before: int = 0) -> None:
        """Refuse arguments the function cannot take, at enqueue: in the worker the call would fail
        at every retry. `before`: how many values a workflow puts first (a chord's values, an
        error handler's exception)."""
        shape = len(args) + before if not kwargs else (len(args) + before, *kwargs)
        if shape in self._shapes_taken or self._parameters is None:  # None: the worker's call checks
            return
        try:
            self._parameters.bind(*(None,) * before, *args, **kwargs)
            if len(self._shapes_taken) < SHAPES_KEPT:  # keywords of the caller's making are many
                self._shapes_taken.add(shape)
        except TypeError as exc:
            hint = ""
            misplaced = sorted(set(kwargs) & CALL_OPTION_NAMES - set(self._parameters.parameters))
            if misplaced:
                hint = (f" ({misplaced[0]}= is an option of the call: "
                        f"{self.name}.options({misplaced[0]}=...).enqueue(...))")
            raise ConfigurationError(f"{self.name}(): {exc}{hint}") from None

    def options(
        self,
        *,
        delay: Seconds | None = None,
        eta: datetime | None = None,
        priority: int | None = None,
        expires: When | None = None,
        timeout: Seconds | None = None,
        retries: int | None = None,
        key: str | None = None,
    ) -> TaskCall[P, R]:
        """A configured copy: `.enqueue(...)` takes the task's own arguments, none stolen."""
        if delay is not None and eta is not None:
            raise ConfigurationError("give delay or eta, not both")
        if delay is not None:
            longest("delay", seconds(delay, "delay"), delay)  # an infinite one would never run
        if eta is not None and not isinstance(eta, datetime):  # time.time() + 60 would mean 2083
            raise ConfigurationError(f"eta must be a datetime (delay= takes seconds), got {eta!r}")
        if expires is not None:
            epoch(expires, 0.0, "expires")
        if retries is not None:
            check_count(retries, "retries", minimum=0, maximum=MAX_RETRIES)
        if priority is not None:
            check_priority(priority)
        if timeout is not None and not 0 < timedelta_or_seconds(timeout) < math.inf:  # type: ignore[operator]
            raise ConfigurationError(f"timeout must be > 0 and finite, got {timeout}")
        if key is not None:
            check_name(key, "an idempotency key")
        return TaskCall(self, CallOptions(delay, eta, priority, expires, timeout, retries, key))

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        jobs = await self.queue._enqueue_calls([(self, args, kwargs, NO_OPTIONS)])
        return cast("Job[R]", jobs[0])

    async def schedule(
        self,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        delay: Seconds | None = None,
        eta: datetime | None = None,
    ) -> Job[R]:
        """Enqueue to run after `delay` seconds or at `eta`."""
        call = self.options(delay=delay, eta=eta)
        jobs = await self.queue._enqueue_calls([(self, *call_arguments(args, kwargs), call.call)])
        return cast("Job[R]", jobs[0])

    async def revoke(self, once: bool = False, until: When | None = None) -> None:
        """Revoke every job of this task a worker meets (they end `revoked`): until `restore()`,
        until `until` (seconds, timedelta or datetime), or, with `once`, only the next one."""
        if not isinstance(once, bool):  # the brokers would read 2 or "yes" each its own way
            raise ConfigurationError(f"once must be True or False, got {once!r}")
        deadline = None if until is None else epoch(until, time.time(), "until")
        await self.queue.broker.revoke_task(self.queue.name, self.name, once, deadline)

    async def restore(self) -> bool:
        """Undo `revoke()`. False when the task was not revoked (or its `until` had passed)."""
        return await self.queue.broker.restore_task(self.queue.name, self.name)

    async def is_revoked(self) -> bool:
        """Whether this task is revoked now (a revoke with `until` lapses by itself)."""
        return await self.queue.broker.revoked(self.queue.name, None, self.name, time.time())

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """A signature: this task with these arguments, for a workflow (pipeline, group, chord)."""
        from aqueue._workflows import Signature

        return Signature(self, args, kwargs)

    async def map(self, items: Iterable[Any]) -> ResultGroup[R]:
        """Enqueue one job per item (a tuple of arguments, or a single argument) in bulk."""
        from aqueue._jobs import ResultGroup

        if isinstance(items, str | bytes | bytearray | Mapping):  # a job per character, or per key
            raise ConfigurationError(f"map() takes a list of items (a tuple of arguments or a single "
                                     f"argument each), got {items!r}")
        calls: list[tuple[Task[Any, Any], tuple[Any, ...], dict[str, Any], CallOptions]] = [
            (self, item if isinstance(item, tuple) else (item,), {}, NO_OPTIONS)
            for item in items
        ]
        return ResultGroup(await self.queue._enqueue_calls(calls))


class AsyncTask(Task[P, R]):
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        """Run the function here and now, unchanged: no queue involved (nor its locks)."""
        return cast("Coroutine[Any, Any, R]", self._direct(*args, **kwargs))


class SyncTask(Task[P, R]):
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function here and now, unchanged: no queue involved (nor its locks)."""
        return cast(R, self._direct(*args, **kwargs))


class TaskCall(Generic[P, R]):
    """A task with per-call options, from `task.options(...)`."""

    def __init__(self, task: Task[P, R], call: CallOptions) -> None:
        self.task = task
        self.call = call

    def __repr__(self) -> str:
        given = ", ".join(f"{option.name}={value!r}" for option in fields(self.call)
                          if (value := getattr(self.call, option.name)) is not None)
        return f"<TaskCall {self.task.name}.options({given}) on {self.task.queue.name!r}>"

    async def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        jobs = await self.task.queue._enqueue_calls([(self.task, args, kwargs, self.call)])
        return cast("Job[R]", jobs[0])

    def s(self, *args: P.args, **kwargs: P.kwargs) -> Signature[R]:
        """A signature with these options, for a workflow."""
        from aqueue._workflows import Signature

        return Signature(self.task, args, kwargs, self.call)



def call_overrides(call: CallOptions) -> dict[str, Any]:
    """The per-call options a job carries in its payload for the worker."""
    overrides: dict[str, Any] = {}
    if call.timeout is not None:
        overrides["timeout"] = timedelta_or_seconds(call.timeout)
    if call.retries is not None:
        overrides["retries"] = call.retries
    return overrides


def call_eta(call: CallOptions, now: float) -> float | None:
    """When a job enqueued `now` with these options is due, if later than its enqueue."""
    if call.eta is not None:
        return epoch(call.eta, now, "eta")
    if call.delay is not None:
        return epoch(call.delay, now, "delay")
    return None


def policy_for_call(policy: TaskPolicy, overrides: dict[str, Any]) -> TaskPolicy:
    """The policy a job runs under: the task's, with the call's overrides."""
    if not overrides:
        return policy
    return replace(policy, **{k: v for k, v in overrides.items() if k in ("retries", "timeout")})


def default_name(fn: Callable[..., Any]) -> str:
    """The function's own name (`queue.jobs(task="add")`): the same whichever way its module was
    imported (`app`, `examples.app`, `__main__`). Two tasks of one name on a queue are refused."""
    # The function's own, under a lock or rate limit (whose wrapper is named "guarded" when the
    # function has no name to copy).
    own = unguarded(fn)
    name = getattr(own, "__name__", None)
    if not isinstance(name, str):  # a functools.partial, a callable object
        raise ConfigurationError(f"{own!r} has no __name__ to name its task: give one with name=...")
    if name == "<lambda>":  # every lambda's: the second would be refused as a name taken
        raise ConfigurationError("a lambda has no name of its own to name its task: give one with name=...")
    return name


def call_arguments(args: Iterable[Any], kwargs: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """`schedule`'s arguments, refused where they would be misread: a string would be spread into
    its characters; a key that is no name fails the call in the worker."""
    if isinstance(args, str | bytes | bytearray | Mapping) or not isinstance(args, Iterable):
        raise ConfigurationError(f"schedule() takes the positional arguments as a tuple or list, "
                                 f"got {args!r} (one argument: (x,))")
    if kwargs is None:
        return tuple(args), {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(name, str) for name in kwargs):
        raise ConfigurationError(f"schedule() takes the keyword arguments as a dict of names, "
                                 f"got {kwargs!r}")
    return tuple(args), dict(kwargs)


def check_priority(priority: object) -> None:
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be an int, got {priority!r}")
