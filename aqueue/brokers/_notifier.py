"""One pub/sub connection per broker, shared by everyone waiting on a channel.

`listen(channel)` returns only once Redis has confirmed the subscription, so a caller that then reads
some state and waits cannot miss a message published after that read. Without this, a SUBSCRIBE sent
on one connection may still be unprocessed when a read on another connection runs.

A connection that answers nothing (a peer gone without a word: a failover behind a virtual address,
a dropped flow) is found out by a confirmation or a PING that does not come back within ANSWER_WITHIN,
and dropped: everyone listening re-checks and subscribes again on a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from aqueue._background import Background

logger = logging.getLogger("aqueue")

# How long a confirmation or a PING's reply may take before the connection is taken for dead (as
# long as the default socket_timeout); a connection quiet that long is PINGed.
ANSWER_WITHIN = 5.0


class Listener:
    """What `listen` yields. `wait()` returns the next message on the channel, or None when the
    connection was lost: then `lost` is set, and the caller re-reads its state and listens again."""

    __slots__ = ("_heard", "_message", "lost")

    def __init__(self) -> None:
        self._heard = anyio.Event()
        self._message: bytes | None = None
        self.lost = False

    def _wake(self, message: bytes | None) -> None:
        if message is None:
            self.lost = True
        self._message = message
        self._heard.set()

    async def wait(self) -> bytes | None:
        await self._heard.wait()
        self._heard = anyio.Event()
        return self._message


@dataclass
class _Channel:
    waiters: set[Listener] = field(default_factory=set)
    # Listeners for one key only: they hear the messages whose first line is their key.
    routed: dict[str, set[Listener]] = field(default_factory=dict)
    keep: bool = False  # stays subscribed when nobody listens
    sent: int = 0  # SUBSCRIBE commands sent for this channel
    confirmed: int = 0  # their confirmations read back
    confirmation: anyio.Event = field(default_factory=anyio.Event)
    refused: Exception | None = None  # Redis's error reply to the SUBSCRIBE (NOPERM, BUSY)


class Notifier:
    def __init__(self, client: aioredis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._channels: dict[str, _Channel] = {}
        self._reader: Background[None] | None = None
        self._commands = asyncio.Lock()  # SUBSCRIBE / UNSUBSCRIBE go out one at a time
        # Channels nobody listens on any more: unsubscribed in the background, so that a waiter
        # returns at once, and reused as they are if listened on again before that.
        self._idle: set[str] = set()
        self._unsubscriber: Background[None] | None = None
        self._closed = False

    @asynccontextmanager
    async def listen(
        self, channel: str, key: str | None = None, *, keep: bool = False
    ) -> AsyncIterator[Listener]:
        """Subscribed (confirmed) for the body. With a `key`, only the messages whose first line
        is that key are heard. With `keep`, the channel stays subscribed when nobody listens (a
        process's inbox, listened on again and again)."""
        if self._closed:
            raise redis_errors.ConnectionError("the pub/sub connection is closed")
        heard = Listener()
        self._idle.discard(channel)
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        state.keep = state.keep or keep
        listeners = state.waiters if key is None else state.routed.setdefault(key, set())
        listeners.add(heard)
        try:
            if state.sent == 0 or state.sent > state.confirmed:
                await self._subscribe(channel, state)
            yield heard
        finally:
            listeners.discard(heard)
            if key is not None and not listeners and state.routed.get(key) is listeners:
                del state.routed[key]
            if (not state.waiters and not state.routed and not state.keep
                    and self._channels.get(channel) is state):
                if state.sent:
                    self._idle.add(channel)
                    if self._unsubscriber is None or self._unsubscriber.done():
                        self._unsubscriber = Background(self._unsubscribe())
                else:
                    del self._channels[channel]

    async def close(self) -> None:
        self._closed = True
        if self._unsubscriber is not None:
            await self._unsubscriber.stop()
            self._unsubscriber = None
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        self._release_all()  # whoever still listens hears no more here: woken, they see it closed
        await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2

    async def _subscribe(self, channel: str, state: _Channel) -> None:
        if state.sent == state.confirmed:
            state.sent += 1
            try:
                async with self._commands:
                    if self._channels.get(channel) is not state:
                        # Released while it waited its turn (the connection dropped or closed, or
                        # a SUBSCRIBE refused): its listeners were told. Sent now, it would
                        # subscribe a channel nobody tracks, never to be unsubscribed.
                        if state.refused is not None:
                            raise state.refused
                        return
                    await self._pubsub.subscribe(channel)
                    if self._closed:
                        # Closed while the SUBSCRIBE was on its way (its connection still being
                        # made, which the close could not reach): closed again, left subscribed
                        # to nothing, the connection handed back.
                        await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8.2
                        raise redis_errors.ConnectionError("the pub/sub connection was closed")
                    # Started only once the SUBSCRIBE is out, on a connection made: a reader
                    # started while it connects (by a listen waiting for it) made the lost
                    # connection again too, two connects at once on one connection object, one
                    # socket left unclosed (or two reads at once on one stream).
                    self._ensure_reader()
            except BaseException as exc:
                # Not sent (or not known to be): forget the state, so the next listen subscribes
                # again, and release whoever waits for its confirmation.
                if self._channels.get(channel) is state:
                    del self._channels[channel]
                state.confirmed = state.sent
                state.confirmation.set()
                for heard in [*state.waiters, *(h for hs in state.routed.values() for h in hs)]:
                    heard._wake(None)
                if isinstance(exc, RuntimeError):
                    # redis-py's reader was making the lost connection again at the same time
                    # (two reads at once on one stream, as Redis came back): the connection's
                    # state is unknown, so it is dropped, and the caller hears of the lost
                    # connection it comes of, not of the client's insides.
                    await self._drop(exc)
                    raise redis_errors.ConnectionError(f"the pub/sub connection was lost: {exc}") from exc
                raise
        target = state.sent
        with anyio.move_on_after(ANSWER_WITHIN):
            while state.confirmed < target:
                await state.confirmation.wait()
        if state.confirmed < target:
            await self._drop(TimeoutError(f"no confirmation of SUBSCRIBE within {ANSWER_WITHIN}s"))
        if state.refused is not None:
            raise state.refused

    async def _unsubscribe(self) -> None:
        while self._idle:
            failed: Exception | None = None
            async with self._commands:  # after any SUBSCRIBE already under way, before any later one
                channels = list(self._idle)
                self._idle.clear()
                for channel in channels:
                    self._channels.pop(channel, None)
                try:
                    await self._pubsub.unsubscribe(*channels)
                except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                    return  # the subscriptions went with the connection
                except Exception as exc:  # the connection's state is unknown: see `_read`
                    failed = exc
            if failed is not None:
                await self._drop(failed)
                return

    def _ensure_reader(self) -> None:
        if self._closed:
            return
        if self._reader is None or self._reader.done():
            self._reader = Background(self._read())

    async def _read(self) -> None:
        pinged = False
        while True:
            try:
                message = await self._pubsub.get_message(timeout=ANSWER_WITHIN)
                if message is None and self._channels:  # quiet: is the connection still there?
                    if pinged:
                        await self._drop(TimeoutError(f"no reply to PING within {ANSWER_WITHIN}s"))
                        return
                    async with self._commands:
                        await self._pubsub.ping()
                    pinged = True
                    continue
            except redis_errors.ResponseError as exc:  # an error reply: a SUBSCRIBE refused
                self._refused(exc)
                continue
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                # Nothing is subscribed now: the next listen() reconnects and starts a reader.
                self._reader = None
                self._lost(exc)
                return
            except RuntimeError as exc:
                if not self._channels:  # nothing subscribed any more: stop until the next listen()
                    self._reader = None
                    return
                # Two reads at once on one stream (a listen making the lost connection again as
                # redis-py's own reconnect did): the connection's state is unknown. Dropped as
                # dead, so that everyone listening subscribes again; a reader that just stopped
                # left them subscribed on a connection nobody read, until a lock's ttl ran out.
                await self._drop(exc)
                return
            except Exception as exc:
                # Anything else leaves the connection in a state unknown (redis-py has raised
                # AttributeError from a connection torn down while it reconnected): dropped as
                # dead. A reader that ended here would leave every listener waiting unwoken.
                await self._drop(exc)
                return
            pinged = False
            if message is None or message["type"] == "pong":
                continue
            channel = message["channel"].decode()
            state = self._channels.get(channel)
            if state is None:
                continue
            if message["type"] == "subscribe":
                state.confirmed += 1
                state.confirmation.set()
                state.confirmation = anyio.Event()
            elif message["type"] == "message":
                data = message["data"]
                for heard in state.waiters:
                    heard._wake(data)
                if state.routed:
                    # "id ends" first (an earlier aqueue's worker: "id"); escaped, not refused:
                    # bytes another writer sent must not end the reading.
                    head = data.split(b"\n", 1)[0]
                    job_id, said, ends = head.rpartition(b" ")
                    routed = (job_id if said and ends.isdigit() else head).decode("utf-8", "backslashreplace")
                    for heard in state.routed.get(routed, ()):
                        heard._wake(data)
                # A turn of the loop: those woken go on before this task reads the next message.
                await asyncio.sleep(0)

    def _refused(self, exc: Exception) -> None:
        """Redis answered a pub/sub command with an error. Which SUBSCRIBE it answers goes unsaid
        (replies only keep their order), so every listen waiting for a confirmation raises it,
        and the next listen subscribes afresh."""
        logger.warning("Redis refused a pub/sub command: %s", exc)
        for channel, state in list(self._channels.items()):
            if state.confirmed < state.sent:
                state.refused = exc
                state.confirmed = state.sent
                state.confirmation.set()
                del self._channels[channel]

    async def _drop(self, exc: Exception) -> None:
        """The connection answers nothing: closed, so that the next listen() opens a new one."""
        if self._reader is not None and self._reader.task is not asyncio.current_task():
            await self._reader.stop()
        self._reader = None
        connection = self._pubsub.connection
        if connection is not None:
            async with self._commands:
                await connection.disconnect()
        self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        """Every subscription is gone with the connection: wake everyone to re-check and re-listen."""
        logger.warning("pub/sub connection lost, listeners re-subscribe: %s", exc)
        self._release_all()

    def _release_all(self) -> None:
        """Forget every subscription and wake everyone listening, as for a lost connection."""
        channels, self._channels = self._channels, {}
        self._idle.clear()
        for state in channels.values():
            state.confirmed = state.sent  # release anyone waiting for a confirmation
            state.confirmation.set()
            for heard in state.waiters:
                heard._wake(None)
            for listeners in state.routed.values():
                for heard in listeners:
                    heard._wake(None)
        # redis-py re-subscribes the old channels on reconnect; start from a clean slate instead.
        self._pubsub.channels.clear()
