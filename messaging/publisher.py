"""Publishing with publisher confirms: a publish returns only once the broker has the message."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection


class Publisher:
    """Publishes on a confirm-mode channel. Unroutable messages raise instead of vanishing."""

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel
        self._exchanges: dict[str, AbstractExchange] = {}

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel)

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
        await ex.publish(message, routing_key=routing_key, mandatory=True, timeout=timeout)

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
