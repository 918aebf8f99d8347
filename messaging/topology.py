"""Every exchange, queue, binding and dead-letter route, as data. Names appear nowhere else.

Declaring is idempotent: running it twice (or from every service at start-up) changes nothing.

- ``sagabus.commands`` (topic): targeted commands. ``<saga>.start`` (``checkout.start``,
  ``returns.start``) reaches the process manager; ``<participant>.<Command>`` reaches that
  participant's queue.
- ``sagabus.replies`` (topic): participants' reply facts for the process manager.
- ``sagabus.facts`` (fanout): public facts for choreographed consumers.
- ``sagabus.retry`` (topic): a consumer schedules a retry here with routing key
  ``<queue>.retry.<n>``, bound to the delay queue of that name.
- ``<queue>.retry.<n>``: classic delay queues; a message waits there for its per-message
  expiration, then the broker dead-letters it back to ``<queue>`` through the default exchange.
- ``sagabus.dlx`` (topic): a consumer dead-letters here with routing key ``<queue>``, bound
  to ``<queue>.dlq``.
- ``sagabus.dead-letter`` (direct): routing key ``<queue>``, to ``<queue>.dlq``; the work
  queues' ``x-dead-letter-exchange``, used only by the broker itself (``x-delivery-limit``).
- ``sagabus.replay`` (topic): routing key ``<queue>``, to that work queue; ``dlq replay``
  publishes there.

Every route a principal publishes a failed message through is a topic exchange whose routing
keys start with the queue name, so topic permissions can confine a service to its own queue
(see ``messaging/provision/broker.py``); nobody needs the default exchange. The broker-only
direct exchange keeps its old name and type because a queue argument cannot change without
re-creating the queue (and an exchange cannot change type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, ExchangeType

from messaging.settings import Settings
from schemas.registry import REGISTRY

#: number of delay tiers per work queue (a retry beyond the last reuses the last)
RETRY_TIERS = 4

COMMANDS_EXCHANGE = "sagabus.commands"
REPLIES_EXCHANGE = "sagabus.replies"
FACTS_EXCHANGE = "sagabus.facts"
#: where consumers schedule retries: key ``<queue>.retry.<n>``, to that delay queue
RETRY_EXCHANGE = "sagabus.retry"
#: where consumers dead-letter: key ``<queue>``, to ``<queue>.dlq``
DEAD_LETTER_EXCHANGE = "sagabus.dlx"
#: where the broker dead-letters (the work queues' argument): key ``<queue>``, to ``<queue>.dlq``
BROKER_DEAD_LETTER_EXCHANGE = "sagabus.dead-letter"
#: where ``dlq replay`` republishes: key ``<queue>``, to that work queue
REPLAY_EXCHANGE = "sagabus.replay"
#: the checkout saga's start route (every saga type has its own: ``start_routing_key``)
START_ROUTING_KEY = "checkout.start"

EXCHANGES: dict[str, ExchangeType] = {
    COMMANDS_EXCHANGE: ExchangeType.TOPIC,
    REPLIES_EXCHANGE: ExchangeType.TOPIC,
    FACTS_EXCHANGE: ExchangeType.FANOUT,
    RETRY_EXCHANGE: ExchangeType.TOPIC,
    DEAD_LETTER_EXCHANGE: ExchangeType.TOPIC,
    BROKER_DEAD_LETTER_EXCHANGE: ExchangeType.DIRECT,
    REPLAY_EXCHANGE: ExchangeType.TOPIC,
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

    @property
    def retry_queues(self) -> tuple[str, ...]:
        return tuple(self.retry_queue(t) for t in range(1, RETRY_TIERS + 1))

    def all_bindings(self) -> tuple[tuple[str, str, str], ...]:
        """(exchange, queue, routing key) of every binding to this work queue, its DLQ and its
        delay queues. Dead-letter, retry and replay keys start with the work queue's name."""
        return (
            *((exchange, self.name, key) for exchange, key in self.bindings),
            (REPLAY_EXCHANGE, self.name, self.name),
            (DEAD_LETTER_EXCHANGE, self.dlq, self.name),
            (BROKER_DEAD_LETTER_EXCHANGE, self.dlq, self.name),
            *((RETRY_EXCHANGE, q, q) for q in self.retry_queues),
        )


def _q(service: str, *bindings: tuple[str, str]) -> QueueSpec:
    return QueueSpec(service, f"sagabus.{service}", bindings)


#: the services that own commands (each gets ``<service>.#`` on the commands exchange)
PARTICIPANTS: tuple[str, ...] = ("order", "payment", "inventory", "shipping", "risk")


def _saga_types() -> tuple[str, ...]:
    """Every saga type, from its start command: a command owned by no participant
    (``returns.StartReturn.v1`` starts ``returns``)."""
    return tuple(
        sorted(
            {
                t.split(".", 1)[0]
                for t, m in REGISTRY.items()
                if m.KIND == "command" and t.split(".", 1)[0] not in PARTICIPANTS
            }
        )
    )


#: saga types the process manager starts, each on its own route ``<saga>.start``
SAGA_TYPES: tuple[str, ...] = _saga_types()


def start_routing_key(saga_type: str) -> str:
    return f"{saga_type}.start"


QUEUES: dict[str, QueueSpec] = {
    q.service: q
    for q in (
        _q(
            "process-manager",
            *((COMMANDS_EXCHANGE, start_routing_key(saga)) for saga in SAGA_TYPES),
            (REPLIES_EXCHANGE, "#"),
        ),
        *(_q(p, (COMMANDS_EXCHANGE, f"{p}.#")) for p in PARTICIPANTS),
        _q("notification", (FACTS_EXCHANGE, "")),
        _q("analytics", (FACTS_EXCHANGE, "")),
    )
}
SERVICES: tuple[str, ...] = tuple(QUEUES)
QUEUE_BY_NAME: dict[str, QueueSpec] = {q.name: q for q in QUEUES.values()}


def command_route(participant: str, type_name: str) -> tuple[str, str]:
    """``payment.AuthorizePayment.v1`` for participant ``payment`` -> routing key
    ``payment.AuthorizePayment``."""
    name = type_name.split(".")[1]
    return COMMANDS_EXCHANGE, f"{participant}.{name}"


def reply_route(type_name: str) -> tuple[str, str]:
    return REPLIES_EXCHANGE, type_name


def fact_route(type_name: str) -> tuple[str, str]:
    return FACTS_EXCHANGE, type_name


def retry_route(spec: QueueSpec, tier: int) -> tuple[str, str]:
    """Into delay queue ``tier`` (1-based) of ``spec``'s work queue."""
    return RETRY_EXCHANGE, spec.retry_queue(tier)


def dead_letter_route(queue: str) -> tuple[str, str]:
    """Into the DLQ of work queue ``queue``."""
    return DEAD_LETTER_EXCHANGE, queue


def replay_route(queue: str) -> tuple[str, str]:
    """Back into work queue ``queue``."""
    return REPLAY_EXCHANGE, queue


# -- who may send what, by which route ----------------------------------------------------------
#
# A consumer believes a message's type only for the route it came by: the table below says, per
# work queue, which types may arrive there by which (exchange, routing key), and which principal
# (broker user ``<prefix><principal>``) must have sent it. ``sagabus provision`` turns the same
# table into broker permissions (``messaging/provision/broker.py``), so the code and the broker
# cannot disagree. Retries (back from a delay queue through the default exchange) and replays
# (``sagabus.replay``) are judged by the original route they carry.

#: the principal that starts sagas; any user allowed to publish on the start route may (the
#: broker's topic permissions decide who that is: ``client`` and ``operator``)
ANY_SENDER = ""


@dataclass(frozen=True)
class Route:
    exchange: str
    routing_key: str


def owner_of(type_name: str) -> str:
    """The service that owns a wire type: its first word (``payment.PaymentAuthorized.v1``)."""
    return type_name.split(".", 1)[0]


def _accepted() -> dict[str, dict[str, tuple[Route, str]]]:
    """queue -> type -> (the one route it may arrive by, the principal that must send it)."""
    table: dict[str, dict[str, tuple[Route, str]]] = {q.name: {} for q in QUEUES.values()}
    pm = QUEUES["process-manager"].name
    for type_name, model in REGISTRY.items():
        owner = owner_of(type_name)
        if model.KIND == "command" and owner in SAGA_TYPES:
            # a public entry point: the saga's own start route
            table[pm][type_name] = (
                Route(COMMANDS_EXCHANGE, start_routing_key(owner)),
                ANY_SENDER,
            )
        elif model.KIND == "command" and owner in QUEUES:
            table[QUEUES[owner].name][type_name] = (
                Route(*command_route(owner, type_name)),
                "process-manager",
            )
        elif model.KIND in ("reply", "fact"):
            # every reply (and fact) goes to the process manager by its own type name
            table[pm][type_name] = (Route(*reply_route(type_name)), owner)
            if model.KIND == "fact":
                for spec in QUEUES.values():
                    if (FACTS_EXCHANGE, "") in spec.bindings:
                        table[spec.name][type_name] = (Route(*fact_route(type_name)), owner)
    return table


#: queue name -> message type -> (its route, the principal that must send it)
ACCEPTED: dict[str, dict[str, tuple[Route, str]]] = _accepted()


def accepted_route(queue: str, type_name: str) -> tuple[Route, str] | None:
    """The route ``type_name`` may arrive by on ``queue`` and its sender, or None: never."""
    return ACCEPTED.get(queue, {}).get(type_name)


def publishes(principal: str) -> tuple[Route, ...]:
    """Every route ``principal`` sends messages on (for its broker permissions)."""
    found = {
        route
        for types in ACCEPTED.values()
        for route, sender in types.values()
        if sender == principal
    }
    return tuple(sorted(found, key=lambda r: (r.exchange, r.routing_key)))


START_ROUTING_KEYS: frozenset[str] = frozenset(start_routing_key(s) for s in SAGA_TYPES)


def is_start_route(exchange: str, routing_key: str) -> bool:
    return exchange == COMMANDS_EXCHANGE and routing_key in START_ROUTING_KEYS


def work_queue_arguments(spec: QueueSpec, settings: Settings) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": BROKER_DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": spec.name,
        "x-delivery-limit": settings.delivery_limit,
    }


def retry_queue_arguments(spec: QueueSpec) -> dict[str, Any]:
    """A delay queue: when a message's expiration passes, the broker dead-letters it back to
    the work queue through the default exchange."""
    return {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": spec.name,
    }


DLQ_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}


async def declare(
    channel: AbstractChannel, settings: Settings, services: tuple[str, ...] = SERVICES
) -> None:
    """Declare the exchanges, and the queues of ``services`` with their DLQs and delay queues."""
    exchanges = {}
    for name, kind in EXCHANGES.items():
        exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
    for service in services:
        spec = QUEUES[service]
        queues = {
            spec.name: await channel.declare_queue(
                spec.name, durable=True, arguments=work_queue_arguments(spec, settings)
            ),
            spec.dlq: await channel.declare_queue(spec.dlq, durable=True, arguments=DLQ_ARGUMENTS),
        }
        for name in spec.retry_queues:
            queues[name] = await channel.declare_queue(
                name, durable=True, arguments=retry_queue_arguments(spec)
            )
        for exchange, queue, key in spec.all_bindings():
            await queues[queue].bind(exchanges[exchange], routing_key=key)


async def declare_all(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare(channel, settings)
