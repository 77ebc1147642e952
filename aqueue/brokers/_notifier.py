"""One pub/sub connection per broker, shared by everyone waiting on a channel.

`listen(channel)` returns only once Redis has confirmed the subscription, so a caller that then reads
some state and waits cannot miss a message published after that read. Without this, a SUBSCRIBE sent
on one connection may still be unprocessed when a read on another connection runs.
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

logger = logging.getLogger("aqueue")


class Listener:
    """What `listen` yields. `wait()` returns at the next message on the channel, or when the
    connection was lost: then `lost` is set, and the caller re-reads its state and listens again."""

    __slots__ = ("_heard", "lost")

    def __init__(self) -> None:
        self._heard = anyio.Event()
        self.lost = False

    def _wake(self, *, lost: bool = False) -> None:
        self.lost = self.lost or lost
        self._heard.set()

    async def wait(self) -> None:
        await self._heard.wait()
        self._heard = anyio.Event()


@dataclass
class _Channel:
    waiters: set[Listener] = field(default_factory=set)
    sent: int = 0  # SUBSCRIBE commands sent for this channel
    confirmed: int = 0  # their confirmations read back
    confirmation: anyio.Event = field(default_factory=anyio.Event)


class Notifier:
    def __init__(self, client: aioredis.Redis) -> None:
        self._pubsub = client.pubsub()
        self._channels: dict[str, _Channel] = {}
        self._reader: asyncio.Task[None] | None = None
        self._commands = asyncio.Lock()  # SUBSCRIBE / UNSUBSCRIBE go out one at a time

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[Listener]:
        """Subscribed (confirmed) for the body."""
        heard = Listener()
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel()
        state.waiters.add(heard)
        try:
            if state.sent == 0 or state.sent > state.confirmed:
                await self._subscribe(channel, state)
            yield heard
        finally:
            state.waiters.discard(heard)
            if not state.waiters and self._channels.get(channel) is state:
                del self._channels[channel]
                if state.sent:
                    with anyio.CancelScope(shield=True):
                        await self._command("UNSUBSCRIBE", channel)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe(self, channel: str, state: _Channel) -> None:
        if state.sent == state.confirmed:
            state.sent += 1
            await self._command("SUBSCRIBE", channel)
        target = state.sent
        self._ensure_reader()
        while state.confirmed < target:
            await state.confirmation.wait()

    async def _command(self, command: str, channel: str) -> None:
        async with self._commands:
            if command == "SUBSCRIBE":
                await self._pubsub.subscribe(channel)
            else:
                await self._pubsub.unsubscribe(channel)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
                self._lost(exc)
                await anyio.sleep(0.1)
                continue
            except RuntimeError:  # nothing subscribed any more: stop until the next listen()
                self._reader = None
                return
            if message is None:
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
                for heard in state.waiters:
                    heard._wake()

    def _lost(self, exc: BaseException) -> None:
        """Every subscription is gone with the connection: wake everyone to re-check and re-listen."""
        logger.warning("pub/sub connection lost, listeners re-subscribe: %s", exc)
        channels, self._channels = self._channels, {}
        for state in channels.values():
            state.confirmed = state.sent  # release anyone waiting for a confirmation
            state.confirmation.set()
            for heard in state.waiters:
                heard._wake(lost=True)
        # redis-py re-subscribes the old channels on reconnect; start from a clean slate instead.
        self._pubsub.channels.clear()
