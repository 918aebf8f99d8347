"""Running services: wiring a service definition to the broker and the database.

A service is data (its schema, tables, handlers and background loops); ``Runtime`` gives it an
engine, a robust broker connection, a consumer, an outbox relay and its loops, and shuts all of
it down in order: stop consuming, finish in-flight messages, stop the loops, close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection
from opentelemetry import trace
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters, signing, telemetry, topology
from messaging.consumer import Consumer, Handler
from messaging.db import (
    check_pool_budget,
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

#: processes of a deployment with one per service plus the dead-letter collector: the pool
#: budget check assumes them all against one PostgreSQL (replicas are not counted)
DEPLOYABLES = len(topology.SERVICES) + 1


@dataclass
class ServiceDefinition:
    name: str
    schema: str
    metadata: MetaData
    handlers: dict[str, Handler]
    background: Sequence[Callable[[ServiceContext], Awaitable[None]]] = ()
    #: its own rows that expire (``messaging.retention``), pruned with its inbox and outbox
    retained: Sequence[RetentionRule] = ()
    #: brings tables made by an earlier version up to date (idempotent; run by ``migrate``)
    upgrade: Callable[[AsyncEngine], Awaitable[None]] | None = None
    #: checked after migrating, before consuming: raises ``StartRefused`` to refuse to start
    preflight: Callable[[AsyncEngine], Awaitable[None]] | None = None
    outbox: Table = field(init=False)
    inbox: Table = field(init=False)
    keys: Table = field(init=False)

    def __post_init__(self) -> None:
        if self.metadata.schema != self.schema:
            raise ValueError(f"metadata schema {self.metadata.schema!r} != {self.schema!r}")
        tables = self.metadata.tables
        outbox = tables.get(f"{self.schema}.outbox")
        inbox = tables.get(f"{self.schema}.inbox")
        self.outbox = outbox if outbox is not None else outbox_table(self.metadata)
        self.inbox = inbox if inbox is not None else inbox_table(self.metadata)
        keys = tables.get(f"{self.schema}.sagabus_keys")
        self.keys = keys if keys is not None else signing.keys_table(self.metadata)


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
        if d.upgrade is not None:
            await d.upgrade(engine)


@dataclass(frozen=True)
class Credentials:
    """One service's own broker user and database role, for a process that runs several
    services (``sagabus run all``, the demo): each still publishes as its own user, which the
    consumers check, and touches only its own schema."""

    amqp_url: str
    database_url: str | None = None


#: the dead-letter collector's principal in ``credentials``
DEAD_LETTERS = "dead-letters"


class Runtime:
    def __init__(
        self,
        definitions: Sequence[ServiceDefinition],
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        dead_letters: bool = False,
        credentials: Mapping[str, Credentials] | None = None,
    ) -> None:
        self.definitions = list(definitions)
        self.collect_dead_letters = dead_letters
        self.collector: Collector | None = None
        self.settings = settings
        self.credentials = dict(credentials or {})
        self._own_engine = engine is None
        self.engine = engine or make_engine(settings)
        self.stop_event = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None
        self.consumers: dict[str, Consumer] = {}
        self.relays: dict[str, Relay] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._publishers: list[Publisher] = []
        self._engines: dict[str, AsyncEngine] = {}
        self._connections: dict[str, AbstractRobustConnection] = {}
        self._stopped = False

    def engine_for(self, service: str) -> AsyncEngine:
        """The service's own engine (its database role), or the shared one."""
        if service in self._engines:
            return self._engines[service]
        cred = self.credentials.get(service)
        if cred is None or cred.database_url is None:
            return self.engine
        engine = make_engine(self.settings.model_copy(update={"database_url": cred.database_url}))
        self._engines[service] = engine
        return engine

    async def _connection_for(self, service: str) -> AbstractRobustConnection:
        """The service's own broker connection (its user), or the shared one."""
        cred = self.credentials.get(service)
        if cred is None:
            assert self.connection is not None
            return self.connection
        if service not in self._connections:
            self._connections[service] = await aio_pika.connect_robust(cred.amqp_url)
        return self._connections[service]

    async def start(self) -> None:
        for d in self.definitions:
            await migrate([d], self.engine_for(d.name))
            if d.preflight is not None:
                await d.preflight(self.engine_for(d.name))
        if self.collect_dead_letters:
            await create_schema(
                self.engine_for(DEAD_LETTERS), deadletters.SCHEMA, deadletters.metadata
            )
        await self._warn_pool_budget()
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
            dl_engine = self.engine_for(DEAD_LETTERS)
            self.collector = Collector(dl_engine, telemetry.tracer(deadletters.SERVICE))
            await self.collector.start(await self._connection_for(DEAD_LETTERS), topology.SERVICES)
            self._tasks.append(
                asyncio.create_task(
                    prune_loop(
                        deadletters.SERVICE,
                        dl_engine,
                        None,
                        None,
                        inbox_retention_s=0,
                        outbox_retention_s=0,
                        interval_s=self.settings.retention_interval_s,
                        stop=self.stop_event,
                        rules=deadletters.RETAINED,
                        settings=self.settings,
                    )
                )
            )
        for d in self.definitions:
            tracer = telemetry.tracer(d.name)
            engine = self.engine_for(d.name)
            connection = await self._connection_for(d.name)
            publisher = await Publisher.open(connection)
            self._publishers.append(publisher)
            outbox = Outbox(d.outbox, d.schema)
            relay = Relay(
                service=d.name,
                engine=engine,
                outbox=outbox,
                publisher=publisher,
                settings=self.settings,
                tracer=tracer,
            )
            self.relays[d.name] = relay
            consumer = Consumer(
                service=d.name,
                spec=topology.QUEUES[d.name],
                engine=engine,
                inbox=d.inbox,
                outbox=outbox,
                handlers=d.handlers,
                publisher=publisher,
                settings=self.settings,
                tracer=tracer,
                broker_user=publisher.user,
                signing_key=await signing.load_key(engine, d.keys),
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
                d, self.settings, engine, outbox, publisher, tracer, self.stop_event
            )
            for loop in d.background:
                self._tasks.append(asyncio.create_task(_guard(d.name, loop, ctx)))
            self._tasks.append(
                asyncio.create_task(
                    prune_loop(
                        d.name,
                        engine,
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
            channel = await connection.channel()
            await consumer.start(channel)
            log.info("service_started", service=d.name, queue=topology.QUEUES[d.name].name)

    async def _warn_pool_budget(self) -> None:
        """Every deployable's pool must fit under PostgreSQL's max_connections together."""
        try:
            warning = await check_pool_budget(self.engine, self.settings, deployables=DEPLOYABLES)
        except Exception as e:  # a check, never a reason not to start
            log.debug("db_pool_budget_unknown", error=f"{type(e).__name__}: {e}"[:200])
            return
        if warning:
            log.warning("db_pool_budget_exceeded", warning=warning)

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
        for connection in (*self._connections.values(), self.connection):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        for engine in self._engines.values():
            await engine.dispose()
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
    credentials: Mapping[str, Credentials] | None = None,
) -> Runtime | None:
    """Start a runtime; while PostgreSQL or RabbitMQ cannot be reached (restarting, or not up
    yet), wait and try again instead of exiting. None if ``stop`` is set meanwhile."""
    from messaging.db import ensure_database

    backoff = 0.5
    while not stop.is_set():
        runtime = Runtime(definitions, settings, dead_letters=dead_letters, credentials=credentials)
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


def credentials_from_env(
    services: Sequence[str], environ: Mapping[str, str]
) -> dict[str, Credentials]:
    """``SAGABUS_AMQP_URL_<SERVICE>`` (and ``SAGABUS_DATABASE_URL_<SERVICE>``), as
    ``sagabus provision --output`` writes them, for each of ``services`` that has one."""
    found = {}
    for name in services:
        suffix = name.upper().replace("-", "_")
        amqp = environ.get(f"SAGABUS_AMQP_URL_{suffix}")
        if amqp:
            found[name] = Credentials(amqp, environ.get(f"SAGABUS_DATABASE_URL_{suffix}") or None)
    return found
