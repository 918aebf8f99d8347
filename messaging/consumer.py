"""The consumer: one delivery, one transaction, then the ack.

For each delivery: decode and validate (a permanent failure dead-letters it at once); open a
transaction; record the message id in the inbox (a conflict means it was processed already:
ack and stop); run the handler, which changes state and queues outgoing messages; write those
to the outbox; commit; ack. A transient failure sends the message to its own delay queue
(through the retry exchange, with its retry count) and acks the original; after
``max_attempts`` it is dead-lettered instead. Dead letters keep body, properties and trace
headers and gain headers that say why.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from pydantic import ValidationError
from sqlalchemy import Table, exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import signing, telemetry, trust
from messaging.codec import Incoming, decode, summarize
from messaging.db import driver, qualified
from messaging.errors import ConcurrencyConflict, PermanentError, TransientError
from messaging.metrics import metrics
from messaging.outbox import Outbox, OutgoingMessage
from messaging.publisher import Publisher
from messaging.settings import Settings
from messaging.topology import (
    RETRY_TIERS,
    QueueSpec,
    dead_letter_route,
    fact_route,
    reply_route,
    retry_route,
)
from schemas.base import Message
from schemas.envelope import Envelope, HeaderNames
from schemas.registry import REGISTRY

log = structlog.get_logger("sagabus.consumer")

#: immediate in-process retries of an optimistic-concurrency conflict before the delay queue
CONFLICT_RETRIES = 5


class Context:
    """What a handler gets: the open transaction, the message, and ways to send messages that
    are written to the outbox in the same transaction."""

    def __init__(
        self, conn: AsyncConnection, incoming: Incoming, service: str, *, retries: int = 0
    ) -> None:
        self.conn = conn
        self.incoming = incoming
        self.service = service
        #: how many times this delivery already failed transiently and came back from a delay queue
        self.retries = retries
        self.outgoing: list[OutgoingMessage] = []
        self.now = datetime.now(UTC)
        #: what the handler's ``prepare`` step returned (see ``TwoPhase``), if it has one
        self.prepared: Any = None
        #: set by ``reject_after_commit``
        self.rejection: PermanentError | None = None

    def reject_after_commit(self, error: PermanentError) -> None:
        """Commit what the handler wrote (a history note, the inbox row), then dead-letter the
        delivery with ``error`` as its reason instead of just acking it: a message refused on
        the merits, whose refusal must be remembered."""
        self.rejection = error

    @property
    def envelope(self) -> Envelope:
        return self.incoming.envelope

    def _trace_headers(self) -> dict[str, str | None]:
        carrier = telemetry.inject()
        return {
            "traceparent": carrier.get("traceparent"),
            "tracestate": carrier.get("tracestate"),
            "baggage": carrier.get("baggage"),
        }

    def derived_envelope(self, body: Message, *, message_id: uuid.UUID | None = None) -> Envelope:
        """An envelope caused by the message being handled. The id is derived from the incoming
        message id and the type, so handling the same message twice emits the same id."""
        env = self.envelope
        return Envelope(
            message_id=message_id or uuid.uuid5(env.message_id, body.TYPE),
            type=body.TYPE,
            saga_id=env.saga_id,
            correlation_id=env.correlation_id,
            causation_id=env.message_id,
            idempotency_key=env.idempotency_key,
            step=env.step,
            attempt=env.attempt,
            fence=env.fence,
            reply_token=env.reply_token,
            occurred_at=self.now,
            **self._trace_headers(),
        )

    def reply(self, body: Message) -> None:
        """Answer the process manager (the fence and step of the command are echoed)."""
        exchange, key = reply_route(body.TYPE)
        self.outgoing.append(OutgoingMessage(self.derived_envelope(body), body, exchange, key))

    def publish_fact(self, body: Message) -> None:
        exchange, key = fact_route(body.TYPE)
        env = self.derived_envelope(
            body, message_id=uuid.uuid5(self.envelope.message_id, f"fact:{body.TYPE}")
        ).model_copy(update={"reply_token": None})  # a public fact answers no dispatch
        self.outgoing.append(OutgoingMessage(env, body, exchange, key))


Handler = Callable[[Context], Awaitable[None]]


@dataclass(frozen=True)
class Preparation:
    """What a handler's ``prepare`` step gets: it runs before the message's transaction and
    outside any transaction (for a slow external call), so it may run again for a duplicate."""

    incoming: Incoming
    retries: int
    engine: AsyncEngine


@dataclass(frozen=True)
class TwoPhase:
    """A handler with a step that runs before its transaction, outside it: an external call
    (the carrier) that must not hold a transaction shared with other deliveries, nor a database
    connection, while it waits. Its result is ``ctx.prepared`` in ``apply``. ``prepare`` must be
    idempotent (a duplicate delivery, or a retry, runs it again)."""

    prepare: Callable[[Preparation], Awaitable[Any]]
    apply: Handler

    async def __call__(self, ctx: Context) -> None:
        await self.apply(ctx)


@dataclass(frozen=True)
class _Result:
    duplicate: bool
    #: the handler refused the message on the merits after its writes (``reject_after_commit``)
    rejection: PermanentError | None = None


_DUPLICATE = _Result(True)
_DONE = _Result(False)


def is_transient_db_error(e: BaseException) -> bool:
    if isinstance(e, exc.DBAPIError):
        if e.connection_invalidated:
            return True
        orig = getattr(e.orig, "__cause__", None) or e.orig
        return isinstance(
            orig,
            asyncpg.SerializationError
            | asyncpg.DeadlockDetectedError
            | asyncpg.CannotConnectNowError
            | asyncpg.TooManyConnectionsError
            | asyncpg.AdminShutdownError
            | asyncpg.LockNotAvailableError,
        ) or isinstance(e, exc.OperationalError | exc.InterfaceError)
    # statements run on the asyncpg connection itself (the hot paths) raise asyncpg's errors
    return isinstance(
        e,
        OSError
        | asyncio.TimeoutError
        | ConnectionError
        | asyncpg.SerializationError
        | asyncpg.DeadlockDetectedError
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError
        | asyncpg.AdminShutdownError
        | asyncpg.LockNotAvailableError
        | asyncpg.PostgresConnectionError
        | asyncpg.ConnectionDoesNotExistError,
    )


def _where(e: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug without a slow, huge traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


async def _call(handler: Handler, ctx: Context) -> None:
    await handler(ctx)


def _jittered(delay_ms: int, jitter: float) -> int:
    return max(1, int(delay_ms * (1 + random.uniform(-jitter, jitter))))


@dataclass
class _Work:
    """A decoded delivery waiting for its transaction."""

    incoming: Incoming
    handler: Handler
    retries: int
    prepared: Any
    #: the delivery's context (its CONSUMER span, its log fields): the handler runs in it
    context: contextvars.Context
    #: the outcome once processed; or the handler's exception
    done: asyncio.Future[_Result]


class Consumer:
    """Consumes one work queue.

    Deliveries that are waiting at the same time share one transaction (at most
    ``consumer_batch`` of them; at most ``consumer_transactions`` transactions at once): one
    inbox insert claims them all, each handler runs in turn on the same connection, one insert
    writes every outgoing message, one commit, then each delivery is acked. Each message is still
    all-or-nothing with its inbox row and its outbox rows, and acked only after the commit. If
    anything in a shared transaction fails, it is rolled back and its messages are handled again
    one transaction each, so that one message's failure (a conflict, a permanent error) is
    handled for that message alone.
    """

    def __init__(
        self,
        *,
        service: str,
        spec: QueueSpec,
        engine: AsyncEngine,
        inbox: Table,
        outbox: Outbox,
        handlers: dict[str, Handler],
        publisher: Publisher,
        settings: Settings,
        tracer: trace.Tracer,
        broker_user: str | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        self.service = service
        #: signs what this consumer writes on its failure routes, checks it when it comes back
        self.signing_key = signing_key
        #: this service's own broker user (the ``user_id`` of everything it publishes)
        self.broker_user = broker_user
        #: provisioned users' prefix: senders are checked; None: they are not (``guest``)
        self.sender_prefix = (
            trust.sender_prefix(broker_user, service) if broker_user is not None else None
        )
        self.spec = spec
        self.engine = engine
        self.inbox = inbox
        self.outbox = outbox
        self.handlers = handlers
        self.publisher = publisher
        self.settings = settings
        self.tracer = tracer
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.counts: dict[str, int] = {
            "processed": 0,
            "duplicates": 0,
            "retried": 0,
            "dead_lettered": 0,
            "rejected_security": 0,
        }
        #: database transactions run (fewer than messages when deliveries share one)
        self.transactions = 0
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._pending: list[_Work] = []
        self._flushers = 0
        self._flush_tasks: set[asyncio.Task[None]] = set()
        q = qualified(inbox)
        # Plain SQL on asyncpg, one prepared statement for any batch size (SQLAlchemy 2.0
        # compiles PostgreSQL's INSERT .. ON CONFLICT anew on every call).
        self._claim_sql = (
            f"INSERT INTO {q} (message_id, message_type, saga_id)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[])"
            " ON CONFLICT (message_id, message_type) DO NOTHING RETURNING message_id, message_type"
        )

    async def start(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        # A passive declare (no permission needed) registers the queue with a robust channel,
        # which then restores this consumer after a reconnect; get_queue(ensure=False) does not.
        self._queue = await channel.declare_queue(self.spec.name, passive=True)
        self._tag = await self._queue.consume(self.on_message)

    async def stop(self, timeout: float = 15) -> None:
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception:  # connection already gone: the broker requeues unacked messages
                pass
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            log.warning("consumer_stop_timeout", service=self.service, in_flight=self.in_flight)
        log.info(
            "consumer_stopped", service=self.service, transactions=self.transactions, **self.counts
        )

    async def on_message(self, delivery: AbstractIncomingMessage) -> None:
        self.in_flight += 1
        self.idle.clear()
        try:
            await self._on_message(delivery)
        except Exception as e:  # never let a delivery escape unsettled while the channel lives
            log.error(
                "delivery_unsettled",
                service=self.service,
                error=f"{type(e).__name__}: {e}",
                message_id=delivery.message_id,
            )
            try:
                await delivery.nack(requeue=True)
            except Exception:
                pass
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _on_message(self, delivery: AbstractIncomingMessage) -> None:
        structlog.contextvars.clear_contextvars()
        headers = dict(delivery.headers or {})
        parent = telemetry.extract(headers)
        parent_span_ctx = trace.get_current_span(parent).get_span_context()
        links = [trace.Link(parent_span_ctx)] if parent_span_ctx.is_valid else []
        with self.tracer.start_as_current_span(
            f"process {self.spec.name}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes=telemetry.messaging_attributes(
                "process",
                destination=delivery.exchange or "",
                routing_key=delivery.routing_key or "",
                message_id=delivery.message_id or "",
                conversation_id=delivery.correlation_id or "",
                body_size=len(delivery.body),
                message_type=delivery.type or "",
                extra={
                    "messaging.consumer.group.name": self.spec.name,
                    "sagabus.service": self.service,
                },
            ),
        ) as span:
            structlog.contextvars.bind_contextvars(
                service=self.service,
                queue=self.spec.name,
                message_id=delivery.message_id,
                message_type=delivery.type,
                **telemetry.trace_ids(),
            )
            try:
                arrived = trust.arrival(
                    delivery,
                    self.spec.name,
                    own_user=self.broker_user,
                    max_retries=self.settings.max_attempts,
                    key=self.signing_key,
                )
            except trust.Forbidden as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.reject(delivery, trust.as_received(delivery), e)
                return
            try:
                if delivery.type in REGISTRY:  # judged by its route before its body is read
                    trust.check(
                        arrived, self.spec.name, delivery.type, sender_prefix=self.sender_prefix
                    )
                incoming = decode(
                    delivery,
                    max_bytes=self.settings.max_message_bytes,
                    headers=arrived.headers,
                    start=arrived.start,
                )
                handler = self.handlers.get(incoming.envelope.type)
                if handler is None:
                    raise PermanentError(
                        f"no handler for {incoming.envelope.type} on queue {self.spec.name}"
                    )
            except trust.Forbidden as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.reject(delivery, arrived, e)
                return
            except PermanentError as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.dead_letter(delivery, arrived, e)
                return
            except Exception as e:  # a decoder surprise is still this message's fault
                span.record_exception(e)
                await self.dead_letter(
                    delivery, arrived, PermanentError(f"undecodable: {type(e).__name__}: {e}"[:500])
                )
                return
            env = incoming.envelope
            span.set_attribute("sagabus.saga.id", str(env.saga_id))
            if env.step:
                span.set_attribute("sagabus.saga.step", env.step)
            span.set_attribute("sagabus.saga.fence", env.fence)
            structlog.contextvars.bind_contextvars(
                saga_id=str(env.saga_id),
                correlation_id=str(env.correlation_id),
                causation_id=str(env.causation_id) if env.causation_id else None,
                step=env.step,
                attempt=env.attempt,
            )
            await self._process(delivery, arrived, incoming, handler, span)

    async def _process(
        self,
        delivery: AbstractIncomingMessage,
        arrived: trust.Arrival,
        incoming: Incoming,
        handler: Handler,
        span: trace.Span,
    ) -> None:
        prepared: Any = None
        for conflict_try in range(CONFLICT_RETRIES + 1):
            try:
                if isinstance(handler, TwoPhase) and conflict_try == 0:
                    # outside any transaction: a slow call delays this delivery only
                    prepared = await handler.prepare(
                        Preparation(incoming, arrived.retries, self.engine)
                    )
                result = await self._submit(incoming, handler, arrived.retries, prepared)
            except ConcurrencyConflict as e:
                if conflict_try < CONFLICT_RETRIES:
                    await asyncio.sleep(random.uniform(0.005, 0.05) * (conflict_try + 1))
                    continue
                await self.retry_later(delivery, arrived, e)
                return
            except PermanentError as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.dead_letter(delivery, arrived, e)
                return
            except ValidationError as e:
                # a message the handler built from this one is invalid: retrying cannot help
                span.set_status(trace.StatusCode.ERROR, "invalid message built")
                await self.dead_letter(
                    delivery,
                    arrived,
                    PermanentError(f"the handler built an invalid {e.title}: {summarize(e)}"),
                )
                return
            except Exception as e:
                span.record_exception(e)
                if isinstance(e, TransientError) or is_transient_db_error(e):
                    await self.retry_later(delivery, arrived, e)
                else:
                    # An unexpected error (a bug, a surprise from a library): retry a bounded
                    # number of times like a transient one, then dead-letter with the reason.
                    log.error(
                        "handler_failed",
                        error=f"{type(e).__name__}: {str(e)[:500]}",
                        where=_where(e),
                    )
                    await self.retry_later(delivery, arrived, e)
                return
            break
        if result.rejection is not None:
            span.set_status(trace.StatusCode.ERROR, str(result.rejection))
            self.counts["processed"] += 1
            await self.dead_letter(delivery, arrived, result.rejection)
            return
        await delivery.ack()
        if result.duplicate:
            self.counts["duplicates"] += 1
            span.set_attribute("sagabus.duplicate", True)
            log.info("duplicate_ignored")
        else:
            self.counts["processed"] += 1
            log.debug("message_processed")

    async def _submit(
        self, incoming: Incoming, handler: Handler, retries: int, prepared: Any = None
    ) -> _Result:
        """Run the message's transaction, shared with the deliveries waiting with it."""
        if self.settings.consumer_batch <= 1:
            return await self._transaction(incoming, handler, retries, prepared)
        loop = asyncio.get_running_loop()
        work = _Work(
            incoming, handler, retries, prepared, contextvars.copy_context(), loop.create_future()
        )
        self._pending.append(work)
        if self._flushers < self.settings.consumer_transactions:
            self._flushers += 1
            task = asyncio.create_task(self._flush())
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)
        return await work.done

    async def _flush(self) -> None:
        # Started from a delivery's task, this runs after the other deliveries that arrived with
        # it have queued their work, so a burst of deliveries becomes one transaction. Another
        # transaction starts for deliveries that arrive while this one runs (at most
        # consumer_transactions at once): every transaction costs BEGIN, the inbox claim, the
        # outbox insert and COMMIT, so fewer, fuller ones cost less per message.
        try:
            while self._pending:
                size = self.settings.consumer_batch
                batch = [w for w in self._pending[:size] if not w.done.done()]
                del self._pending[:size]
                if batch:
                    await self._run(batch)
        finally:
            self._flushers -= 1

    async def _run(self, batch: list[_Work]) -> None:
        loop = asyncio.get_running_loop()
        if len(batch) > 1:
            try:
                results = await self._transaction_many(batch)
            except asyncio.CancelledError:
                for w in batch:
                    w.done.cancel()
                raise
            except Exception as e:
                log.debug(
                    "batch_rolled_back",
                    service=self.service,
                    size=len(batch),
                    error=f"{type(e).__name__}: {str(e)[:200]}",
                )
            else:
                for w, result in zip(batch, results, strict=True):
                    if not w.done.done():
                        w.done.set_result(result)
                return
        for i, w in enumerate(batch):
            try:
                result = await loop.create_task(
                    self._transaction(w.incoming, w.handler, w.retries, w.prepared),
                    context=w.context,
                )
            except asyncio.CancelledError:
                for rest in batch[i:]:
                    rest.done.cancel()
                raise
            except Exception as e:
                if not w.done.done():
                    w.done.set_exception(e)
            else:
                if not w.done.done():
                    w.done.set_result(result)

    async def _claim(
        self, conn: AsyncConnection, envelopes: Sequence[Envelope]
    ) -> set[tuple[str, str]]:
        """Insert the inbox rows; the (message id as text, type) keys that were new."""
        pg = await driver(conn)
        records = await pg.fetch(
            self._claim_sql,
            [e.message_id for e in envelopes],
            [e.type for e in envelopes],
            [e.saga_id for e in envelopes],
        )
        return {(str(r[0]), r[1]) for r in records}

    async def _transaction(
        self, incoming: Incoming, handler: Handler, retries: int, prepared: Any = None
    ) -> _Result:
        env = incoming.envelope
        self.transactions += 1
        async with self.engine.begin() as conn:
            if not await self._claim(conn, [env]):
                return _DUPLICATE
            ctx = Context(conn, incoming, self.service, retries=retries)
            ctx.prepared = prepared
            await handler(ctx)
            rows = await self.outbox.write(conn, ctx.outgoing, notify=False)
        if rows:
            self.outbox.committed(rows)  # this process's relay publishes them now
        return _Result(False, ctx.rejection) if ctx.rejection is not None else _DONE

    async def _transaction_many(self, batch: list[_Work]) -> list[_Result]:
        loop = asyncio.get_running_loop()
        duplicates: list[_Result] = []
        outgoing: list[OutgoingMessage] = []
        self.transactions += 1
        async with self.engine.begin() as conn:
            claimed = await self._claim(conn, [w.incoming.envelope for w in batch])
            for w in batch:
                env = w.incoming.envelope
                key = (str(env.message_id), env.type)
                if key not in claimed:  # processed before, or twice in this batch
                    duplicates.append(_DUPLICATE)
                    continue
                claimed.discard(key)
                ctx = Context(conn, w.incoming, self.service, retries=w.retries)
                ctx.prepared = w.prepared
                # in the delivery's own context, so its span and log fields are the current ones
                await loop.create_task(_call(w.handler, ctx), context=w.context)
                outgoing.extend(ctx.outgoing)
                duplicates.append(_Result(False, ctx.rejection) if ctx.rejection else _DONE)
            rows = await self.outbox.write(conn, outgoing, notify=False)
        if rows:
            self.outbox.committed(rows)  # this process's relay publishes them now
        return duplicates

    # -- failure routes ----------------------------------------------------------------------

    def _copy(
        self,
        delivery: AbstractIncomingMessage,
        arrived: trust.Arrival,
        extra: dict[str, Any],
        purpose: signing.Purpose,
    ) -> aio_pika.Message:
        """A copy for a failure route: the believed headers, where it first came from and who
        first sent it (the copy is published by this service's own user), signed with this
        service's key."""
        headers = dict(arrived.headers)
        headers[HeaderNames.ORIGINAL_EXCHANGE] = arrived.route.exchange
        headers[HeaderNames.ORIGINAL_ROUTING_KEY] = arrived.route.routing_key
        if arrived.sender is not None:
            headers[HeaderNames.ORIGINAL_USER_ID] = arrived.sender
        else:
            headers.pop(HeaderNames.ORIGINAL_USER_ID, None)
        headers.update(extra)
        headers.pop(HeaderNames.DEAD_LETTERED_BY, None)
        headers.pop(HeaderNames.SIGNATURE, None)
        if self.signing_key is not None:
            headers[HeaderNames.SIGNATURE] = signing.signature(
                self.signing_key,
                purpose,
                queue=self.spec.name,
                message_id=delivery.message_id,
                message_type=delivery.type,
                body=delivery.body,
                headers=headers,
            )
        return aio_pika.Message(
            body=delivery.body,
            headers=headers,
            content_type=delivery.content_type,
            content_encoding=delivery.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=delivery.priority,
            correlation_id=delivery.correlation_id,
            reply_to=delivery.reply_to,
            message_id=delivery.message_id,
            timestamp=delivery.timestamp,
            type=delivery.type,
            user_id=None,  # the publisher sets this service's own user
            app_id=delivery.app_id,
        )

    def _reason_headers(self, e: BaseException) -> dict[str, Any]:
        return {
            HeaderNames.ERROR_CLASS: type(e).__name__,
            HeaderNames.ERROR_MESSAGE: str(e)[:1000] or type(e).__name__,
            HeaderNames.FAILED_QUEUE: self.spec.name,
            HeaderNames.FAILED_AT: datetime.now(UTC).isoformat(),
        }

    async def reject(
        self, delivery: AbstractIncomingMessage, arrived: trust.Arrival, e: trust.Forbidden
    ) -> None:
        """A security event: dead-lettered with its reason, logged and counted."""
        self.counts["rejected_security"] += 1
        metrics().rejected_security.labels(self.service, e.metric_reason).inc()
        log.warning(
            "message_rejected_security",
            reason=e.reason,
            error=str(e)[:500],
            exchange=delivery.exchange,
            routing_key=delivery.routing_key,
            user_id=delivery.user_id,
        )
        await self.dead_letter(delivery, arrived, e, kind="security")

    async def dead_letter(
        self,
        delivery: AbstractIncomingMessage,
        arrived: trust.Arrival,
        e: BaseException,
        *,
        kind: str = "permanent",
    ) -> None:
        extra = self._reason_headers(e)
        extra[HeaderNames.FAILURE_KIND] = kind
        extra[HeaderNames.RETRY_COUNT] = arrived.retries
        exchange, key = dead_letter_route(self.spec.name)
        await self.publisher.publish(
            exchange, key, self._copy(delivery, arrived, extra, "dead-letter")
        )
        await delivery.ack()
        self.counts["dead_lettered"] += 1
        log.warning(
            "message_dead_lettered",
            error_class=type(e).__name__,
            error=str(e)[:500],
            failure_kind=kind,
        )

    async def retry_later(
        self, delivery: AbstractIncomingMessage, arrived: trust.Arrival, e: BaseException
    ) -> None:
        retries = arrived.retries
        if retries + 1 >= self.settings.max_attempts:
            await self.dead_letter(delivery, arrived, e, kind="retries_exhausted")
            return
        delays = self.settings.retry_delays_ms
        step = min(retries, len(delays) - 1)
        tier = min(step, RETRY_TIERS - 1)
        delay = _jittered(delays[step], self.settings.retry_jitter)
        extra: dict[str, Any] = dict(e.headers) if isinstance(e, TransientError) else {}
        extra.update(self._reason_headers(e))
        extra[HeaderNames.RETRY_COUNT] = retries + 1
        message = self._copy(delivery, arrived, extra, "retry")
        message.expiration = delay / 1000
        await self.publisher.publish(*retry_route(self.spec, tier + 1), message)
        await delivery.ack()
        self.counts["retried"] += 1
        log.info(
            "message_retry_scheduled",
            error_class=type(e).__name__,
            error=str(e)[:300],
            retry=retries + 1,
            delay_ms=delay,
        )
