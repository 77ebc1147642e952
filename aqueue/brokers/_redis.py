"""The Redis Streams broker.

Layout (every key built in `_keys.py`, all under the queue's hash tag):
- one stream per priority band, read through one consumer group; a worker leases a job by reading
  its entry (it stays in the group's pending list until acked) and the lease is the entry's idle
  time, renewed while the job runs and taken over (XPENDING IDLE + XCLAIM) once it lapses; entries
  done with are acked and trimmed off per batch. A new job's entry is lean: it carries the task and
  payload, and its first delivery leaves the record untouched (see lean_delivery in _common.lua);
- a hash per job (its record), a sorted set of scheduled jobs, an index for listing, dead letters;
- one Lua script per operation, so every state change is atomic and one round trip; a busy
  worker's read of lean entries is one MULTI instead (`_read_lean`), and an idle worker's blocking
  read is followed on its connection by the script that leases what it read (`_receive_blocking`);
- one pub/sub inbox per process: a job's end publishes its outcome to the inboxes waiting on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from typing import Any, NoReturn
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    to_bool,
)

from aqueue import _outage
from aqueue._exceptions import BrokerConnectionError, BrokerError, ConfigurationError
from aqueue._states import JobState
from aqueue.brokers._base import (
    BatchSpec,
    Broker,
    ChordSpec,
    Completion,
    Delivery,
    JobRecord,
    NewJob,
    Outcome,
    WorkflowLinks,
    rate_window_ms,
)
from aqueue.brokers._keys import GROUP, Keys
from aqueue.brokers._notifier import Notifier
from aqueue.brokers._pool import IDENTITY_OPTIONS, WaitingPool, identity, reopen_if_closed
from aqueue.brokers._scripts import source

logger = logging.getLogger("aqueue")

ENQUEUE_CHUNK = 500  # jobs per enqueue script call: bounds how long one call holds Redis
# Enqueue calls sent in one pipeline. A pipeline's writes wait while Redis runs the calls before
# them, and the connection's socket_timeout (5 s by default) bounds the write: 300,000 jobs in one
# pipeline took longer than that here. 10,000 take well under a second.
ENQUEUE_WINDOW = 20
# Connections held for good: the process's inbox (one pub/sub listener, shared), and per worker
# its blocking read and its cancel listener.
INBOX_CONNECTIONS = 1
WORKER_CONNECTIONS = 2
# Errors that pass (a failover, a server loading its data, out of memory for now, busy with a
# script, too few replicas to write to, a failed save refusing writes): retried like a lost
# connection, a worker's outcomes kept until written. redis-py raises most as classes of their
# own, their code cut from the message; the rest keep the code.
TRANSIENT_ERRORS = (redis_errors.ReadOnlyError, redis_errors.TryAgainError,
                    redis_errors.ClusterDownError, redis_errors.OutOfMemoryError)
TRANSIENT = {"READONLY", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN", "OOM", "NOREPLICAS",
             "MISCONF"}
# Of those, the ones that refuse writes and answer reads: a worker's reads go through meanwhile
# (see BrokerConnectionError.answered). The others refuse every call.
WRITES_REFUSED_ERRORS = (redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError)
WRITES_REFUSED = {"READONLY", "OOM", "NOREPLICAS", "MISCONF"}
# Records that a receive, claim, reclaim or recover ends rather than leases (expired, revoked,
# cancelled, dead) are kept a day: those calls take no result_ttl.
ENDED_HERE_TTL = 86_400
# Ids read per page of a listing, whatever its limit: the call's reply must come within the
# socket_timeout (200,000 records in one took longer than 5 s, a "cannot reach Redis").
LISTING_PAGE = 1_000
# Records read by one call of get_many (a listing's too): at most a page, and none after those whose
# values come to the budget. Each call holds Redis while it copies its reply: 200 records of 1 MB
# took 740 ms, every other client waiting.
RECORDS_PAGE = 200
RECORDS_BUDGET = 1 << 20
# States read by one call of get_states: a few bytes each, but each a lookup that holds Redis.
STATES_PAGE = 1_000
RECHECK = 10.0  # a waiter re-reads the state this often, in case a notification was lost
LAST_READ_WITHIN = 0.5  # how long past its timeout a wait may read the record it returns
# Ended entries that may wait in a stream behind a job still pending, for the trim after it ends
# (see trim_acked in lua/_common.lua): past that, each is deleted as it ends, at a cost to Redis.
# Two workers at concurrency 500 left at most 600 waiting here (measured without read-ahead; a
# worker's `prefetch` leases more at a time, so more can wait behind a long job, and past the bound
# the cost is Redis's time only). The bound also caps what a long job holds back (entries carry
# their payloads).
KEEP_BEHIND = 2_000


def redact(url: str) -> str:
    """The URL without its password (in its user part or a query option named like one), for log
    lines and error messages. No part of a password is shown, whatever the URL looks like: one
    that urlsplit cannot read, or with an "@" past the part it takes for the host (a password
    holding an unencoded "/", "?", "#" or "@" ends that part early), is shown as its scheme alone."""
    scheme, _, rest = url.partition("://")
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" or "]", in a password say
        return f"{scheme}://***"
    if "@" in rest[len(parts.netloc):]:
        return f"{parts.scheme}://***"
    if parts.password is None and not _secret_query(parts.query) and not parts.fragment:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        user = f"{parts.username}:***@" if parts.username else ":***@"
        netloc = user + netloc.rpartition("@")[2]  # as written: `.port` raises on a bad one
    # Joined by hand: urlunsplit writes "unix:/path" for an empty host.
    return f"{parts.scheme}://{netloc}{_shown_rest(parts)}"


def _secret(name: str) -> bool:
    """A query option that holds a password (`password`, `ssl_password`)."""
    return "password" in name.lower()


def _secret_query(query: str) -> bool:
    return any(_secret(name) for name, _ in parse_qsl(query))


def _shown_rest(parts: SplitResult) -> str:
    """The path, query and fragment of a URL as `redact` shows them: past a password in the query,
    a name that is no connection option may be that password's end (after an unencoded "&")."""
    fields, secret = [], False
    for name, value in parse_qsl(parts.query):
        if _secret(name):
            fields.append(f"{name}=***")
            secret = True
        elif secret and name not in KNOWN_OPTIONS:
            fields.append("***")
        else:
            fields.append(urlencode([(name, value)]))
    query = "&".join(fields) if secret else parts.query
    shown = parts.path + (f"?{query}" if query else "")
    return shown + ("#***" if parts.fragment else "")  # only an unencoded "#" makes one


def _misread_password(parts: SplitResult) -> bool:
    """Whether a password holding an unencoded "/", "?" or "#" ends the part urlsplit takes for the
    host before its "@": redis-py would read a part of it as the host, database or query. An "@"
    elsewhere is fine: in a query value, or in a Unix socket's path."""
    if "@" in parts.fragment:
        return True
    if parts.scheme == "unix":
        return bool(parts.netloc) and "@" not in parts.netloc and "@" in parts.path + parts.query
    names = (field.partition("=")[0] for field in parts.query.split("&"))
    return "@" in parts.path or any("@" in name for name in names)


# Query options redis-py passes to the connection as text; those it parses first are in its
# URL_QUERY_ARGUMENT_PARSERS (redis-py 8 parses `protocol`; 7 passes it as text, which its
# connection reads). Any other name fails on the first connection.
TEXT_OPTIONS = {"username", "password", "client_name", "lib_name", "lib_version", "protocol", "ssl_keyfile",
                "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
                "ssl_ciphers", "ssl_password"}
# What redis-py's to_bool reads as false (any other word is true), and as true.
BOOLEAN_WORDS = {"0", "F", "FALSE", "N", "NO", "1", "T", "TRUE", "Y", "YES"}
KNOWN_OPTIONS = {"max_connections", *URL_QUERY_ARGUMENT_PARSERS, *TEXT_OPTIONS}


# Options that name a file the TLS context reads.
PATH_OPTIONS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})


def _a_file(path: str) -> bool:
    """Whether `ssl` can read a file there: a file, or a pipe (not a directory)."""
    return os.path.exists(path) and not os.path.isdir(path)


# Values that parse but that the connection or pool refuse only when it is made, each with what
# they may be.
VALUE_RANGES: dict[str, tuple[Callable[[str], bool], str]] = {
    "protocol": (lambda v: v.strip() in ("2", "3"), "2 or 3"),
    "max_connections": (lambda v: int(v) >= 1, "at least 1"),  # a worker's: see check_for_worker
    # Each of these failed every call (most as if Redis could not be reached).
    "socket_timeout": (lambda v: float(v) > 0, "over 0 seconds"),
    "socket_connect_timeout": (lambda v: float(v) > 0, "over 0 seconds"),
    "socket_read_size": (lambda v: int(v) >= 1, "at least 1"),
    "health_check_interval": (lambda v: int(v) >= 0, "0 or more seconds"),
    "ssl_cert_reqs": (lambda v: v in ("none", "optional", "required"), "none, optional or required"),
    # A missing one failed each connection as if Redis could not be reached ("Error 2 connecting").
    **dict.fromkeys(PATH_OPTIONS, (_a_file, "a file that exists")),
}


@cache
def _query_options(scheme: str) -> frozenset[str]:
    """The query options a URL of this scheme can give: what its connection class takes (the TLS
    ones only with rediss://, keepalive not with unix://), and the pool's `max_connections`."""
    connection = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(scheme, Connection)
    taken = {"max_connections"}
    for cls in connection.__mro__:
        if (init := vars(cls).get("__init__")) is not None:
            taken.update(inspect.signature(init).parameters)
    return frozenset(taken & KNOWN_OPTIONS)


def _check_url(url: str, shown: str) -> None:
    """Refuse a URL that redis-py would misread, or fail on at the first connection (with its own
    errors, which can hold a part of the password); `shown` is the URL redacted."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not its words: they can quote a part of the URL, and so of a password
        raise ConfigurationError(f"{shown}: not a valid URL (an unencoded '[', ']' or a character "
                                 "it may not hold: percent-encode them in a password, '[' and ']' "
                                 "as %5B and %5D)") from None
    if _misread_password(parts) or parts.fragment:
        raise ConfigurationError(
            f"{shown}: percent-encode the password ('@', '#', '?', '/' as %40, %23, %3F, %2F): "
            "as written, a part of it would be read as the host, database or query"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigurationError(f"{shown}: the port must be a number from 0 to 65535") from None
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        # redis-py would quietly use database 0
        raise ConfigurationError(f"{shown}: the database must be a number, got {database!r}")
    if parts.scheme == "unix" and parts.hostname not in (None, "localhost"):
        # redis-py reads the path alone: unix://tmp/r.sock meant /r.sock, unix://r.sock nothing
        raise ConfigurationError(f"{shown}: a unix:// URL takes the socket's absolute path after "
                                 "its '//' (unix:///tmp/redis.sock)")
    options, secret = _query_options(parts.scheme), False
    for field in filter(None, parts.query.split("&")):
        [(name, value)] = parse_qsl(field, keep_blank_values=True)
        secret = secret or _secret(name)
        if "=" not in field:  # redis-py leaves it out: a typo, or a password's end after an '&'
            if secret:
                raise ConfigurationError(f"{shown}: a field after the password has no value "
                                         "(percent-encode '&' in a password as %26)")
            raise ConfigurationError(f"{shown}: the option {name!r} has no value")
        if not value:
            continue  # as redis-py does
        if name not in options:
            if secret and name not in KNOWN_OPTIONS:  # maybe the password's end: not named
                raise ConfigurationError(f"{shown}: an option after the password is not a connection "
                                         "option (percent-encode '&' in a password as %26)")
            raise ConfigurationError(f"{shown}: {name!r} is not a connection option of a "
                                     f"{parts.scheme}:// URL")
        parse = URL_QUERY_ARGUMENT_PARSERS.get(name)
        try:
            if parse is not None:
                parse(value)
            if parse is to_bool and value.upper() not in BOOLEAN_WORDS:
                raise ValueError(value)  # to_bool reads any word but its five false ones as true
        except (TypeError, ValueError):
            shown_value = "***" if _secret(name) else repr(value)
            raise ConfigurationError(f"{shown}: {name}={shown_value} is not a valid value") from None
        if name in VALUE_RANGES and not _in_range(name, value):
            raise ConfigurationError(f"{shown}: {name}={value!r} is not a valid value "
                                     f"({VALUE_RANGES[name][1]})")
        if name == "db" and parts.scheme != "unix" and database and int(value) != int(database):
            # redis-py takes the query's, without a word
            raise ConfigurationError(f"{shown}: two databases, /{database} and ?db={value}")
        before_host = getattr(parts, name) if name in ("username", "password") else None
        if before_host and unquote(before_host) != value:  # an empty one is none, to redis-py
            # redis-py takes the one before the host, without a word
            raise ConfigurationError(f"{shown}: two {name}s, before the host and ?{name}=")


def _in_range(name: str, value: object) -> bool:
    """Whether a connection option's value (from the URL, or given to the broker) can work."""
    if value is None or (name == "ssl_cert_reqs" and not isinstance(value, str)):
        return True  # no timeout; an `ssl.VerifyMode`
    if name in PATH_OPTIONS:
        if value == "" or value == b"":
            return True  # none, to redis-py: the system's CAs
        if isinstance(value, (str, bytes, os.PathLike)):
            value = os.fsdecode(value)  # a path given as bytes, or a pathlib.Path
    try:
        return VALUE_RANGES[name][0](str(value))
    except ValueError:
        return False


# How long a consumer that holds nothing stays in its group with no read delivering to it (a
# worker that died leaves its consumers; one that stops removes its own).
FORGET_CONSUMERS_AFTER = 3600.0


def waiting_name(consumer: str) -> str:
    """The name a consumer's blocking reads are made under: what its group's pending list holds
    under it is only ever what the last read handed over, before the take script moves it to
    the consumer itself."""
    return consumer + "~waiting"


def _shown(raw: bytes) -> str:
    """Text read back from Redis. Another writer may have put bytes there that are no UTF-8: they
    come escaped (a task so named is unknown, and dead-lettered) rather than fail the whole call,
    a worker's receive with it."""
    return raw.decode("utf-8", "backslashreplace")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return _shown(value) if isinstance(value, bytes) else value


def _number(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


def _record(job_id: str, fields: dict[bytes, bytes]) -> JobRecord:
    """A job's record as Redis holds it. One that aqueue did not write (another program's, a
    field set by hand) raises `BrokerError` naming the job, not a bare ValueError from deep
    within a listing."""
    try:
        record = _fields(job_id, fields)
        JobState(record.state)
    except ValueError as exc:  # UnicodeDecodeError too
        raise _not_ours(job_id, exc) from None
    return record


def _state(job_id: str, raw: bytes) -> str:
    """A job's state as Redis holds it, refused as `_record` refuses a record aqueue did not write."""
    try:
        return JobState(raw.decode()).value
    except ValueError as exc:  # UnicodeDecodeError too
        raise _not_ours(job_id, exc) from None


def _not_ours(job_id: str, exc: ValueError) -> BrokerError:
    return BrokerError(f"job {job_id!r}: its record on Redis is not one aqueue wrote ({exc}); "
                       "delete or mend it")


def _fields(job_id: str, fields: dict[bytes, bytes]) -> JobRecord:
    get = fields.get
    return JobRecord(
        id=job_id,
        task=_shown(get(b"task") or b""),
        state=(get(b"state") or b"").decode(),
        payload=get(b"payload") or b"",
        priority=int(get(b"priority") or 0),
        attempt=int(get(b"attempt") or 1),
        enqueued_at=float(get(b"enqueued_at") or 0),
        eta=_number(get(b"eta")),
        expires=_number(get(b"expires")),
        started_at=_number(get(b"started_at")),
        finished_at=_number(get(b"finished_at")),
        worker=_text(get(b"worker")) or None,
        result=get(b"result"),
        error=get(b"error"),
        progress=get(b"progress"),
        key=_text(get(b"key")) or None,
        dead_reason=_text(get(b"dead_reason")),
        failures=int(get(b"failures") or 0),
        asked=int(get(b"asked") or 0),
    )


def _hash(flat: list[bytes]) -> dict[bytes, bytes]:
    """A hash as Lua returns it (field, value, ...); a field given twice keeps its last value."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _outcome_record(job_id: str, message: bytes, told: int) -> JobRecord | None:
    """The outcome a job's end publishes ("id ends\nstate\nattempt\nbody\nreason"), as a
    record holding just what `job.result()` reads; None for "id ends\nstate" (too big to carry),
    for the message of an end told before the wait was registered (`told` of them), and for one
    that does not say which end it is (an earlier aqueue's)."""
    parts = message.split(b"\n", 4)
    try:
        _, said, ends = parts[0].rpartition(b" ")
        if len(parts) != 5 or not said or int(ends) <= told:
            return None
        state, attempt, body, reason = parts[1].decode(), int(parts[2]), parts[3] or None, parts[4]
        dead_reason = reason.decode() or None
    except ValueError:  # UnicodeDecodeError too: not a message of aqueue's (another writer's)
        return None  # the wait reads the job itself
    succeeded = state == "succeeded"
    return JobRecord(id=job_id, task="", state=state, payload=b"", attempt=attempt,
                     result=body if succeeded else None, error=None if succeeded else body,
                     dead_reason=dead_reason)


def _revoked_until(revocation: bytes) -> float | None:
    """Until when a task revocation ("<once 0|1>|<until or empty>") holds: inf with no until;
    None for what aqueue did not write (another writer's), which the scripts drop where met."""
    once, _, until = revocation.partition(b"|")
    if once not in (b"0", b"1"):
        return None
    try:
        moment = float(until) if until else math.inf
    except ValueError:
        return None
    return None if math.isnan(moment) else moment


def _lean(fields: list[bytes]) -> bool:
    """Whether a stream entry is a lean one of aqueue's, by the test `lean_delivery` (in
    _common.lua) makes: anything else read goes to the start script, which reads the record, and
    dead-letters an entry with none (another writer's, its time "nan" or "1e3", say)."""
    if len(fields) != 8 or fields[2] != b"task" or fields[0] != b"id":
        return False
    whole, _, part = fields[7].partition(b".")
    return (whole.isdigit() and (not part or part.isdigit())
            and fields[1].isascii() and fields[3].isascii())


def _delivery(row: list[bytes], consumer: str, now: float) -> Delivery:
    """A delivery as a script returns it, leased to `consumer` at `now`."""
    job_id, task, payload, attempt, token, band, enqueued_at, entry = row[:8]
    return Delivery(
        job_id=_shown(job_id),
        task=_shown(task),
        payload=payload,
        attempt=int(attempt),
        token=int(token),
        priority=int(band),
        enqueued_at=float(enqueued_at),
        receipt=entry.decode(),
        ended=row[8].decode() or None if len(row) > 8 else None,
        consumer=consumer,
        leased_at=now,
        expires=float(row[9]) if len(row) > 9 and row[9] else None,
        asked=int(row[10]) if len(row) > 10 else 0,
    )


def _pairs(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Name/value pairs in one argument: \x1f between name and value, \x1e after each. Neither
    byte occurs raw in a payload (JSON escapes control characters) or an id."""
    return b"".join(name + b"\x1f" + value + b"\x1e" for name, value in pairs)


def _links(links: WorkflowLinks | None) -> bytes:
    if links is None:
        return b""
    fields: list[tuple[bytes, bytes]] = []
    if links.waiting:
        fields.append((b"waiting", b"1"))
    if links.chord is not None:
        fields += [(b"chord", links.chord.encode()), (b"slot", str(links.slot).encode())]
    if links.batch is not None:
        fields.append((b"batch", links.batch.encode()))
    if links.next is not None:
        fields.append((b"next", links.next.encode()))
    if links.on_error is not None:
        t = links.on_error
        fields += [(b"err_task", t.task.encode()), (b"err_payload", t.payload),
                   (b"err_priority", str(t.priority).encode())]
    return _pairs(fields)


def _opt(value: float | str | None) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _plain(job: NewJob) -> bool:
    """Whether enqueue_plain.lua can store the job: no key, eta, expiry or workflow link."""
    return job.eta is None and job.expires is None and job.key is None and job.links is None


def _linked(job: NewJob) -> bool:
    """Whether the job is a pipeline step or callback, or starts one: stored with what it links to."""
    return job.links is not None and (job.links.waiting or job.links.next is not None)


def _enqueue_now(jobs: Sequence[NewJob]) -> str:
    return repr(jobs[0].enqueued_at or time.time()) if jobs else repr(time.time())


def _enqueue_plain_args(jobs: Sequence[NewJob], first: int = 0) -> list[Any]:
    """`first`: how many jobs of the same enqueue were stored by earlier calls (listings keep
    the order of the whole enqueue)."""
    args: list[Any] = [_enqueue_now(jobs), first]
    for job in jobs:
        args += [job.id, job.task, job.payload, job.priority]
    return args


def _enqueue_args(
    jobs: Sequence[NewJob], chords: Sequence[ChordSpec] = (), batches: Sequence[BatchSpec] = (),
    first: int = 0,
) -> list[Any]:
    args: list[Any] = [_enqueue_now(jobs), first]
    args.append(len(chords))
    for c in chords:
        args += [c.id, c.size, c.callback]
    args.append(len(batches))
    for b in batches:
        args += [b.id, b.size]
        for t in (b.on_success, b.on_failure, b.on_complete):
            args += [t.task, t.payload, t.priority] if t else ["", "", ""]
    for job in jobs:
        args += [job.id, job.task, job.payload, job.priority, _opt(job.eta),
                 _opt(job.expires), job.key or "", _links(job.links)]
    return args


# Each enqueue script's arguments for a chunk of jobs.
_ENQUEUE_ARGS: dict[str, Callable[[Sequence[NewJob], int], list[Any]]] = {
    "enqueue": lambda jobs, first: _enqueue_args(jobs, first=first),
    "enqueue_plain": _enqueue_plain_args,
}


class _Reader:
    """A consumer's own connection for blocking reads, with its CLIENT ID: asked once per
    connection (again after a reconnect), so that a stop can CLIENT UNBLOCK the read."""

    def __init__(self, pool: aioredis.ConnectionPool) -> None:
        self.client = aioredis.Redis(connection_pool=pool, single_connection_client=True)
        self._id: int | None = None
        self._watching = False
        self._reading = False
        self._closing = False

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[_Reader]:
        """Held around a read: a close that comes meanwhile leaves the hand-back to its end."""
        self._reading = True
        try:
            yield self
        finally:
            self._reading = False
            if self._closing:
                with anyio.CancelScope(shield=True):  # a cancelled read hands it back too
                    await self.client.aclose(close_connection_pool=False)

    async def close(self) -> None:
        """The connection goes back to the pool. A read in flight on it is cut off first, and
        hands it back as it ends: back now, its next taker would share the socket with the read."""
        if not self._reading:
            await self.client.aclose(close_connection_pool=False)
            return
        self._closing = True
        connection = self.client.connection
        if connection is not None:
            await connection.disconnect(nowait=True)

    def longest_block(self, wanted: float) -> float:
        """How long a read may block on this reader: as long as wanted on aqueue's own connections,
        whose calls allow for the block on top of the socket timeout; on a client the caller made,
        half its socket timeout at most, as redis-py bounds the reply by that alone (a longer
        block would read as a lost connection)."""
        pool = self.client.connection_pool
        socket_timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        if socket_timeout and not isinstance(pool, WaitingPool):
            return min(wanted, socket_timeout / 2)
        return wanted

    async def connection_id(self) -> int:
        connection = self.client.connection
        if connection is not None and connection.is_connected:
            # One Redis closed while it sat idle (a restart, CLIENT KILL, its `timeout`) is opened
            # again here, under its new id: the read would reopen it unasked, and a stop would
            # unblock the old id (after a restart, whoever has it now).
            await reopen_if_closed(connection)
        if self._id is None or connection is None or not connection.is_connected:
            # Asked on the connection the read will use: a reconnect would come with a new id.
            self._id = None
            self._id = int(await self.client.client_id())
            if not self._watching and self.client.connection is not None:
                self.client.connection.register_connect_callback(self._reconnected)  # type: ignore[no-untyped-call]
                self._watching = True
        return self._id

    def _reconnected(self, connection: object) -> None:
        self._id = None

    async def call_many(self, commands: tuple[tuple[Any, ...], ...], blocks: float) -> list[Any]:
        """Commands on the reader's own connection (asked its id first), their replies; the first
        error is raised once all have run. Sent together on the lean path when the pool is
        aqueue's own; one after another, through redis-py, for a client the caller made (its
        pipelines would take another of its connections)."""
        if self._closing:  # its connection was cut off: not opened again for this read
            raise redis_errors.ConnectionError("the reader was closed")
        if isinstance(self.client.connection_pool, WaitingPool):
            connection: Any = self.client.connection
            assert connection is not None, "connection_id() is asked first"
            replies: list[Any] = await connection.call_many(commands, blocks)
            return replies
        results: list[Any] = []
        for command in commands:
            try:
                results.append(await self.client.execute_command(*command))  # type: ignore[no-untyped-call]
            except redis_errors.ResponseError as exc:
                results.append(exc)
        for result in results:
            if isinstance(result, redis_errors.ResponseError):
                raise result
        return results


DECODED = ("RedisBroker needs a client with decode_responses=False (payloads and results are "
           "bytes, read as they are)")


def _check_client(client: object) -> None:
    """A client handed in is refused here, not at its first use, where a sync client failed
    with a bare TypeError (its replies cannot be awaited)."""
    if not isinstance(client, aioredis.Redis):
        raise ConfigurationError(f"RedisBroker(client=...) takes a redis.asyncio.Redis client, got "
                                 f"{type(client).__module__}.{type(client).__qualname__}")
    if client.get_connection_kwargs().get("decode_responses"):  # type: ignore[no-untyped-call]
        raise ConfigurationError(f"RedisBroker(client=...): {DECODED}")


class RedisBroker(Broker):
    """Broker on Redis Streams. Give it a URL (`redis://`, `rediss://`, `unix://`) or a client."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        client: aioredis.Redis | None = None,
        **client_options: Any,
    ) -> None:
        self.url = redact(url) if client is None else "redis://(client)"
        if client is None:
            _check_url(url, self.url)
        else:
            _check_client(client)
        if client_options.get("decode_responses"):
            raise ConfigurationError(f"{self.url}: {DECODED}")
        for name, value in client_options.items():
            if name in VALUE_RANGES and not _in_range(name, value):
                raise ConfigurationError(f"{self.url}: {name}={value!r} is not a valid value "
                                         f"({VALUE_RANGES[name][1]})")
        self._connect_url = url
        self._client_options = client_options
        self._client = client
        self._owns_client = client is None
        # Per script: its SHA1, worked out on first use. Only the hash is kept: the text (about
        # 7 KB each, with its helpers) is made again to load it where Redis does not have it.
        self._shas: dict[str, str] = {}
        self._clock_warned: dict[str, float] = {}  # task -> when its next clock warning may come
        self._keys: dict[str, Keys] = {}
        # Per queue: the priority bands last seen, highest first, for blocking reads.
        self._bands: dict[str, list[str]] = {}
        # Per consumer: its own connection for blocking reads, and that connection's CLIENT ID
        # while a read is blocked on it, so `interrupt_receive` can CLIENT UNBLOCK it.
        self._readers: dict[str, _Reader] = {}
        self._blocked: dict[str, int] = {}
        # Consumers whose last receive found fewer jobs than it asked for: their next receive
        # goes straight to the blocking read, which returns at once if jobs arrived meanwhile.
        self._drained: set[str] = set()
        self._learned: set[tuple[str, str]] = set()  # consumers that read the bands (see receive)
        # Per (queue, consumer): entries a blocking read handed over whose start script has not
        # answered (an error between the two). They sit in the consumer's pending list, leased
        # to nobody: its next receive starts them, rather than leave them to the reclaim.
        self._unstarted: dict[tuple[str, str], list[Any]] = {}
        self._notifier: Notifier | None = None
        # This process's inbox: the jobs it waits on publish their outcomes there.
        self._inbox = uuid.uuid4().hex[:16]
        # The event loop its connections belong to (asyncio streams cannot move to another).
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def _data_home(self) -> object:
        # The URL it connects to (kept in memory only), or the client it was handed.
        return ("url", self._connect_url) if self._owns_client else ("client", id(self._client))

    async def connect(self) -> None:
        self._check_loop()
        self._loop = asyncio.get_running_loop()
        if self._client is None:
            # Callers wait for a free connection rather than fail: a worker's jobs, its fetcher and
            # the producers of a web process share this pool. Waiting for results takes no
            # connection each: they share one pub/sub connection.
            # The timeouts are redis-py 8's defaults, given here so that redis-py 7 (whose default
            # is none) bounds each call and each connect too; the URL or the options win.
            options: dict[str, Any] = {"health_check_interval": 30, "max_connections": 200,
                                       "socket_timeout": 5.0, "socket_connect_timeout": 5.0}
            if urlsplit(self._connect_url).scheme != "unix":  # urlsplit lowercases it
                options["socket_keepalive"] = True  # notice a dead peer on an idle TCP connection
            if not any(name in self._client_options for name in IDENTITY_OPTIONS):
                options.update(identity())
            pool = WaitingPool.from_url(self._connect_url, **{**options, **self._client_options})
            self._client = aioredis.Redis.from_pool(pool)
        if self._notifier is None:
            self._notifier = Notifier(self._client)
        async with self._translated():
            await self._client.ping()

    async def close(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            # Its connections belong to a loop that has ended (or runs elsewhere): they cannot be
            # closed from here, only let go, so that the broker connects afresh in this loop.
            self._notifier, self._readers, self._loop = None, {}, None
            if self._owns_client:
                self._client = None
            return
        # Let go of all of it before the first await: a call made while the close runs connects
        # afresh (a client, pub/sub and readers of its own) rather than take up what is closing,
        # which left every later wait on a closed pool.
        notifier, readers, client = self._notifier, self._readers, self._client
        self._loop, self._notifier, self._readers = None, None, {}
        if self._owns_client:
            self._client = None
        if notifier is not None:
            await notifier.close()
        for reader in readers.values():
            await reader.close()
        if client is not None and self._owns_client:
            # The pool is closed for good, so that a connection still being made for a call the
            # close cut off ends closed too (redis-py 7's `aclose` only disconnects the pool).
            await client.aclose(close_connection_pool=False)
            await client.connection_pool.aclose()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("RedisBroker is not connected: call `await broker.connect()` first")
        return self._client

    async def _ready(self) -> None:
        """A queue connects on first use, and again after `close()` (a client the caller gave is
        kept by the close, but its pub/sub, readers and loop are not)."""
        if self._client is None or self._loop is None:
            await self.connect()
        elif self._loop is not asyncio.get_running_loop():
            self._check_loop()

    def _check_open(self, notifier: Notifier, waiting: str) -> None:
        """A wait that outlives `close()` ends: going on would open the broker again behind it."""
        if self._notifier is not notifier:
            raise BrokerError(f"RedisBroker {self.url} was closed while {waiting}")

    @contextmanager
    def _closed_said(self, notifier: Notifier, waiting: str) -> Iterator[None]:
        """An error that comes of `close()` taking the connections from under a wait's call in
        flight (a connection closed, the client gone) is said as the close it is."""
        try:
            yield
        except Exception:
            self._check_open(notifier, waiting)  # its error chained to what the close caused
            raise

    def _check_loop(self) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            raise BrokerError(
                f"RedisBroker {self.url} is connected in another event loop: close it before that "
                "loop ends (`await queue.close()`, or `async with queue:`) and it connects again in "
                "the next one"
            )

    def _raise_translated(self, exc: Exception) -> NoReturn:
        """Raise the aqueue error for a Redis error; the URL in it never has a password."""
        if isinstance(exc, redis_errors.AuthenticationError):
            # Still the connection class (as to redis-py): a worker running when the password
            # changes keeps its outcomes and waits, as for Redis being away; the message says why.
            raise BrokerConnectionError(f"Redis at {self.url} refused the credentials: {exc}") from None
        if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)):
            hint = ""
            if self.url.startswith("rediss://") and "Timeout connecting" in str(exc):
                # A server without TLS on that port waits for a request that a TLS handshake
                # never sends: all the client sees is a timeout.
                hint = " (the URL is rediss://: does that port speak TLS?)"
            raise BrokerConnectionError(f"cannot reach Redis at {self.url}: {exc}{hint}") from None
        code = str(exc).split(" ", 1)[0]  # kept in the messages of the errors redis-py has no class for
        if isinstance(exc, TRANSIENT_ERRORS) or code in TRANSIENT:
            refused = BrokerConnectionError(f"Redis at {self.url} is unavailable: {exc}")
            refused.answered = isinstance(exc, WRITES_REFUSED_ERRORS) or code in WRITES_REFUSED
            raise refused from None
        raise BrokerError(f"Redis at {self.url} failed: {exc}") from exc

    @asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        """Redis errors become aqueue errors here, once."""
        try:
            yield
        except BrokerError:
            raise  # translated already, by an inner call
        except (redis_errors.RedisError, OSError) as exc:
            self._raise_translated(exc)

    def _sha(self, name: str) -> str:
        sha = self._shas.get(name)
        if sha is None:
            sha = self._shas[name] = hashlib.sha1(source(name).encode()).hexdigest()
        return sha

    async def _run(self, queue: str, name: str, args: Sequence[Any]) -> Any:
        await self._ready()
        prefix = self._key(queue).prefix
        sha = self._sha(name)
        pool = self.client.connection_pool
        try:
            try:
                if isinstance(pool, WaitingPool):  # the hot path: see `WaitingPool.call`
                    return await pool.call("EVALSHA", sha, 1, prefix, *args)
                return await self.client.evalsha(sha, 1, prefix, *args)
            except redis_errors.NoScriptError:
                # Not loaded (a restarted server, a flushed script cache): load it, run it.
                await self.client.script_load(source(name))
                return await self.client.evalsha(sha, 1, prefix, *args)
        except (redis_errors.RedisError, OSError) as exc:
            self._raise_translated(exc)

    def check_for_worker(self) -> None:
        # Workers hold connections for good (see INBOX_CONNECTIONS): with none left for calls,
        # their jobs, results and locks waited for ever, without a word.
        limit = self.client.connection_pool.max_connections
        workers = self._workers + 1
        held = INBOX_CONNECTIONS + WORKER_CONNECTIONS * workers
        if limit < held + 1:
            who = "a worker, which holds" if workers == 1 else f"{workers} workers, which hold"
            raise ConfigurationError(
                f"{self.url}: max_connections={limit} is too few for {who} {held} for good: "
                f"give it at least {held + 1}")

    def _key(self, queue: str) -> Keys:
        keys = self._keys.get(queue)
        if keys is None:
            keys = self._keys[queue] = Keys(queue)
        return keys

    # --- producing -------------------------------------------------------------------------------

    async def enqueue(
        self,
        queue: str,
        jobs: Sequence[NewJob],
        chords: Sequence[ChordSpec] = (),
        batches: Sequence[BatchSpec] = (),
    ) -> list[str]:
        await self._ready()
        # Most jobs are plain: a script of their own takes them with less of Redis's time, and
        # says nothing back, as each lives under its own id.
        plain = all(map(_plain, jobs))
        if chords or batches or (not plain and any(map(_linked, jobs))):
            # A workflow is stored whole, in one step: in chunks, a pipeline step stored in one
            # could end before the step it starts is stored by the next, which would then wait
            # for ever.
            ids = await self._run(queue, "enqueue", _enqueue_args(jobs, chords, batches))
            return [i.decode() for i in ids]
        script = "enqueue_plain" if plain else "enqueue"
        chunks = [jobs[i : i + ENQUEUE_CHUNK] for i in range(0, len(jobs), ENQUEUE_CHUNK)]
        replies: list[Any] = []
        if len(chunks) == 1:
            replies.append(await self._run(queue, script, _ENQUEUE_ARGS[script](chunks[0], 0)))
        else:
            async with self._translated():
                for w in range(0, len(chunks), ENQUEUE_WINDOW):
                    window = chunks[w : w + ENQUEUE_WINDOW]
                    try:
                        replies += await self._enqueue_pipelined(queue, script, window, w)
                    except redis_errors.NoScriptError:
                        # Redis lost the script: load it, send again (the ids make that idempotent).
                        await self.client.script_load(source(script))
                        replies += await self._enqueue_pipelined(queue, script, window, w)
        if plain:
            return [job.id for job in jobs]
        return [i.decode() for reply in replies for i in reply]

    async def _enqueue_pipelined(
        self, queue: str, script: str, chunks: Sequence[Sequence[NewJob]], first_chunk: int
    ) -> list[Any]:
        """One call of an enqueue script per chunk, in one pipeline; their replies. `first_chunk`:
        the first chunk's place in the whole enqueue."""
        first = first_chunk * ENQUEUE_CHUNK
        prefix, sha, make_args = self._key(queue).prefix, self._sha(script), _ENQUEUE_ARGS[script]
        async with self.client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.evalsha(sha, 1, prefix, *make_args(chunk, first))
                first += len(chunk)
            replies: list[Any] = await pipe.execute()
        return replies

    # --- consuming -------------------------------------------------------------------------------

    async def receive(
        self, queue: str, consumer: str, count: int, timeout: float, max_deliveries: int
    ) -> list[Delivery]:
        ttl = ENDED_HERE_TTL
        unstarted = self._unstarted.get((queue, consumer))
        if unstarted:
            found, _ = await self._start(queue, consumer, unstarted, count, max_deliveries, ttl)
            if found:
                return found
        bands = self._bands.get(queue)
        if not (timeout > 0 and bands and consumer in self._drained):
            read = None
            # Lean only once this consumer has learned the bands itself: what another consumer
            # (a worker stopped since) learned may be old, and a band added meanwhile waited
            # behind band 0's jobs, up to the new worker's concurrency of them.
            if bands == ["0"] and (queue, consumer) in self._learned:
                read = await self._read_lean(queue, consumer, count, max_deliveries, ttl)
            if read is not None:
                found, bands = read, self._bands[queue]
            else:
                now = time.time()
                try:
                    reply = await self._run(queue, "receive", [consumer, count, repr(now), max_deliveries, ttl])
                except BrokerError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # A stream that lost its group while it stayed: the script makes a group
                    # only with a stream. Given back; and raised as a call whose answer was lost,
                    # since what the script leased from the bands it read before it failed stays
                    # leased (a worker then takes that in: `recover`).
                    await self._run(queue, "regroup", [])
                    raise BrokerConnectionError(
                        f"Redis at {self.url}: a stream of queue {queue!r} had lost its consumer "
                        "group (an XGROUP DESTROY?); it is given back") from None
                self._bands[queue] = bands = [b.decode() for b in reply[0]]
                self._learned.add((queue, consumer))
                found = [_delivery(row, consumer, now) for row in reply[1:]]
            if found or timeout <= 0:
                self._note_drained(consumer, len(found) < count)
                return found
        found, new_band = await self._receive_blocking(
            queue, consumer, bands, count, timeout, max_deliveries, ttl
        )
        # Nothing found (a timeout) or a new band announced: the next receive runs the script,
        # which also learns the bands anew.
        self._note_drained(consumer, 0 < len(found) < count and not new_band)
        return found

    async def _read_lean(
        self, queue: str, consumer: str, count: int, max_deliveries: int, ttl: int
    ) -> list[Delivery] | None:
        """Lease up to `count` jobs of band 0, the only band known, without a script when it can:
        one MULTI reads the band, looks for task revocations and lists the bands. Lean entries,
        with no task revoked, are jobs to run as they are (see lean_delivery in _common.lua);
        anything else read is leased by the start script. A band found new is learned for the
        next receive, which then runs the receive script (like a blocking read that meets the
        new band's announcement, this read leases what it took from band 0). None: the script
        path must run instead (a client the caller made, or a stream lost with the server's
        data, which the script recreates)."""
        pool = self.client.connection_pool
        if not isinstance(pool, WaitingPool):
            return None
        keys = self._key(queue)
        now = time.time()
        try:
            *_, (revoked, bands, entries) = await pool.call_many(
                ("MULTI",),
                ("EXISTS", keys.revoked_tasks),
                ("ZREVRANGE", keys.priorities, 0, -1),
                ("XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "STREAMS", keys.stream(0), ">"),
                ("EXEC",),
            )
        except (redis_errors.RedisError, OSError) as exc:
            self._raise_translated(exc)
        if isinstance(entries, redis_errors.ResponseError):
            if "NOGROUP" in str(entries):
                return None
            self._raise_translated(entries)
        if bands != [b"0"]:
            self._bands[queue] = [b.decode() for b in bands]
        if not entries:
            return []
        # RESP3 (redis-py 8's default, not 7's) replies with a map of streams, RESP2 with a list of pairs.
        [rows] = entries.values() if isinstance(entries, dict) else [rows for _, rows in entries]
        if bands != [b"0"]:
            # A band above 0 came meanwhile: its jobs go first. What this read took from band 0
            # is handed over as a blocking read's is, past `count` handed back in its place.
            return await self._take_read(queue, consumer, [entry_id for entry_id, _ in rows], count,
                                         max_deliveries, ttl)
        if not revoked and all(_lean(fields) for _, fields in rows):
            return [
                Delivery(job_id=fields[1].decode(), task=fields[3].decode(), payload=fields[5],
                         attempt=1, token=1, priority=0, enqueued_at=float(fields[7]),
                         receipt=entry_id.decode(), consumer=consumer, leased_at=now)
                for entry_id, fields in rows
            ]
        # `start` reads the records, and dead-letters an entry that has none.
        found, known = await self._start(
            queue, consumer, [x for entry_id, _ in rows for x in (0, entry_id)], count,
            max_deliveries, ttl,
        )
        self._bands[queue] = known  # a wake-up in band 0 announces a new band
        return found

    def _note_drained(self, consumer: str, drained: bool) -> None:
        if drained:
            self._drained.add(consumer)
        else:
            self._drained.discard(consumer)

    async def _receive_blocking(
        self, queue: str, consumer: str, bands: list[str], count: int, timeout: float,
        max_deliveries: int, ttl: int,
    ) -> tuple[list[Delivery], bool]:
        """Block on every band's stream until an entry arrives, and lease what was read in the
        same round trip: the take script follows the read on its connection and runs as the read
        returns. The read is made under the consumer's waiting name, so the script finds what it
        read, and only that (see take.lua). Also says whether the queue has bands this read did
        not block on."""
        keys = self._key(queue)
        streams = [keys.stream(b) for b in bands]
        waiting = waiting_name(consumer)
        reader = self._readers.get(consumer)
        if reader is None:
            reader = self._readers[consumer] = _Reader(self.client.connection_pool)
        timeout = reader.longest_block(timeout)
        read = ("XREADGROUP", "GROUP", GROUP, waiting, "COUNT", count,
                "BLOCK", max(1, int(timeout * 1000)), "STREAMS", *streams, *[">"] * len(streams))
        take = ("EVALSHA", self._sha("take"), 1, keys.prefix, consumer, waiting, count)
        async with self._translated():
            try:
                async with reader.reading():
                    self._blocked[consumer] = await reader.connection_id()
                    reply: Any = (await reader.call_many((read, take), timeout))[1]
            except redis_errors.NoScriptError:
                # Redis lost the script: what was read waits under the waiting name meanwhile.
                reply = await self._run(queue, "take", [consumer, waiting, count])
            except redis_errors.ResponseError as exc:
                # The group or its stream went while the read blocked (UNBLOCKED: the stream was
                # deleted), or before: the server lost its data (a restart), or the group was
                # destroyed. The receive script makes them again (see `receive`).
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                return [], False
            finally:
                self._blocked.pop(consumer, None)
        found, known = await self._taken(queue, consumer, reply, count, max_deliveries, ttl)
        new_band = known != bands
        if new_band:  # a band this consumer did not block on: learn it, run the script next
            self._bands[queue] = known
        return found, new_band

    async def _take_read(
        self, queue: str, consumer: str, entry_ids: list[Any], count: int, max_deliveries: int,
        ttl: int,
    ) -> list[Delivery]:
        """Lease what a read without a script took from band 0 as take.lua leases a blocking
        read's: moved to the waiting name first, where the script looks for it."""
        async with self._translated():
            await self.client.xclaim(self._key(queue).stream(0), GROUP, waiting_name(consumer), 0,
                                     entry_ids, justid=True)  # its delivery count stays
        reply = await self._run(queue, "take", [consumer, waiting_name(consumer), count])
        found, self._bands[queue] = await self._taken(queue, consumer, reply, count, max_deliveries, ttl)
        return found

    async def _taken(
        self, queue: str, consumer: str, reply: Any, count: int, max_deliveries: int, ttl: int
    ) -> tuple[list[Delivery], list[str]]:
        """The deliveries take.lua's reply holds, and the bands it knows."""
        now = time.time()
        found = [_delivery(row, consumer, now) for row in reply[2:]]
        known = [b.decode() for b in reply[0]]
        if reply[1]:  # taken, but for the start script to lease (not lean, or a task is revoked)
            started, known = await self._start(
                queue, consumer, list(reply[1]), count - len(found), max_deliveries, ttl
            )
            found += started
        return found, known

    async def _start(
        self, queue: str, consumer: str, pairs: list[Any], count: int, max_deliveries: int, ttl: int
    ) -> tuple[list[Delivery], list[str]]:
        """Lease the entries (band, entry id pairs) a blocking read handed to `consumer`; also
        returns the bands the script knows. Until it answers, the entries are kept as unstarted:
        a second try checks that each is still the consumer's (not reclaimed meanwhile)."""
        key = (queue, consumer)
        retry = key in self._unstarted
        self._unstarted[key] = pairs
        now = time.time()
        reply = await self._run(
            queue, "start", [consumer, repr(now), max_deliveries, ttl, count, int(retry), *pairs]
        )
        del self._unstarted[key]
        return [_delivery(row, consumer, now) for row in reply[1:]], [b.decode() for b in reply[0]]

    async def claim(
        self, queue: str, consumer: str, job_id: str, max_deliveries: int
    ) -> Delivery | None:
        now = time.time()
        row = await self._run(queue, "claim", [job_id, consumer, repr(now), max_deliveries, ENDED_HERE_TTL])
        return _delivery(row, consumer, now) if row else None

    async def forget_consumer(self, queue: str, consumer: str) -> None:
        self._drained.discard(consumer)
        self._learned.discard((queue, consumer))
        self._unstarted.pop((queue, consumer), None)  # pending still: the reclaim takes them
        reader = self._readers.pop(consumer, None)
        if reader is not None:
            await reader.close()
        await self._run(queue, "forget", [consumer, waiting_name(consumer)])

    async def prune(self, queue: str, now: float, limit: int) -> int:
        idle_ms = int(FORGET_CONSUMERS_AFTER * 1000)
        return int(await self._run(queue, "prune", [repr(now), limit, idle_ms]))

    async def interrupt_receive(self, queue: str, consumer: str) -> bool:
        client_id = self._blocked.get(consumer)
        if client_id is None or self._client is None:
            return False
        async with self._translated():
            # The blocked read returns as if it timed out: no entry is claimed and then lost.
            return bool(await self.client.client_unblock(client_id))

    async def reclaim(
        self, queue: str, consumer: str, count: int, idle: float, max_deliveries: int
    ) -> list[Delivery]:
        now = time.time()
        reply = await self._run(
            queue, "reclaim", [consumer, count, repr(now), max_deliveries, ENDED_HERE_TTL, int(idle * 1000)]
        )
        return [_delivery(row, consumer, now) for row in reply]

    async def recover(
        self, queue: str, consumer: str, held: Sequence[Delivery], max_deliveries: int
    ) -> list[Delivery]:
        now = time.time()
        reply = await self._run(queue, "recover", [
            consumer, waiting_name(consumer), repr(now), max_deliveries, ENDED_HERE_TTL,
            *(x for d in held for x in (d.priority, d.receipt, d.token)),
        ])
        # Entries whose start was to be tried again (see `_start`) were leased by this script too.
        self._unstarted.pop((queue, consumer), None)
        return [_delivery(row, consumer, now) for row in reply]

    async def renew(self, queue: str, consumer: str, deliveries: Sequence[Delivery]) -> list[str]:
        if not deliveries:
            return []
        args: list[Any] = [consumer, repr(time.time())]
        for d in deliveries:
            args += [d.priority, d.receipt, d.job_id]
        lost = await self._run(queue, "renew", args)
        return [i.decode() for i in lost]

    async def finish(
        self, queue: str, completions: Sequence[Completion], result_ttl: float
    ) -> list[bool]:
        if not completions:
            return []
        # Records ended here expire at one time for the whole batch, in whole seconds (see
        # finish.lua): the latest end, so that none is pruned from the listing before it expires.
        expire_at = math.ceil(max(c.finished_at for c in completions) + result_ttl)
        args: list[Any] = [result_ttl, expire_at, KEEP_BEHIND]
        for c in completions:
            d = c.delivery
            args += [d.job_id, d.token, d.priority, d.receipt]
            # Written where the start was not (a lean delivery) or is another's (a late success).
            args += [repr(d.leased_at), d.consumer]
            if c.outcome is Outcome.SUCCEEDED and not c.error and c.retry_at is None and not c.reason:
                args += ["ok", c.result or b""]
            else:
                outcome = "asked" if c.asked and c.outcome is Outcome.RETRY else c.outcome.value
                args += [outcome, c.result or b"", c.error or b"", _opt(c.retry_at), c.reason or ""]
            args += [repr(c.finished_at), len(c.activate)]
            for job_id, payload in c.activate:
                args += [job_id, payload]
        applied = await self._run(queue, "finish", args)
        return [bool(a) for a in applied]

    async def release(
        self, queue: str, deliveries: Sequence[Delivery], *, unstarted: bool = False
    ) -> None:
        if not deliveries:
            return
        args: list[Any] = []
        for d in deliveries:
            keeps_expiry = "1" if unstarted and d.expires is not None else "0"
            args += [d.job_id, d.token, d.priority, d.receipt, keeps_expiry]
        await self._run(queue, "release", args)

    async def promote_due(self, queue: str, now: float, limit: int) -> float | None:
        nxt = await self._run(queue, "promote", [repr(now), limit])
        return float(nxt) if nxt else None

    # --- observing -------------------------------------------------------------------------------

    async def get(self, queue: str, job_id: str) -> JobRecord | None:
        return (await self._records(queue, [job_id]))[0]

    async def get_many(self, queue: str, job_ids: Sequence[str]) -> list[JobRecord | None]:
        found: list[JobRecord | None] = []
        while len(found) < len(job_ids):
            page = job_ids[len(found):len(found) + RECORDS_PAGE]
            found += await self._records(queue, page, RECORDS_BUDGET)
        return found

    async def get_states(self, queue: str, job_ids: Sequence[str]) -> list[str | None]:
        found: list[str | None] = []
        for start in range(0, len(job_ids), STATES_PAGE):
            page = list(job_ids[start:start + STATES_PAGE])
            rows = await self._run(queue, "states", page)
            found += [None if row is None else _state(job_id, row)
                      for job_id, row in zip(page, rows, strict=True)]
        return found

    async def _records(self, queue: str, ids: Sequence[str], budget: int = 0) -> list[JobRecord | None]:
        """The jobs' records as they stand (None: no record): of all the ids, or with a `budget`
        of bytes, of the first ones only (see records.lua)."""
        rows = await self._run(queue, "records", [repr(time.time()), budget, *ids])
        return [_record(job_id, _hash(row)) if row else None
                for job_id, row in zip(ids[:len(rows)], rows, strict=True)]

    def _check_room_to_listen(self, waiting: str) -> None:
        # The inbox holds a connection for good: with no other, the wait's own reads waited for
        # ever for one (a result without a timeout, or a lock, hung without a word).
        limit = self.client.connection_pool.max_connections
        if limit < INBOX_CONNECTIONS + 1:
            raise ConfigurationError(
                f"{self.url}: max_connections={limit} is too few for {waiting}: the inbox it "
                f"listens on holds {INBOX_CONNECTIONS} for good; give it at least "
                f"{INBOX_CONNECTIONS + 1}")

    async def wait(self, queue: str, job_id: str, timeout: float | None) -> JobRecord | None:
        waiting = f"waiting on job {job_id}"
        out_of_reach = _outage.OutOfReach()  # the wait rides through Redis being out of reach
        with anyio.move_on_after(timeout):  # None: no deadline
            try:
                # A queue connects on first use: that connect is the wait's too, within its timeout.
                await self._ready()
            except BrokerConnectionError:
                out_of_reach.failed()  # tried again below, as a call that failed is
                await out_of_reach.pause()
            notifier = self._notifier  # made by the connect, whether Redis answered it or not
            if notifier is None:  # gone: `close()` came during the pause
                raise BrokerError(f"RedisBroker {self.url} was closed while {waiting}")
            inbox = self._key(queue).done_channel(self._inbox)
            self._check_room_to_listen(waiting)
            with self._closed_said(notifier, waiting):
                while True:
                    self._check_open(notifier, waiting)
                    try:
                        async with self._translated(), notifier.listen(inbox, job_id, keep=True) as heard:
                            # The inbox is subscribed (confirmed) before the job is watched, so its
                            # outcome, published when it ends after the watch, is heard.
                            while not heard.lost:
                                self._check_open(notifier, waiting)  # else the call would connect again
                                reply = await self._run(queue, "watch", [job_id, self._inbox])
                                out_of_reach.reached()
                                if reply is None:
                                    return None
                                if isinstance(reply, list):  # final already: its whole record
                                    return _record(job_id, _hash(reply))
                                with anyio.move_on_after(RECHECK):
                                    message = await heard.wait()
                                    # None: read the job again (watch), as at a recheck.
                                    outcome = _outcome_record(job_id, message, reply) if message else None
                                    if outcome is not None:
                                        return outcome
                        # The connection was lost (`heard.lost`): told, not raised, to every wait but
                        # the one whose call failed. Each pauses as that one does, or all of them
                        # would try again at once, and again, with no pause, while Redis is away.
                        lost: BrokerConnectionError | None = None
                    except BrokerConnectionError as exc:
                        # The job goes on without us: a wait that failed here would fail every request
                        # waiting in a web app for a restart of Redis that takes a second.
                        lost = exc
                    self._check_open(notifier, waiting)  # closed: said as the close it is
                    if timeout is None and out_of_reach.for_too_long():
                        raise lost or BrokerConnectionError(
                            f"cannot reach Redis at {self.url}: the connection was lost, and has not "
                            f"been made again for {_outage.RIDE_THROUGH}s")
                    await out_of_reach.pause()
        # The timeout passed: the record as it stands, if Redis answers at once (a read takes well
        # under a millisecond; a paused or lost Redis would hold the caller for its socket_timeout).
        with anyio.move_on_after(LAST_READ_WITHIN):
            return await self.get(queue, job_id)
        raise TimeoutError(f"job {job_id}: no reply from Redis at {self.url} as the timeout passed")

    async def jobs(
        self, queue: str, state: str | None, task: str | None, limit: int
    ) -> list[JobRecord]:
        await self._ready()
        keys = self._key(queue)
        found: list[JobRecord] = []
        # Paged by score (enqueue time), not position: jobs enqueued or pruned while the pages are
        # read would move the ones not yet read across a page's edge, listed twice or never. Each
        # page starts at the last one's lowest score, the jobs of it already listed skipped.
        seen: set[bytes] = set()
        top, page = "+inf", min(max(limit, 100), LISTING_PAGE)
        async with self._translated():
            while len(found) < limit:
                rows: Any = await self.client.zrevrangebyscore(
                    keys.index, top, "-inf", start=0, num=page, withscores=True)
                ids = [raw for raw, _ in rows if raw not in seen]
                if not ids:
                    if len(rows) < page:
                        break
                    # A whole page at one score, all listed (no aqueue call stores that many at
                    # one microsecond): on below it.
                    top = f"({rows[-1][1]!r}"
                    continue
                seen.update(ids)
                top = repr(rows[-1][1])
                records = await self.get_many(queue, [_shown(raw) for raw in ids])
                gone = [raw for raw, record in zip(ids, records, strict=True) if record is None]
                if gone:  # records that expired: forget them in the index as well
                    await self.client.zrem(keys.index, *gone)
                for record in records:
                    if record is None:
                        continue
                    if (state is None or record.state == state) and (
                        task is None or record.task == task
                    ):
                        found.append(record)
                if len(rows) < page:
                    break
        return found[:limit]

    async def set_progress(self, queue: str, job_id: str, token: int, progress: bytes) -> bool:
        return bool(await self._run(queue, "progress", [job_id, token, progress]))

    # --- dead letters ----------------------------------------------------------------------------

    async def dead_letters(self, queue: str, limit: int) -> list[JobRecord]:
        await self._ready()
        keys = self._key(queue)
        if limit <= 0:
            return []
        async with self._translated():
            ids: Any = await self.client.zrevrange(keys.dead, 0, limit - 1)
            job_prefix = keys.job("").encode()
            rows: list[Any] = []
            for start in range(0, len(ids), LISTING_PAGE):
                async with self.client.pipeline(transaction=False) as pipe:
                    for raw in ids[start:start + LISTING_PAGE]:
                        pipe.hgetall(job_prefix + raw)  # an id as stored: one aqueue did not write
                    rows += await pipe.execute()        # may be no UTF-8 (shown escaped, below)
        return [_record(_shown(raw), f) for raw, f in zip(ids, rows, strict=True) if f]

    async def retry(self, queue: str, job_id: str, now: float) -> bool:
        return bool(await self._run(queue, "retry", [job_id, repr(now)]))

    async def purge_dead_letters(self, queue: str) -> int:
        return int(await self._run(queue, "purge", []))

    # --- control ---------------------------------------------------------------------------------

    async def cancel(self, queue: str, job_id: str, now: float, result_ttl: float) -> str | None:
        verdict = await self._run(queue, "cancel", [job_id, repr(now), result_ttl])
        return verdict.decode() if verdict else None

    async def listen_cancel(
        self, queue: str, on_request: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        await self._ready()
        async with self._translated():
            pubsub = self.client.pubsub()
            # redis-py 7 bounds a blocking pub/sub read by the socket timeout (8 does not): a read
            # that long fails as a lost connection, and requests published while it listened
            # again were left to the fallback check. Each read waits less; a quiet one reads on.
            socket_timeout = self.client.connection_pool.connection_kwargs.get("socket_timeout")
            quiet = min(1.0, socket_timeout / 2) if socket_timeout else 1.0
            try:
                await pubsub.subscribe(self._key(queue).prefix + "cancel")
                while True:
                    message = await pubsub.get_message(timeout=quiet)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        # Escaped, not refused: bytes another writer sent must not end the listening.
                        on_request(_shown(message["data"]))
                    elif message["type"] == "subscribe":
                        # Redis's answer to SUBSCRIBE (also after redis-py reconnects): only from
                        # here is a request published elsewhere sure to arrive.
                        on_listening()
            finally:
                with anyio.CancelScope(shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2

    async def cancel_requested(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        requested = await self._run(queue, "cancel_requested", list(job_ids))
        return [job_id.decode() for job_id in requested]

    async def revoke(self, queue: str, job_id: str, revoked: bool) -> bool:
        return bool(await self._run(queue, "revoke", [job_id, "1" if revoked else "0"]))

    async def revoke_task(self, queue: str, task: str, once: bool, until: float | None) -> None:
        await self._ready()
        async with self._translated():
            await self.client.hset(self._key(queue).revoked_tasks, task,
                                   f"{int(once)}|{_opt(until)}")

    async def restore_task(self, queue: str, task: str) -> bool:
        await self._ready()
        key = self._key(queue).revoked_tasks
        async with self._translated():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hget(key, task)
                pipe.hdel(key, task)
                revocation, _ = await pipe.execute()
        until = None if revocation is None else _revoked_until(revocation)
        return until is not None and until > time.time()

    async def revoked(self, queue: str, job_id: str | None, task: str, now: float) -> bool:
        await self._ready()
        keys = self._key(queue)
        async with self._translated():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(keys.revoked_tasks, task)
                if job_id is not None:
                    pipe.hget(keys.job(job_id), "revoked")
                replies = await pipe.execute()
        if len(replies) > 1 and replies[1] == b"1":
            return True
        until = None if replies[0] is None else _revoked_until(replies[0])
        return until is not None and until > now

    async def enqueue_tick(self, queue: str, tick: float, job: NewJob) -> bool | None:
        args = [repr(job.enqueued_at or time.time()), job.id, job.task, job.payload, job.priority,
                _opt(job.eta), _opt(job.expires), job.key or ""]
        enqueued = await self._run(queue, "tick", [args[0], repr(tick), *args[1:]])
        if enqueued == -1:  # this host's clock is far ahead of Redis's (see tick.lua)
            self._warn_of_clock(job.task, "periodic %s: not enqueued, its tick (%s) is over 5 minutes "
                                "ahead of Redis's clock: this host's clock is wrong", repr(tick))
            return False
        if enqueued == -2:
            self._warn_of_clock(job.task, "periodic %s: its tick (%s) is over 1 s ahead of Redis's "
                                "clock, and waits for it: this host's clock runs ahead", repr(tick))
            return None
        return bool(enqueued)

    def _warn_of_clock(self, task: str, message: str, tick: str) -> None:
        """Once a minute per task: a scheduler asks again and again while its clock is off."""
        now = time.monotonic()
        if now >= self._clock_warned.get(task, 0.0):
            self._clock_warned[task] = now + 60
            logger.warning(message, task, tick)

    async def lock_acquire(self, queue: str, name: str, token: str, ttl: float) -> bool:
        await self._ready()
        async with self._translated():
            return bool(await self.client.set(
                self._key(queue).lock(name), token, nx=True, px=max(1, int(ttl * 1000))
            ))

    async def lock_extend(self, queue: str, name: str, token: str, ttl: float) -> bool:
        return bool(await self._run(queue, "lock_extend", [name, token, max(1, int(ttl * 1000))]))

    async def lock_release(self, queue: str, name: str, token: str) -> bool:
        return bool(await self._run(queue, "lock_release", [name, token]))

    async def lock_wait(self, queue: str, name: str, timeout: float | None) -> None:
        await self._ready()
        notifier = self._notifier
        assert notifier is not None
        key = self._key(queue).lock(name)
        waiting = f"waiting for lock {name!r}"
        self._check_room_to_listen(waiting)
        with self._closed_said(notifier, waiting):
            async with self._translated(), notifier.listen(key) as released:
                self._check_open(notifier, waiting)  # else the read would connect again
                pttl = await self.client.pttl(key)  # after subscribing: a release between is heard
                if pttl == -2:
                    return  # free
                # 0 is the key's last millisecond; -1 no ttl at all (set by hand).
                wait = max(pttl, 1) / 1000 if pttl >= 0 else RECHECK
                if timeout is not None:
                    wait = min(wait, timeout)
                with anyio.move_on_after(wait):
                    await released.wait()
        self._check_open(notifier, waiting)

    async def rate_limit_hit(self, queue: str, key: str, limit: int, per: float) -> float:
        wait_ms = await self._run(queue, "rate_limit", [key, limit, rate_window_ms(per)])
        return int(wait_ms) / 1000
