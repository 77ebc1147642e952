"""Workflows: signatures, pipelines, groups, chords and batches, compiled into jobs linked so that
the broker carries them forward atomically (see `WorkflowLinks`).

    add.s(1, 2).then(add, 3)                    a pipeline: each value feeds the next step
    group([add.s(1, 1), add.s(2, 2)])           jobs side by side
    chord([fetch.s(u) for u in urls], merge.s())   members side by side, then a callback
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, overload

from aqueue._exceptions import ConfigurationError
from aqueue._ids import new_id
from aqueue._jobs import Job, ResultGroup, states_of
from aqueue._serialization import ERROR_MARK, encode_call, loads
from aqueue._states import JobState
from aqueue._tasks import NO_OPTIONS, CallOptions, Task, TaskCall, call_eta, call_overrides
from aqueue._time import Seconds
from aqueue.brokers import (
    BatchSpec,
    ChordSpec,
    NewJob,
    Template,
    WorkflowLinks,
    batch_callback_id,
    error_handler_id,
)

if TYPE_CHECKING:
    from aqueue._queue import Queue

R = TypeVar("R")
T = TypeVar("T")


class Signature(Generic[R]):
    """A task with its arguments, to run later as part of a workflow: `task.s(*args, **kwargs)`."""

    def __init__(
        self,
        task: Task[Any, R],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        call: CallOptions | None = None,
        on_error: Signature[Any] | None = None,
    ) -> None:
        self.task, self.args, self.kwargs = task, tuple(args), dict(kwargs or {})
        self.call = call or NO_OPTIONS
        self.on_error = on_error

    def __repr__(self) -> str:
        given = [*map(repr, self.args), *(f"{name}={value!r}" for name, value in self.kwargs.items())]
        return f"{self.task.name}.s({', '.join(given)})"

    def then(self, task: Step[Any], /, *args: Any, **kwargs: Any) -> Pipeline:
        """Run `task` with this step's value: a tuple extends its *args, a dict updates its
        **kwargs, None passes nothing, anything else comes first in *args."""
        return Pipeline([self]).then(task, *args, **kwargs)

    def error(self, handler: Step[Any], /, *args: Any, **kwargs: Any) -> Signature[R]:
        """Run `handler(exc, *args, **kwargs)` if this step fails for good."""
        return Signature(self.task, self.args, self.kwargs, self.call, signature(handler, args, kwargs))


class Pipeline:
    """Steps run one after another, each fed the previous step's value."""

    def __init__(self, steps: Sequence[Step[Any]]) -> None:
        if isinstance(steps, (Signature, Task, TaskCall)):
            raise ConfigurationError("a pipeline takes a list of steps: wrap the one step in a list")
        self.steps = [signature(step, (), {}) for step in steps]
        if not self.steps:
            raise ConfigurationError("a pipeline needs at least one step")

    def __repr__(self) -> str:
        return " -> ".join(map(repr, self.steps))

    def then(self, task: Step[Any], /, *args: Any, **kwargs: Any) -> Pipeline:
        return Pipeline([*self.steps, signature(task, args, kwargs)])

    def error(self, handler: Step[Any], /, *args: Any, **kwargs: Any) -> Pipeline:
        """Run `handler(exc, ...)` if any step fails for good; the steps after it are skipped. A
        step with a handler of its own keeps it."""
        return Pipeline([step if step.on_error is not None else step.error(handler, *args, **kwargs)
                         for step in self.steps])


class Group:
    """Members run side by side; `queue.enqueue(group)` gives their values in member order."""

    def __init__(self, members: Iterable[Node]) -> None:
        self.members = _nodes(members, "group")

    def error(self, handler: Step[Any], /, *args: Any, **kwargs: Any) -> Group:
        """Run `handler(exc, ...)` for each member that fails for good (a member signature with a
        handler of its own keeps it)."""
        return Group([m if isinstance(m, Signature) and m.on_error is not None
                      else m.error(handler, *args, **kwargs) for m in self.members])

    def then(self, task: Step[T], /, *args: Any, **kwargs: Any) -> Chord[T]:
        """As in Huey, a group fed into a task is a chord: `task(values, ...)` once all have ended."""
        return Chord(self.members, signature(task, args, kwargs))


class Chord(Generic[R]):
    """Members side by side, then `callback(values, ...)` once every member has ended. A member
    that fails for good puts its error (a `TaskError`) in its place: a chord always completes."""

    def __init__(self, members: Iterable[Node], callback: Step[R] | Pipeline) -> None:
        self.members = _nodes(members, "chord")
        self.callback = callback if isinstance(callback, Pipeline) else Pipeline([signature(callback, (), {})])

    def then(self, task: Step[Any], /, *args: Any, **kwargs: Any) -> Chord[R]:
        """Attaches to the callback: it feeds `task` (`get()` still gives the callback's value)."""
        return Chord[R](self.members, self.callback.then(task, *args, **kwargs))

    def error(self, handler: Step[Any], /, *args: Any, **kwargs: Any) -> Chord[R]:
        """Attaches to the callback, as in Huey: if it fails for good, `handler(exc, ...)` runs and
        the steps `then()` added after it are skipped (a failure of theirs runs a handler of
        their own). A callback with a handler of its own keeps it."""
        first, *rest = self.callback.steps
        if first.on_error is None:
            first = first.error(handler, *args, **kwargs)
        return Chord[R](self.members, Pipeline([first, *rest]))


Node: TypeAlias = Signature[Any] | Pipeline | Group | Chord[Any]
# What takes a step's place: a task (or its `options()` copy) with arguments given beside it, or a
# signature.
Step: TypeAlias = Task[Any, T] | TaskCall[Any, T] | Signature[T]


def _nodes(members: Iterable[Node], what: str) -> list[Node]:
    """The members of a group, chord or batch, each checked."""
    if isinstance(members, (Signature, Pipeline, Group, Chord, Task, TaskCall)):
        raise ConfigurationError(f"a {what} takes a list of members: wrap the one member in a list")
    nodes = list(members)
    for m in nodes:
        if isinstance(m, Group):
            # A member stands for one value (its last job's): a group has several.
            raise ConfigurationError(f"a {what} member is a signature, a pipeline or a chord, not a "
                                     f"group: list the group's members in the {what} itself")
        if not isinstance(m, (Signature, Pipeline, Chord)):
            raise ConfigurationError(f"a {what} member is a signature (task.s(...)), a pipeline or a "
                                     f"chord, not {m!r}")
    return nodes


def group(members: Iterable[Node]) -> Group:
    return Group(members)


@overload
def chord(members: Iterable[Node], callback: Step[R]) -> Chord[R]: ...
@overload
def chord(members: Iterable[Node], callback: Pipeline) -> Chord[Any]: ...
def chord(members: Iterable[Node], callback: Step[R] | Pipeline) -> Chord[Any]:
    return Chord(members, callback)


def _refuse_a_delay(step: Signature[Any]) -> None:
    if step.call.delay is not None or step.call.eta is not None:
        raise ConfigurationError(
            f"{step.task.name}: a pipeline step after the first, or a chord callback, starts when the "
            "job before it ends; delay and eta do not apply to it")


def _key_stands_alone(key: str) -> str:
    return (f"key={key!r}: an idempotency key is for a job that stands alone (not a pipeline step, "
            "chord member or callback, batch member, nor one with .error()): the live job it may "
            "return is not linked to the workflow")


def signature(task: Step[Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Signature[Any]:
    if isinstance(task, Signature):
        if args or kwargs:
            raise ConfigurationError("give arguments to the task or to its signature, not both")
        return task
    if isinstance(task, Task):
        return Signature(task, args, kwargs)
    if isinstance(task, TaskCall):
        return Signature(task.task, args, kwargs, task.call)
    raise ConfigurationError(f"expected a task or a signature (or a task's options()), got {task!r}")


# --- results -----------------------------------------------------------------------------------


class ChordResult(Generic[R]):
    """A chord's handles: `results` (its members), `callback` (the callback job),
    `pipeline_results` (the callback and the steps `then()` added after it)."""

    def __init__(self, results: ResultGroup[Any], pipeline_results: ResultGroup[Any]) -> None:
        self.results = results
        self.pipeline_results = pipeline_results
        self.callback: Job[Any] = pipeline_results[0]

    def __repr__(self) -> str:
        return f"<ChordResult of {len(self.results)} member(s), callback {self.callback.id}>"

    @property
    def id(self) -> str:
        return self.callback.id

    async def get(self, timeout: Seconds | None = None) -> R:
        """The callback's value, as in Huey; the steps `then()` added after it give theirs in
        `pipeline_results`."""
        result: R = await self.callback.result(timeout)
        return result


async def _failed_steps(queue: Queue, job_id: str, seen: set[str]) -> list[str]:
    """The dead letters whose success would end a batch member well, for the member `job_id`:
    itself if it failed; for a pipeline member skipped after an earlier step failed, that step (a
    skipped step carries its error); and for a chord's callback that failed with its members'
    errors among its values, those members' own, found the same way (their success runs the
    callback again), or the callback itself if no member can be retried."""
    if job_id in seen:
        return []
    seen.add(job_id)
    record = await queue.broker.get(queue.name, job_id)
    if record is None:
        return []
    if record.state == JobState.CANCELLED and record.error:
        failed = _named(loads(record.error))
        return await _failed_steps(queue, failed, seen) if failed not in (None, job_id) else []
    if record.state != JobState.FAILED:
        return []
    members: list[str] = []
    for member in _errors_named(record.payload):
        members += await _failed_steps(queue, member, seen)
    return members or [job_id]


def _named(error: Any) -> str | None:
    """The job an error's metadata names (`job_id`), if it is one of aqueue's."""
    job_id = error.get("job_id") if isinstance(error, dict) else None
    return job_id if isinstance(job_id, str) else None


def _errors_named(payload: bytes) -> list[str]:
    """The jobs whose errors a chord's callback was given among its values (none for any other
    job, or a payload that cannot be read)."""
    try:
        call = loads(payload)
    except ValueError:
        return []
    options = call.get("options") if isinstance(call, dict) else None
    args = call.get("args") if isinstance(call, dict) else None
    if not (isinstance(options, dict) and options.get("wf_in") and isinstance(args, list) and args
            and isinstance(args[0], list)):
        return []
    markers = [value.get(ERROR_MARK) for value in args[0]
               if isinstance(value, dict) and len(value) == 1]
    return [job_id for job_id in map(_named, markers) if job_id is not None]


@dataclass(frozen=True, slots=True)
class BatchState:
    size: int
    succeeded: int
    failed: int
    cancelled: int
    unfinished: int
    revoked: int = 0
    expired: int = 0

    @property
    def finished(self) -> bool:
        return self.unfinished == 0


class Batch:
    """Jobs tracked together, with callbacks: `on_complete` once every member has ended,
    `on_success` once all succeeded (also after failed members are retried into success),
    `on_failure` once all have ended and one did not succeed (it failed, or ended cancelled,
    revoked or expired). Each fires once."""

    def __init__(self, queue: Queue, batch_id: str, members: ResultGroup[Any]) -> None:
        self.queue, self.id, self.members = queue, batch_id, members

    def __repr__(self) -> str:
        return f"<Batch {self.id} of {len(self.members)} member(s) on {self.queue.name!r}>"

    def callback(self, kind: str) -> Job[Any]:
        """The job an `on_<kind>` callback runs as (it exists once fired)."""
        return self.queue.job(batch_callback_id(self.id, kind))

    async def state(self) -> BatchState:
        states = await states_of(self.members.jobs)
        count = states.count
        # No record (None): it ended, and its record expired (`result_ttl`); only an ended job's
        # record expires. It is counted in none of the ends.
        unfinished = sum(1 for s in states if s is not None and not s.is_final)
        return BatchState(len(states), count(JobState.SUCCEEDED), count(JobState.FAILED),
                          count(JobState.CANCELLED), unfinished, count(JobState.REVOKED),
                          count(JobState.EXPIRED))

    async def retry_failed(self) -> int:
        """Run the failed members again (from the dead letters); for a pipeline member skipped
        after an earlier step failed, that step, whose success runs the rest; for a chord member
        whose callback failed with its members' errors among its values, those members, whose
        success runs the callback again. Returns how many jobs were run again."""
        retried = 0
        # Only a member that ended failed or cancelled can have a failed step: the others, most of
        # a batch as a rule, are passed over from one read of them all.
        for job, state in zip(self.members, await states_of(self.members.jobs), strict=True):
            if state not in (JobState.FAILED, JobState.CANCELLED):
                continue
            for failed in await _failed_steps(self.queue, job.id, set()):
                if await self.queue.retry(failed):
                    retried += 1
        return retried


# --- compiling a workflow into linked jobs ------------------------------------------------------

# Each step's payload nests the steps after it (what the worker needs to start the next one), two
# levels of JSON per step: orjson refuses past 254 levels, and a step's own arguments need some.
MAX_PIPELINE_STEPS = 100


@dataclass
class _Membership:
    waiting: bool = False
    chord: str | None = None
    slot: int | None = None
    callback: str | None = None
    """The callback of the chord this job is a member of (immediate mode runs it again after a
    retry of the member: see `retry_follow_ups`)."""
    batch: str | None = None
    """The batch that counts this job's end."""
    within: str | None = None
    """The batch a chord's members belong to through their chord: named to them, not counted."""

    @property
    def batch_id(self) -> str | None:
        """The batch that `current_job().batch_id` names."""
        return self.batch or self.within


@dataclass
class Plan:
    queue: Queue
    now: float = field(default_factory=time.time)
    jobs: list[NewJob] = field(default_factory=list)
    chords: list[ChordSpec] = field(default_factory=list)
    batches: list[BatchSpec] = field(default_factory=list)
    keyed: dict[str, Job[Any]] = field(default_factory=dict)
    """The handles of jobs with an idempotency key, by the id they were planned with."""

    def add(self, node: Node, member: _Membership) -> tuple[list[Job[Any]], Any]:
        """Compile `node`; returns its jobs in order (its last is the one whose value it ends
        with) and the handle `queue.enqueue` gives for it."""
        if isinstance(node, Signature):
            node = Pipeline([node])
        if isinstance(node, Pipeline):
            jobs = self._pipeline(node.steps, member)
            return jobs, ResultGroup(jobs)
        if isinstance(node, Group):
            if member.chord is not None or member.waiting or member.batch is not None:
                raise ConfigurationError("a group cannot be a chord member, a batch member or a pipeline step")
            ends = [self.add(m, replace(member))[0][-1] for m in node.members]
            return ends, ResultGroup(ends)
        if isinstance(node, Chord) and not node.members:
            # Nothing to wait for (a fan-out over an empty list): the callback is ready at once,
            # with no values, as a pipeline of the callback and its steps.
            first, *rest = node.callback.steps
            _refuse_a_delay(first)
            if first.call.key is not None:  # as a chord with members refuses it: the same code may build both
                raise ConfigurationError(_key_stands_alone(first.call.key))
            fed = Signature(first.task, ([], *first.args), first.kwargs, first.call, first.on_error)
            jobs = self._pipeline([fed, *rest], member)
            return jobs, ChordResult(ResultGroup([]), ResultGroup(jobs))
        if isinstance(node, Chord):
            chord_id = new_id()
            # The callback waits; it carries the chord's own membership onward (nesting).
            callback_jobs = self._pipeline(node.callback.steps, replace(member, waiting=True),
                                           chord_input=True, due=self._due(node))
            self.chords.append(ChordSpec(chord_id, len(node.members), callback_jobs[0].id))
            ends = [self.add(m, _Membership(chord=chord_id, slot=i, callback=callback_jobs[0].id,
                                            within=member.batch_id))[0][-1]
                    for i, m in enumerate(node.members)]
            return callback_jobs, ChordResult(ResultGroup(ends), ResultGroup(callback_jobs))
        raise ConfigurationError(f"cannot enqueue {node!r}: expected a signature, pipeline, group or chord")

    def _due(self, node: Node) -> float:
        """When `node`'s last job may become ready at the earliest: when its first step is due,
        or for a chord, the latest of its members'."""
        if isinstance(node, (Group, Chord)):
            return max((self._due(m) for m in node.members), default=self.now)
        first = node if isinstance(node, Signature) else node.steps[0]
        return max(self.now, call_eta(first.call, self.now) or self.now)

    def follow_ups(self) -> list[str]:
        """The ids of the jobs the broker may create as this plan's jobs end: error handlers and
        batch callbacks (immediate mode runs them too)."""
        handlers = [error_handler_id(job.id) for job in self.jobs if job.links and job.links.on_error]
        callbacks = [batch_callback_id(b.id, kind) for b in self.batches for kind in b.callbacks()]
        return handlers + callbacks

    def _pipeline(self, steps: list[Signature[Any]], member: _Membership,
                  chord_input: bool = False, due: float | None = None) -> list[Job[Any]]:
        """The steps' jobs. A later step's expiry counts from when the pipeline is due (its first
        step's delay or eta), a chord callback's from `due`: not from when it became ready."""
        if len(steps) > MAX_PIPELINE_STEPS:
            raise ConfigurationError(
                f"a pipeline of {len(steps)} steps: at most {MAX_PIPELINE_STEPS} (each step carries the "
                "ones after it; a longer chain can be split, its last step enqueuing the rest)")
        ids = [new_id() for _ in steps]
        if not member.waiting:
            due = self._due(steps[0])
        following: dict[str, Any] | None = None  # the next step, as the worker needs it
        new_jobs: list[NewJob] = []
        for index in reversed(range(len(steps))):
            step, last = steps[index], index == len(steps) - 1
            if member.waiting or index > 0:
                _refuse_a_delay(step)
            options = self._options(member, following, chord_input=chord_input and index == 0, last=last)
            links = WorkflowLinks(
                waiting=member.waiting or index > 0,
                chord=member.chord if last else None,
                slot=member.slot if last else None,
                batch=member.batch if last else None,
                next=ids[index + 1] if not last else None,
                on_error=self._template(step.on_error, member.batch_id, wf_in=True) if step.on_error else None,
            )
            self._check_queue(step)
            # Only a first step's arguments are all known now: a later one's start with a value.
            before = None if index > 0 else 1 if chord_input else None if member.waiting else 0
            job = self.queue._new_job(step.task, step.args, step.kwargs, step.call, self.now,
                                      job_id=ids[index], options=options, links=links, due=due,
                                      before=before)
            new_jobs.append(job)
            # What the worker running the step before needs to start this one with its value.
            following = {"id": ids[index], "args": list(step.args), "kwargs": step.kwargs,
                         "options": {**call_overrides(step.call), **options}}
        self.jobs.extend(reversed(new_jobs))
        handles: list[Job[Any]] = [Job(self.queue, job_id) for job_id in ids]
        keys = [step.call.key for step in steps if step.call.key is not None]
        if keys:
            # A key may hand back a live job in this one's place: nothing may wait on it.
            if len(steps) > 1 or member.waiting or member.chord or member.batch or steps[0].on_error:
                raise ConfigurationError(_key_stands_alone(keys[0]))
            self.keyed[ids[0]] = handles[0]
        return handles

    def adopt(self, stored: Sequence[str]) -> None:
        """Point each keyed handle at the job the broker stored or found live for it (`stored`:
        the ids `Broker.enqueue` returned, in the order of `jobs`)."""
        for new, job_id in zip(self.jobs, stored, strict=True):
            if job_id != new.id and new.id in self.keyed:
                self.keyed[new.id].id = job_id

    @staticmethod
    def _options(
        member: _Membership, following: dict[str, Any] | None, chord_input: bool, last: bool
    ) -> dict[str, Any]:
        """What the worker needs beyond the call's own options: the next step, how to read its
        first argument, its batch; and the callback of the chord whose member the step ends."""
        options: dict[str, Any] = {}
        if following is not None:
            options["next"] = following
        if last and member.callback is not None:
            options["chord_callback"] = member.callback
        if chord_input:
            options["wf_in"] = True  # its first argument holds member values and errors
        if member.batch_id is not None:
            options["batch_id"] = member.batch_id
        return options

    def _check_queue(self, sig: Signature[Any]) -> None:
        """A workflow's jobs all go to the queue it is enqueued on: a task of another queue would
        wait there for a worker that does not know it (and end in the dead letters)."""
        if sig.task.queue.name != self.queue.name:
            raise ConfigurationError(
                f"{sig.task.name} is a task of queue {sig.task.queue.name!r}: a workflow enqueued on "
                f"queue {self.queue.name!r} runs its jobs there (enqueue it on its own queue)")

    def _template(self, sig: Signature[Any], batch: str | None, *, wf_in: bool) -> Template:
        """A job the broker creates when the workflow says (an error handler, a batch callback),
        with its signature's priority, timeout and retries."""
        self._check_queue(sig)
        sig.task.check_call(sig.args, sig.kwargs, 1 if wf_in else 0)  # an error handler's first: the error
        call = sig.call
        if call.delay is not None or call.eta is not None or call.expires is not None or call.key is not None:
            raise ConfigurationError(
                f"{sig.task.name}: an error handler or batch callback runs when its workflow says; "
                "delay, eta, expires and key do not apply to it")
        if sig.on_error is not None:
            raise ConfigurationError(
                f"{sig.task.name}: an error handler or batch callback cannot have an .error() of its own")
        options: dict[str, Any] = call_overrides(call)
        if wf_in:
            options["wf_in"] = True  # its first argument is an error
        if batch is not None:
            options["batch_id"] = batch
        payload = encode_call(sig.task.name, sig.args, sig.kwargs, options, self.queue.max_payload_size)
        priority = call.priority if call.priority is not None else sig.task.policy.priority
        return Template(sig.task.name, payload, priority)

    def batch(self, members: Sequence[Node], on_success: Step[Any] | None, on_failure: Step[Any] | None,
              on_complete: Step[Any] | None) -> Batch:
        batch_id = new_id()
        ends = [self.add(m, _Membership(batch=batch_id))[0][-1] for m in members]

        def template(sig: Step[Any] | None) -> Template | None:
            return None if sig is None else self._template(signature(sig, (), {}), batch_id, wf_in=False)

        self.batches.append(BatchSpec(batch_id, len(ends), template(on_success), template(on_failure),
                                      template(on_complete)))
        return Batch(self.queue, batch_id, ResultGroup(ends))
