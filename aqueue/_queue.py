"""Queue: the entry point. Picks the broker, registers tasks, enqueues, and observes jobs."""

from __future__ import annotations

import inspect
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from aqueue._checks import check_count, check_name
from aqueue._exceptions import ConfigurationError, SerializationError
from aqueue._ids import new_id
from aqueue._jobs import Job, JobInfo, ResultGroup
from aqueue._serialization import encode_call
from aqueue._signals import Handler, Signal, SignalJob, Signals
from aqueue._states import JobState
from aqueue._tasks import (
    AsyncTask,
    CallOptions,
    SyncTask,
    Task,
    TaskPolicy,
    call_eta,
    call_overrides,
    default_name,
    unguarded,
)
from aqueue._time import Seconds, When, epoch, longest, seconds, timedelta_or_seconds
from aqueue.brokers import Broker, NewJob, WorkflowLinks

if TYPE_CHECKING:
    from aqueue._locks import Lock
    from aqueue._periodic import Schedule
    from aqueue._ratelimit import RateLimit
    from aqueue._worker import Worker
    from aqueue._workflows import Batch, Chord, ChordResult, Group, Node, Pipeline, Plan, Signature, Step

P = ParamSpec("P")
R = TypeVar("R")
H = TypeVar("H", bound=Handler)  # a handler keeps its own type

DEFAULT_RESULT_TTL = 86400.0
DEFAULT_VISIBILITY_TIMEOUT = 60.0
DEFAULT_MAX_DELIVERIES = 10
DEFAULT_MAX_PAYLOAD = 1 << 20
MAX_PAYLOAD_LIMIT = 512 << 20

EnqueueCall = tuple[Task[Any, Any], Sequence[Any], dict[str, Any], CallOptions]


def _signal(value: str) -> Signal:
    if callable(value):  # `@queue.on` without its parentheses
        raise ConfigurationError("queue.on takes signals: write @queue.on() for every signal")
    try:
        return Signal(value)
    except ValueError:
        values = ", ".join(s.value for s in Signal)
        raise ConfigurationError(f"unknown signal {value!r}: expected a Signal ({values})") from None


def broker_from_url(url: str) -> Broker:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    # Each broker is imported when a queue first uses it: a worker loads only its own.
    if scheme == "memory":
        if url.split("://", 1)[1]:  # a name or option here would be ignored, without a word
            raise ConfigurationError("a memory:// URL takes nothing after its '//': each such queue has a "
                                     "broker of its own (queues share one with Queue(broker=...))")
        from aqueue.brokers._memory import MemoryBroker

        return MemoryBroker()
    if scheme in ("redis", "rediss", "unix"):
        from aqueue.brokers._redis import RedisBroker

        return RedisBroker(url)
    # The scheme alone is shown, if it is one: else (a typo, "redis:/:pw@host") nothing is, as
    # what the URL holds may be a password.
    scheme = url.split("://", 1)[0]
    got = repr(scheme) if "://" in url and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "no scheme"
    raise ConfigurationError(f"a queue URL starts with redis://, rediss://, unix:// or memory://, got {got}")


class TaskDecorator:
    """What `@queue.task(...)` returns: registers the function it decorates."""

    def __init__(self, queue: Queue, name: str | None, policy: TaskPolicy) -> None:
        self._queue, self._name, self._policy = queue, name, policy

    @overload
    def __call__(  # type: ignore[overload-overlap]  # a coroutine function is matched first
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...
    def __call__(self, fn: Callable[P, Any], /) -> Task[P, Any]:
        return self._queue._register(fn, self._name, self._policy)


class _PeriodicDecorator(TaskDecorator):
    def __init__(self, queue: Queue, schedule: Schedule, inner: TaskDecorator) -> None:
        super().__init__(queue, inner._name, inner._policy)
        self._schedule = schedule

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:  # type: ignore[override]
        if isinstance(fn, Task):
            raise ConfigurationError(f"@queue.periodic decorates a function, not the task {fn.name!r} "
                                     "(one schedule per task: name another task to run it on another)")
        name = self._name or default_name(fn)
        existing, task = self._queue.schedules.get(name), self._queue.tasks.get(name)
        again = task is not None and task.fn is fn and repr(existing) == repr(self._schedule)
        if existing is not None and not again:  # a second would replace the first without a word
            raise ConfigurationError(f"the task {name!r} already runs on "
                                     f"{self._queue.schedules[name]!r}: one schedule per task "
                                     "(register another with name=...)")
        # Each tick calls it with none: one that needs some would fail at every tick, in a worker.
        try:
            inspect.signature(fn).bind()
        except TypeError:
            raise ConfigurationError(f"a periodic task is called with no arguments; "
                                     f"{getattr(fn, '__name__', fn)!r} needs some") from None
        task = self._queue._register(fn, self._name, self._policy)
        self._queue.schedules[task.name] = self._schedule
        return task


class Queue:
    """A named queue on a broker.

    `Queue("redis://...")`, `Queue("memory://")` or `Queue(broker=...)`. It connects on first use;
    `async with queue` or `await queue.close()` releases its connections.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        broker: Broker | None = None,
        name: str = "default",
        result_ttl: Seconds = DEFAULT_RESULT_TTL,
        immediate: bool = False,
        default_timeout: Seconds | None = None,
        visibility_timeout: Seconds = DEFAULT_VISIBILITY_TIMEOUT,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        max_payload_size: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if (url is None) == (broker is None):
            raise ConfigurationError("give a queue URL or a broker (one of them)")
        check_name(name, "a queue's name")
        if "{" in name or "}" in name:
            raise ConfigurationError(f"queue name {name!r} must be without braces")
        check_count(max_deliveries, "max_deliveries")
        check_count(max_payload_size, "max_payload_size")
        if max_payload_size > MAX_PAYLOAD_LIMIT:
            raise ConfigurationError(f"max_payload_size is at most {MAX_PAYLOAD_LIMIT} bytes (512 MiB, "
                                     f"the largest string Redis takes), got {max_payload_size}")
        self.broker: Broker = broker if broker is not None else broker_from_url(str(url))
        self.name = name
        self.result_ttl = seconds(result_ttl, "result_ttl")
        if not 1 <= self.result_ttl < math.inf:
            raise ConfigurationError(f"result_ttl must be at least 1 second, and finite, got {result_ttl!r}")
        longest("result_ttl", self.result_ttl, result_ttl)  # see LONGEST
        if not isinstance(immediate, bool):  # "no" would run every job in the producer
            raise ConfigurationError(f"immediate must be True or False, got {immediate!r}")
        self.immediate = immediate
        self.default_timeout = None if default_timeout is None else seconds(default_timeout, "default_timeout")
        if self.default_timeout is not None and not 0 < self.default_timeout < math.inf:
            raise ConfigurationError(f"default_timeout must be > 0 and finite (None: no timeout), "
                                     f"got {default_timeout!r}")
        self.visibility_timeout = seconds(visibility_timeout, "visibility_timeout")
        if not 1 <= self.visibility_timeout < math.inf:
            raise ConfigurationError(
                f"visibility_timeout must be at least 1 second, and finite, got {visibility_timeout!r}")
        longest("visibility_timeout", self.visibility_timeout, visibility_timeout)
        self.max_deliveries = max_deliveries
        self.max_payload_size = max_payload_size
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        """Periodic task name -> its schedule; the worker's scheduler enqueues each tick once."""
        self.signals = Signals()
        self._connected = False
        self._closes = 0  # a wait riding through an outage ends if the queue is closed meanwhile

    def __repr__(self) -> str:
        return f"<Queue {self.name!r} on {self.broker.url}>"

    # --- connection ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await self.broker.connect()
        self._connected = True

    async def close(self) -> None:
        self._connected = False
        self._closes += 1
        await self.broker.close()

    async def __aenter__(self) -> Queue:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- tasks -----------------------------------------------------------------------------------

    @overload
    def task(  # type: ignore[overload-overlap]  # a coroutine function is matched first
        self, fn: Callable[P, Coroutine[Any, Any, R]], /
    ) -> AsyncTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> SyncTask[P, R]: ...
    @overload
    def task(
        self,
        *,
        retries: int = 0,
        retry_delay: Seconds = 0.0,
        retry_backoff: float = 1.0,
        timeout: Seconds | None = None,
        priority: int = 0,
        expires: When | None = None,
        name: str | None = None,
    ) -> TaskDecorator: ...
    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        retries: int = 0,
        retry_delay: Seconds = 0.0,
        retry_backoff: float = 1.0,
        timeout: Seconds | None = None,
        priority: int = 0,
        expires: When | None = None,
        name: str | None = None,
    ) -> Task[Any, Any] | TaskDecorator:
        """Register a function as a task: `@queue.task` or `@queue.task(retries=3, ...)`."""
        policy = TaskPolicy(
            retries=retries,
            retry_delay=seconds(retry_delay, "retry_delay"),
            retry_backoff=retry_backoff,
            # None takes the queue's default; 0 is refused by TaskPolicy, not read as None.
            timeout=self.default_timeout if timeout is None else timedelta_or_seconds(timeout),
            priority=priority,
            expires=expires,
        )
        decorator = TaskDecorator(self, name, policy)
        return decorator if fn is None else decorator(fn)

    def periodic(
        self,
        schedule: Schedule,
        *,
        retries: int = 0,
        retry_delay: Seconds = 0.0,
        retry_backoff: float = 1.0,
        timeout: Seconds | None = None,
        priority: int = 0,
        name: str | None = None,
    ) -> TaskDecorator:
        """Register a task (taking no arguments) that runs at each tick of `schedule`:
        `@queue.periodic(crontab(minute="*/5"))` or `@queue.periodic(every(seconds=10))`.
        However many workers run, each tick is enqueued once; missed ticks are not replayed."""
        from aqueue._periodic import Schedule

        if not isinstance(schedule, Schedule):
            raise ConfigurationError(f"periodic() takes a crontab(...) or every(...), got {schedule!r}")
        inner = self.task(retries=retries, retry_delay=retry_delay, retry_backoff=retry_backoff,
                          timeout=timeout, priority=priority, name=name)
        return _PeriodicDecorator(self, schedule, inner)

    def _register(self, fn: Callable[P, Any], name: str | None, policy: TaskPolicy) -> Task[P, Any]:
        if not callable(fn):
            raise ConfigurationError(f"@queue.task decorates a function, got {fn!r}")
        if isinstance(fn, Task):  # taken, its jobs would run the task's direct call in a thread
            raise ConfigurationError(f"@queue.task decorates a function, not the task {fn.name!r} "
                                     "(give each queue the plain function)")
        if isinstance(unguarded(fn), type):  # a job's value would be an instance, stored as JSON
            raise ConfigurationError(f"@queue.task decorates a function, not the class "
                                     f"{unguarded(fn).__name__} (decorate a function that uses it)")
        task_name = default_name(fn) if name is None else name  # name="" is refused, not ignored
        check_name(task_name, "a task's name")  # stored as the jobs' task, by which workers find it
        if task_name in self.tasks and self.tasks[task_name].fn is not fn:
            raise ConfigurationError(f"a task named {task_name!r} is already registered")
        if inspect.isgeneratorfunction(unguarded(fn)) or inspect.isasyncgenfunction(unguarded(fn)):
            # Taken, its every job failed in the worker: a generator is no value to store.
            raise ConfigurationError(f"task {task_name!r} is a generator function: a job's value is "
                                     f"stored as JSON, which a generator is not (return a list)")
        # A plain function under a lock or rate limit is a plain task still: its direct call runs
        # it as it is (the guard is for its jobs).
        kind: type[Task[P, Any]] = AsyncTask if inspect.iscoroutinefunction(unguarded(fn)) else SyncTask
        task = kind(self, fn, task_name, policy)
        self.tasks[task_name] = task
        return task

    # --- enqueueing ------------------------------------------------------------------------------

    async def _enqueue_calls(self, calls: Sequence[EnqueueCall]) -> list[Job[Any]]:
        now = time.time()
        try:
            new_jobs = [self._new_job(task, args, kwargs, call, now) for task, args, kwargs, call in calls]
        except (SerializationError, ConfigurationError) as exc:
            if len(calls) > 1:  # a map's: which item, found again here (the fast path keeps no count)
                for index, (task, args, kwargs, call) in enumerate(calls):
                    try:
                        self._new_job(task, args, kwargs, call, now)
                    except (SerializationError, ConfigurationError):
                        raise type(exc)(f"item {index} of {len(calls)}: {exc}") from None
            raise
        if not self._connected:
            await self.connect()
        ids = await self.broker.enqueue(self.name, new_jobs)
        # Job(...), not Job[Any](...): a subscripted class is called through typing, at a cost per job.
        jobs: list[Job[Any]] = [Job(self, job_id) for job_id in ids]
        await self._announce(new_jobs, ids, now)
        if self.immediate:
            from aqueue._worker import run_immediately

            await run_immediately(self, [job.id for new, job in zip(new_jobs, jobs, strict=True)
                                         if not (new.eta and new.eta > now)])
        return jobs

    async def _announce(self, new_jobs: Sequence[NewJob], ids: Sequence[str], now: float) -> None:
        """ENQUEUED, or SCHEDULED for a job with a later eta, for each job the broker stored."""
        if not (self.signals.wants(Signal.ENQUEUED) or self.signals.wants(Signal.SCHEDULED)):
            return
        for new, job_id in zip(new_jobs, ids, strict=True):
            if job_id != new.id:
                continue  # its idempotency key found a live job: nothing was stored
            signal = Signal.SCHEDULED if new.eta and new.eta > now else Signal.ENQUEUED
            await self.signals.send(signal, SignalJob(job_id, new.task))

    def _new_job(
        self,
        task: Task[Any, Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        call: CallOptions,
        now: float,
        *,
        job_id: str | None = None,
        options: dict[str, Any] | None = None,
        links: WorkflowLinks | None = None,
        due: float | None = None,
        before: int | None = 0,
    ) -> NewJob:
        """One job: the task's policy with the call's options; `options` and `links` carry
        its place in a workflow, `due` when the workflow is due (where its expiry counts from)
        for a job that waits for others, `before` how many values the workflow puts before its
        arguments (None: a step fed by the one before, whose value is not known yet)."""
        if before is not None:
            task.check_call(args, kwargs, before)
        payload = encode_call(task.name, args, kwargs, {**call_overrides(call), **(options or {})},
                              self.max_payload_size)
        eta = call_eta(call, now)
        if due is None:
            due = max(now, eta or now)
        expires = call.expires if call.expires is not None else task.policy.expires
        return NewJob(
            id=job_id or new_id(),
            task=task.name,
            payload=payload,
            priority=call.priority if call.priority is not None else task.policy.priority,
            eta=eta,
            expires=None if expires is None else epoch(expires, due, "expires"),
            key=call.key,
            enqueued_at=now,
            links=links,
        )

    # --- workflows -------------------------------------------------------------------------------

    @overload
    async def enqueue(self, workflow: Chord[R]) -> ChordResult[R]: ...
    @overload
    async def enqueue(self, workflow: Signature[R]) -> ResultGroup[R]: ...
    @overload
    async def enqueue(self, workflow: Pipeline | Group) -> ResultGroup[Any]: ...
    async def enqueue(self, workflow: Node) -> ResultGroup[Any] | ChordResult[Any]:
        """Enqueue a signature, pipeline, group or chord, stored in one atomic step (a group of
        single jobs, which nothing links, as `map` stores its jobs: on Redis, 500 to a step).

        A signature or pipeline gives a `ResultGroup` of every step; a group, one of its members'
        values; a chord, a `ChordResult`."""
        from aqueue._workflows import Plan, _Membership

        plan = Plan(self)
        _jobs, handle = plan.add(workflow, _Membership())
        await self._store_plan(plan)
        return handle  # type: ignore[no-any-return]

    async def batch(
        self,
        members: Sequence[Signature[Any] | Pipeline | Chord[Any]],
        *,
        on_success: Step[Any] | None = None,
        on_failure: Step[Any] | None = None,
        on_complete: Step[Any] | None = None,
    ) -> Batch:
        """Enqueue jobs tracked together, with callbacks that each fire once (see `Batch`)."""
        from aqueue._workflows import Plan, _nodes

        nodes = _nodes(members, "batch")
        if not nodes:
            raise ConfigurationError("a batch needs at least one member")
        plan = Plan(self)
        handle = plan.batch(nodes, on_success, on_failure, on_complete)
        await self._store_plan(plan)
        return handle

    async def _store_plan(self, plan: Plan) -> None:
        if not self._connected:
            await self.connect()
        ids = await self.broker.enqueue(self.name, plan.jobs, plan.chords, plan.batches)
        plan.adopt(ids)
        await self._announce(plan.jobs, ids, plan.now)
        if self.immediate:
            from aqueue._worker import run_immediately

            # The stored ids: a key may have found a live job in a planned one's place.
            await run_immediately(self, [stored for job, stored in zip(plan.jobs, ids, strict=True)
                                         if not (job.eta and job.eta > plan.now)], plan.follow_ups())

    # --- observing -------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job[Any]:
        """A handle on a job from its id alone."""
        if not isinstance(job_id, str):
            raise ConfigurationError(f"a job id is a string, got {job_id!r}")
        check_name(job_id, "a job id")
        return Job(self, job_id)

    async def jobs(
        self,
        state: JobState | str | None = None,
        task: str | Task[Any, Any] | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs newest first, filtered by state and task (its name, or the task itself)."""
        check_count(limit, "limit", minimum=0)
        if isinstance(task, Task):
            task = task.name
        elif task is not None and not isinstance(task, str):  # it matched nothing, without a word
            raise ConfigurationError(f"task is a task or its name, got {task!r}")
        if state is not None:
            try:
                state = JobState(state)
            except ValueError:
                names = ", ".join(s.value for s in JobState)
                raise ConfigurationError(f"unknown job state {state!r}: one of {names}") from None
        records = await self.broker.jobs(self.name, state, task, limit)
        return [JobInfo.from_record(r) for r in records]

    async def dead_letters(self, limit: int = 100) -> list[JobInfo]:
        """Jobs that failed for good, newest first, with `dead_reason` saying why."""
        check_count(limit, "limit", minimum=0)
        return [JobInfo.from_record(r) for r in await self.broker.dead_letters(self.name, limit)]

    async def retry(self, job_id: str) -> bool:
        """Run a dead-lettered job again with a fresh attempt count. False if it is not one.
        In immediate mode it runs here, and with it what its end sets going again."""
        check_name(job_id, "a job id")
        if not await self.broker.retry(self.name, job_id, time.time()):
            return False
        if self.immediate:
            from aqueue._worker import run_immediately
            from aqueue._worker._immediate import retry_follow_ups

            runs, may_appear = [job_id], []
            record = await self.broker.get(self.name, job_id)
            while record is not None:
                steps, callback, appear = retry_follow_ups(record)
                runs += steps
                may_appear += appear
                if callback is None or callback in runs:
                    break
                # A chord's callback run again has follow-ups of its own (the steps its failure
                # skipped), and is a member of any chord around its own.
                runs.append(callback)
                record = await self.broker.get(self.name, callback)
            await run_immediately(self, runs, may_appear)
        return True

    async def purge_dead_letters(self) -> int:
        return await self.broker.purge_dead_letters(self.name)

    # --- coordination ----------------------------------------------------------------------------

    def lock(self, name: str, ttl: Seconds = 30.0, timeout: Seconds | None = None) -> Lock:
        """A distributed lock: `async with queue.lock("name"):` or a decorator below `@queue.task`."""
        from aqueue._locks import Lock  # loaded on first use: most workers never take a lock

        return Lock(self, name, ttl=ttl, timeout=timeout)

    def rate_limit(self, key: str, limit: int, per: Seconds, retry: bool = True) -> RateLimit:
        """A rate limit shared by every worker: `async with` or a decorator below `@queue.task`."""
        from aqueue._ratelimit import RateLimit  # loaded on first use, as `lock` is

        return RateLimit(self, key, limit=limit, per=per, retry=retry)

    # --- signals and workers ---------------------------------------------------------------------

    def on(self, *signals: Signal) -> Callable[[H], H]:
        """Register a sync or async handler `(signal, job, exc=None)`; no signals means all."""
        chosen = tuple(_signal(s) for s in signals)

        def register(handler: H) -> H:
            if not callable(handler):
                raise ConfigurationError(f"@queue.on(...) decorates a handler, got {handler!r}")
            try:  # told now, not by a TypeError logged at every signal
                inspect.signature(handler).bind(None, None, None)
            except TypeError:
                raise ConfigurationError(
                    f"a signal handler is called as handler(signal, job, exc): {handler!r} does "
                    "not take those three (exc is None but for errors: give it a default)") from None
            except ValueError:
                pass  # no signature to read (some builtins): called as it is
            self.signals.connect(handler, chosen)
            return handler

        return register

    @asynccontextmanager
    async def worker(
        self,
        concurrency: int = 100,
        *,
        prefetch: int = 0,
        scheduler: bool = True,
        shutdown_timeout: Seconds = 30.0,
    ) -> AsyncIterator[Worker]:
        """Run a worker in the background of the current task; it stops gracefully on exit."""
        from aqueue._worker import Worker

        worker = Worker(self, concurrency=concurrency, prefetch=prefetch, scheduler=scheduler,
                        shutdown_timeout=shutdown_timeout)
        async with worker.running():
            yield worker
