"""Every exchange, queue, binding and dead-letter route, as data. Names appear nowhere else.

Declaring is idempotent: running it twice (or from every service at start-up) changes nothing.

- ``sagabus.commands`` (topic): targeted commands. ``checkout.start`` reaches the process
  manager; ``<participant>.<Command>`` reaches that participant's queue.
- ``sagabus.replies`` (topic): participants' reply facts for the process manager.
- ``sagabus.facts`` (fanout): public facts for choreographed consumers.
- ``sagabus.dead-letter`` (direct): routing key = the work queue's name, to ``<queue>.dlq``.
- ``<queue>.retry.<n>``: classic delay queues; a message waits there for its per-message
  expiration, then dead-letters back to ``<queue>`` through the default exchange.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType

from messaging.settings import Settings

COMMANDS_EXCHANGE = "sagabus.commands"
REPLIES_EXCHANGE = "sagabus.replies"
FACTS_EXCHANGE = "sagabus.facts"
DEAD_LETTER_EXCHANGE = "sagabus.dead-letter"
START_ROUTING_KEY = "checkout.start"

EXCHANGES: dict[str, ExchangeType] = {
    COMMANDS_EXCHANGE: ExchangeType.TOPIC,
    REPLIES_EXCHANGE: ExchangeType.TOPIC,
    FACTS_EXCHANGE: ExchangeType.FANOUT,
    DEAD_LETTER_EXCHANGE: ExchangeType.DIRECT,
}


@dataclass(frozen=True)
class QueueSpec:
    service: str
    name: str
    bindings: tuple[tuple[str, str], ...]

    @property
    def dlq(self) -> str:
        return f"{self.name}.dlq"

    def retry_queue(self, tier: int) -> str:
        return f"{self.name}.retry.{tier}"


def _q(service: str, *bindings: tuple[str, str]) -> QueueSpec:
    return QueueSpec(service, f"sagabus.{service}", bindings)


QUEUES: dict[str, QueueSpec] = {
    q.service: q
    for q in (
        _q(
            "process-manager",
            (COMMANDS_EXCHANGE, START_ROUTING_KEY),
            (REPLIES_EXCHANGE, "#"),
        ),
        _q("order", (COMMANDS_EXCHANGE, "order.#")),
        _q("payment", (COMMANDS_EXCHANGE, "payment.#")),
        _q("inventory", (COMMANDS_EXCHANGE, "inventory.#")),
        _q("shipping", (COMMANDS_EXCHANGE, "shipping.#")),
        _q("notification", (FACTS_EXCHANGE, "")),
        _q("analytics", (FACTS_EXCHANGE, "")),
    )
}
SERVICES: tuple[str, ...] = tuple(QUEUES)
QUEUE_BY_NAME: dict[str, QueueSpec] = {q.name: q for q in QUEUES.values()}
#: number of delay tiers per work queue (a retry beyond the last reuses the last)
RETRY_TIERS = 4


def command_route(participant: str, type_name: str) -> tuple[str, str]:
    """``payment.AuthorizePayment.v1`` for participant ``payment`` -> routing key
    ``payment.AuthorizePayment``."""
    name = type_name.split(".")[1]
    return COMMANDS_EXCHANGE, f"{participant}.{name}"


def reply_route(type_name: str) -> tuple[str, str]:
    return REPLIES_EXCHANGE, type_name


def fact_route(type_name: str) -> tuple[str, str]:
    return FACTS_EXCHANGE, type_name


def work_queue_arguments(spec: QueueSpec, settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": spec.name,
        "x-delivery-limit": settings.delivery_limit,
    }


async def declare(
    channel: AbstractChannel, settings: Settings, services: tuple[str, ...] = SERVICES
) -> None:
    """Declare the exchanges, and the queues of ``services`` with their DLQs and delay queues."""
    exchanges = {}
    for name, kind in EXCHANGES.items():
        exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
    for service in services:
        spec = QUEUES[service]
        queue = await channel.declare_queue(
            spec.name, durable=True, arguments=work_queue_arguments(spec, settings)
        )
        for exchange, key in spec.bindings:
            await queue.bind(exchanges[exchange], routing_key=key)
        dlq = await channel.declare_queue(
            spec.dlq, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dlq.bind(exchanges[DEAD_LETTER_EXCHANGE], routing_key=spec.name)
        for tier in range(1, RETRY_TIERS + 1):
            await channel.declare_queue(
                spec.retry_queue(tier),
                durable=True,
                arguments={
                    "x-queue-type": "classic",
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": spec.name,
                },
            )


async def declare_all(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare(channel, settings)
