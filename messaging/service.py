"""Running services: wiring a service definition to the broker and the database.

A service is data (its schema, tables, handlers and background loops); ``Runtime`` gives it an
engine, a robust broker connection, a consumer, an outbox relay and its loops, and shuts all of
it down in order: stop consuming, finish in-flight messages, stop the loops, close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from opentelemetry import trace
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters, telemetry, topology
from messaging.consumer import Consumer, Handler
from messaging.db import (
    create_schema,
    inbox_table,
    make_engine,
    outbox_table,
    upgrade_inbox_key,
)
from messaging.deadletters import Collector
from messaging.outbox import Outbox, Relay
from messaging.publisher import Publisher
from messaging.retention import RetentionRule, prune_loop
from messaging.settings import Settings

log = structlog.get_logger("sagabus.service")


@dataclass
class ServiceDefinition:
    name: str
    schema: str
    metadata: MetaData
    handlers: dict[str, Handler]
    background: Sequence[Callable[[ServiceContext], Awaitable[None]]] = ()
    #: its own rows that expire (``messaging.retention``), pruned with its inbox and outbox
    retained: Sequence[RetentionRule] = ()
    outbox: Table = field(init=False)
    inbox: Table = field(init=False)

    def __post_init__(self) -> None:
        if self.metadata.schema != self.schema:
            raise ValueError(f"metadata schema {self.metadata.schema!r} != {self.schema!r}")
        tables = self.metadata.tables
        outbox = tables.get(f"{self.schema}.outbox")
        inbox = tables.get(f"{self.schema}.inbox")
        self.outbox = outbox if outbox is not None else outbox_table(self.metadata)
        self.inbox = inbox if inbox is not None else inbox_table(self.metadata)


@dataclass
class ServiceContext:
    """What a background loop of a service gets."""

    definition: ServiceDefinition
    settings: Settings
    engine: AsyncEngine
    outbox: Outbox
    publisher: Publisher
    tracer: trace.Tracer
    stop: asyncio.Event


async def migrate(definitions: Sequence[ServiceDefinition], engine: AsyncEngine) -> None:
    for d in definitions:
        await create_schema(engine, d.schema, d.metadata)
        await upgrade_inbox_key(engine, d.schema)


class Runtime:
    def __init__(
        self,
        definitions: Sequence[ServiceDefinition],
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        dead_letters: bool = False,
    ) -> None:
        self.definitions = list(definitions)
        self.collect_dead_letters = dead_letters
        self.collector: Collector | None = None
        self.settings = settings
        self._own_engine = engine is None
        self.engine = engine or make_engine(settings)
        self.stop_event = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None
        self.consumers: dict[str, Consumer] = {}
        self.relays: dict[str, Relay] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._publishers: list[Publisher] = []
        self._stopped = False

    async def start(self) -> None:
        await migrate(self.definitions, self.engine)
        if self.collect_dead_letters:
            await create_schema(self.engine, deadletters.SCHEMA, deadletters.metadata)
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url)
        if self.settings.declare_topology:
            declare_channel = await self.connection.channel()
            # The whole topology, not just our queues: a command to a participant that is not
            # running yet must wait in its queue, not bounce as unroutable.
            await topology.declare(declare_channel, self.settings)
            await declare_channel.close()
        # Otherwise a restricted user has no configure permission, and `sagabus migrate` or
        # `sagabus provision` declared the topology with an admin user beforehand.
        if self.collect_dead_letters:
            self.collector = Collector(self.engine, telemetry.tracer(deadletters.SERVICE))
            await self.collector.start(self.connection, topology.SERVICES)
        for d in self.definitions:
            tracer = telemetry.tracer(d.name)
            publisher = await Publisher.open(self.connection)
            self._publishers.append(publisher)
            outbox = Outbox(d.outbox, d.schema)
            relay = Relay(
                service=d.name,
                engine=self.engine,
                outbox=outbox,
                publisher=publisher,
                settings=self.settings,
                tracer=tracer,
            )
            self.relays[d.name] = relay
            consumer = Consumer(
                service=d.name,
                spec=topology.QUEUES[d.name],
                engine=self.engine,
                inbox=d.inbox,
                outbox=outbox,
                handlers=d.handlers,
                publisher=publisher,
                settings=self.settings,
                tracer=tracer,
                broker_user=publisher.user,
            )
            self.consumers[d.name] = consumer
            if consumer.sender_prefix is None:
                log.warning(
                    "sender_check_off",
                    service=d.name,
                    broker_user=publisher.user,
                    why="the broker user is not a provisioned one (<prefix><service>): replies "
                    "are believed from any user allowed on their route",
                )
            self._tasks.append(asyncio.create_task(relay.run(self.stop_event)))
            ctx = ServiceContext(
                d, self.settings, self.engine, outbox, publisher, tracer, self.stop_event
            )
            for loop in d.background:
                self._tasks.append(asyncio.create_task(_guard(d.name, loop, ctx)))
            self._tasks.append(
                asyncio.create_task(
                    prune_loop(
                        d.name,
                        self.engine,
                        d.inbox,
                        d.outbox,
                        inbox_retention_s=self.settings.inbox_retention_s,
                        outbox_retention_s=self.settings.outbox_retention_s,
                        interval_s=self.settings.retention_interval_s,
                        stop=self.stop_event,
                        rules=d.retained,
                        settings=self.settings,
                    )
                )
            )
            channel = await self.connection.channel()
            await consumer.start(channel)
            log.info("service_started", service=d.name, queue=topology.QUEUES[d.name].name)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        for consumer in self.consumers.values():
            await consumer.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        if self._own_engine:
            await self.engine.dispose()
        log.info("services_stopped", services=[d.name for d in self.definitions])

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def unreachable(e: BaseException) -> bool:
    """PostgreSQL or RabbitMQ refused or dropped the connection, or is starting or stopping:
    worth waiting for. Bad credentials, an unknown vhost or a bug are not."""
    import aiormq.exceptions as amqp
    import asyncpg
    from sqlalchemy import exc

    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(
            seen,
            amqp.AuthenticationError
            | amqp.ProbableAuthenticationError
            | amqp.ConnectionNotAllowed
            | amqp.IncompatibleProtocolError,
        ):
            return False
        if isinstance(
            seen,
            OSError
            | TimeoutError
            | amqp.ChannelInvalidStateError
            | asyncpg.OperatorInterventionError
            | asyncpg.TooManyConnectionsError
            | asyncpg.ConnectionDoesNotExistError,
        ):
            return True
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


async def start_when_reachable(
    definitions: Sequence[ServiceDefinition],
    settings: Settings,
    *,
    dead_letters: bool,
    stop: asyncio.Event,
) -> Runtime | None:
    """Start a runtime; while PostgreSQL or RabbitMQ cannot be reached (restarting, or not up
    yet), wait and try again instead of exiting. None if ``stop`` is set meanwhile."""
    from messaging.db import ensure_database

    backoff = 0.5
    while not stop.is_set():
        runtime = Runtime(definitions, settings, dead_letters=dead_letters)
        try:
            await ensure_database(settings)
            await runtime.start()
            return runtime
        except Exception as e:
            if not unreachable(e):
                raise
            log.warning(
                "service_start_waiting",
                error=f"{type(e).__name__}: {e}"[:300],
                retry_in_s=backoff,
            )
            with contextlib.suppress(Exception):
                await runtime.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, 5.0)
    return None


async def _guard(
    service: str, loop: Callable[[ServiceContext], Awaitable[None]], ctx: ServiceContext
) -> None:
    """Keep a background loop alive: log a crash, back off, start it again."""
    backoff = 0.5
    while not ctx.stop.is_set():
        try:
            await loop(ctx)
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error(
                "background_loop_failed",
                service=service,
                loop=getattr(loop, "__name__", str(loop)),
                error=f"{type(e).__name__}: {e}",
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ctx.stop.wait(), backoff)
            backoff = min(backoff * 2, 10)
