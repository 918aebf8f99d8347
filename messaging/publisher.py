"""Publishing with publisher confirms: a publish returns only once the broker has the message."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection


def broker_user(connection: AbstractRobustConnection) -> str:
    """The user a connection authenticated as (RabbitMQ's default when the URL names none)."""
    url = getattr(connection, "url", None)
    return (getattr(url, "user", None) or "guest") if url is not None else "guest"


class Publisher:
    """Publishes on a confirm-mode channel. Unroutable messages raise instead of vanishing.

    Every message carries the AMQP ``user_id`` of the connection's user, which RabbitMQ checks
    (it refuses a publish that names another user): consumers believe a sender by it
    (``messaging.trust``)."""

    def __init__(self, channel: AbstractChannel, user: str | None = None) -> None:
        self._channel = channel
        #: the broker user this publisher's connection authenticated as
        self.user = user
        self._exchanges: dict[str, AbstractExchange] = {}
        self._pending: set[asyncio.Future[Any]] = set()
        channel.close_callbacks.add(self._on_close)

    def _on_close(self, *_: Any) -> None:
        # The connection is gone. aiormq waits for a publish's frame to be written with no
        # timeout, so a publish caught in the loss would hang forever (and hold the channel's
        # lock, stalling every later publish): fail them now; callers retry after the reconnect.
        for f in list(self._pending):
            f.cancel()

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel, broker_user(connection))

    async def _exchange(self, name: str) -> AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        ex = self._exchanges.get(name)
        if ex is None:
            ex = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = ex
        return ex

    async def publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, *, timeout: float = 30
    ) -> None:
        ex = await self._exchange(exchange)
        if self.user is not None:
            message.user_id = self.user
        task = asyncio.ensure_future(
            ex.publish(message, routing_key=routing_key, mandatory=True, timeout=timeout)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        try:
            await asyncio.wait_for(task, timeout)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise
            raise ConnectionError("broker connection lost while publishing") from None

    async def publish_many(
        self, items: Sequence[tuple[str, str, aio_pika.Message]], *, timeout: float = 30
    ) -> None:
        """Publish a batch and wait for every confirm (they are pipelined, not serial)."""
        results = await asyncio.gather(
            *(self.publish(e, k, m, timeout=timeout) for e, k, m in items),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()
