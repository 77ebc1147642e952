"""redis-py's connection pool with a bound that makes callers wait, and a lean call for scripts.

Past `max_connections`, redis-py's plain pool raises; its `BlockingConnectionPool` waits, but pays a
condition and a timer on every command, about a tenth of a one-by-one enqueue. Here a semaphore
bounds the connections: taking a free one costs next to nothing, and a caller past the bound waits.

`call` sends one command and reads its reply on a pooled connection (`call_many`: several, in one
write). redis-py's `execute_command` wraps each command in a retry loop, timeout contexts,
observability hooks and a health check; on a one-by-one enqueue those cost about 40 µs of the
client's CPU, a third of a round trip. The connections made here write the packed command and
read the reply directly, with redis-py's own parser (and hiredis's packer when installed). What
the wrappers are for is kept: the connection's `socket_timeout` bounds the call, an error mid-call
drops the connection (its next use reconnects), one that Redis closed while it sat in the pool is
opened again before it is used, and a reply that is an error is raised.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None = None
try:
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # pragma: no cover - hiredis is an optional extra
    pass


logger = logging.getLogger("aqueue")

IDENTITY_OPTIONS = ("driver_info", "lib_name", "lib_version")


@cache
def identity() -> dict[str, Any]:
    """Connection options that name aqueue in each connection's CLIENT SETINFO, as
    "redis-py(aqueue_v<version>)" in CLIENT LIST. They also spare a look-up: left to itself, redis-py
    reads its own version from the installed packages' metadata for every new connection, about a
    millisecond of file reads that block the event loop. (`DriverInfo` came in redis-py 7.2.)"""
    from redis.driver_info import DriverInfo

    from aqueue import __version__

    info = DriverInfo(lib_version=redis.__version__).add_upstream_driver("aqueue", __version__)
    return {"driver_info": info}


class _LeanCalls:
    """Mixed into the pool's connection class (plain, TLS or Unix socket alike)."""

    async def call(self, args: tuple[Any, ...]) -> Any:
        return (await self.call_many((args,)))[0]

    async def call_many(self, commands: tuple[tuple[Any, ...], ...], blocks: float = 0.0) -> list[Any]:
        """The commands' replies; the first that is an error is raised, once all are read. The
        socket timeout bounds the wait for them beyond the `blocks` seconds that a blocking command
        among them may wait in Redis."""
        conn: Any = self
        if not conn.is_connected:
            await conn.connect()
        else:
            await reopen_if_closed(conn)
        try:
            # One write: a write per command would be a send, and a packet, each, and Redis may
            # wake for the first alone.
            if _hiredis_pack is not None:
                conn._writer.write(b"".join([_hiredis_pack(args) for args in commands]))
            else:
                conn._writer.writelines(conn.pack_commands(commands))
            async with asyncio.timeout(conn.socket_timeout + blocks if conn.socket_timeout else None):
                await conn._writer.drain()
                replies = [await conn._parser.read_response() for _ in commands]
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise redis_errors.TimeoutError(
                f"no reply from Redis within {conn.socket_timeout} s"
            ) from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise redis_errors.ConnectionError(f"Error while talking to Redis: {exc}") from exc
        except BaseException:
            # Cancelled or failed between the command and its reply: the connection may still
            # receive that reply, so it is not used again.
            await conn.disconnect(nowait=True)
            raise
        for reply in replies:
            if isinstance(reply, redis_errors.ResponseError):
                raise reply
        return replies


async def reopen_if_closed(conn: Any) -> None:
    """A pooled connection that Redis closed while it sat in the pool (a restart, say) would fail
    the call it is taken for: opened again first. (redis-py 8 no longer probes for this as it
    hands out a connection, where maintenance notifications are enabled, its default.)"""
    if conn._reader is not None and conn._reader.at_eof():
        await conn.disconnect(nowait=True)
        await conn.connect()


class _SendKeepsCancellation:
    """redis-py's `send_packed_command` with the socket timeout applied by `asyncio.timeout`
    rather than `asyncio.wait_for`. On Python 3.11, `wait_for` returns as if nothing happened when
    a cancellation lands after the send has finished but before the waiting task resumes (CPython
    issue 86296): the cancelled task ran on. Every command that redis-py itself sends comes here: a
    connection's handshake (HELLO, CLIENT SETINFO) and the pub/sub commands. Python 3.12's
    `wait_for` is built on `asyncio.timeout`, and redis-py's own method is used there."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        conn: Any = self
        if not conn.socket_timeout:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        if not conn.is_connected:
            await conn.connect_check_health(check_health=False)
        if check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(conn.socket_timeout):
                await conn._send_packed_command(command)
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise redis_errors.TimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            raise redis_errors.ConnectionError(f"Error while writing to Redis: {exc}") from exc
        except BaseException:
            # Cut off mid-write: what went out of the command is unknown, so the connection goes.
            await conn.disconnect(nowait=True)
            raise


class _EndsWithItsPool:
    """A pool's close disconnects each of its connections, but one still being made has no socket
    yet to close, and would open after the close, held by a call the close has ended and left
    open. Here a connection made for a closed pool closes as its connect ends, and none is made
    once the pool is closed. Every connect (a call's, a handshake's, a pub/sub's) comes here."""

    made_by: WaitingPool | None = None

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        conn: Any = self
        if self.made_by is not None and self.made_by.closed:
            raise redis_errors.ConnectionError("the connection pool is closed")
        await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        if self.made_by is not None and self.made_by.closed:
            await conn.disconnect(nowait=True)
            raise redis_errors.ConnectionError("the connection pool closed while the connection was made")


_MIXINS: tuple[type, ...] = (
    (_LeanCalls, _EndsWithItsPool, _SendKeepsCancellation)
    if sys.version_info < (3, 12) else (_LeanCalls, _EndsWithItsPool)
)
_LEAN: dict[type, type] = {}


def _lean(connection_class: type) -> type:
    """The connection class with `call` mixed in (and, on Python 3.11, a send that does not lose
    a cancellation), made once per class."""
    lean = _LEAN.get(connection_class)
    if lean is None:
        lean = _LEAN[connection_class] = type(
            f"Lean{connection_class.__name__}", (*_MIXINS, connection_class), {}
        )
    return lean


class WaitingPool(aioredis.ConnectionPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_class = _lean(self.connection_class)
        self._free = asyncio.Semaphore(self.max_connections)
        self._handed_out: set[Any] = set()  # by get_connection, not yet released
        self.closed = False  # for good: see `_EndsWithItsPool`

    def make_connection(self) -> Any:
        conn = super().make_connection()  # type: ignore[no-untyped-call]
        conn.made_by = self
        return conn

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self._free.acquire()
        try:
            conn = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            try:
                await reopen_if_closed(conn)
            except BaseException:
                await super().release(conn)
                raise
        except BaseException:
            self._free.release()
            raise
        self._handed_out.add(conn)
        return conn

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            # Only for a connection handed out: redis-py's get_connection also hands back through
            # here one that failed to connect, whose place get_connection gives back itself.
            if connection in self._handed_out:
                self._handed_out.remove(connection)
                self._free.release()

    async def call(self, *args: Any) -> Any:
        """One command (name, then its arguments) and its reply, as redis-py would return it
        without a response callback (EVALSHA has none)."""
        return (await self.call_many(args))[0]

    async def call_many(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Commands sent in one write on one connection, and their replies (as `call`)."""
        # redis-py's own get_connection and release take a lock, record metrics and probe the
        # socket for stray data on every command (about 12 µs of a one-by-one call's CPU). A
        # connection `call` hands back is clean (an error mid-call drops it), so the free list
        # is used directly; the hand-back still reconnects and re-authenticates as release would.
        await self._free.acquire()
        try:
            conn: Any
            try:
                conn = self._available_connections.pop()
            except IndexError:
                conn = self.make_connection()
            self._in_use_connections.add(conn)
            try:
                replies: list[Any] = await conn.call_many(commands)
                return replies
            finally:
                # Still in use while it is made ready (a close reaches it there), then free at once.
                try:
                    if conn.should_reconnect():
                        await conn.disconnect()
                    await conn.re_auth()
                except Exception as exc:
                    # The call has run: its replies (or its own error) stand, not a failure that
                    # would have a caller run an enqueue again. The connection may still get a
                    # re-auth's reply: closed, it reconnects on its next use.
                    await conn.disconnect(nowait=True)
                    logger.warning("handing a Redis connection back failed (it reconnects): %s", exc)
                except BaseException:
                    await conn.disconnect(nowait=True)  # cut off mid-way: as above
                    raise
                finally:
                    self._in_use_connections.remove(conn)
                    self._available_connections.append(conn)
        finally:
            self._free.release()
