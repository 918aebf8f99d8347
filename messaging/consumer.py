"""The consumer: one delivery, one transaction, then the ack.

For each delivery: decode and validate (a permanent failure dead-letters it at once); open a
transaction; record the message id in the inbox (a conflict means it was processed already:
ack and stop); run the handler, which changes state and queues outgoing messages; write those
to the outbox; commit; ack. A transient failure sends the message to a delay queue (with its
retry count) and acks the original; after ``max_attempts`` it is dead-lettered instead. Dead
letters keep body, properties and trace headers and gain headers that say why.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from sqlalchemy import Table, exc
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging import telemetry
from messaging.codec import Incoming, decode
from messaging.errors import ConcurrencyConflict, PermanentError, TransientError
from messaging.outbox import Outbox, OutgoingMessage
from messaging.publisher import Publisher
from messaging.settings import Settings
from messaging.topology import (
    DEAD_LETTER_EXCHANGE,
    RETRY_TIERS,
    QueueSpec,
    fact_route,
    reply_route,
)
from schemas.base import Message
from schemas.envelope import Envelope, HeaderNames

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
        )
        self.outgoing.append(OutgoingMessage(env, body, exchange, key))


Handler = Callable[[Context], Awaitable[None]]


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
    return isinstance(e, OSError | asyncio.TimeoutError | ConnectionError)


def _where(e: BaseException) -> str:
    """file:line of the innermost frame: enough to find a bug without a slow, huge traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"


def _retries(delivery: AbstractIncomingMessage) -> int:
    value = dict(delivery.headers or {}).get(HeaderNames.RETRY_COUNT, 0)
    try:
        return int(value) if isinstance(value, int | str | bytes) else 0
    except ValueError:
        return 0


def _jittered(delay_ms: int, jitter: float) -> int:
    return max(1, int(delay_ms * (1 + random.uniform(-jitter, jitter))))


class Consumer:
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
    ) -> None:
        self.service = service
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
        }
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, channel: aio_pika.abc.AbstractChannel) -> None:
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        self._queue = await channel.get_queue(self.spec.name, ensure=False)
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
                incoming = decode(delivery, max_bytes=self.settings.max_message_bytes)
                handler = self.handlers.get(incoming.envelope.type)
                if handler is None:
                    raise PermanentError(
                        f"no handler for {incoming.envelope.type} on queue {self.spec.name}"
                    )
            except PermanentError as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.dead_letter(delivery, e)
                return
            except Exception as e:  # a decoder surprise is still this message's fault
                span.record_exception(e)
                await self.dead_letter(
                    delivery, PermanentError(f"undecodable: {type(e).__name__}: {e}"[:500])
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
            await self._process(delivery, incoming, handler, span)

    async def _process(
        self,
        delivery: AbstractIncomingMessage,
        incoming: Incoming,
        handler: Handler,
        span: trace.Span,
    ) -> None:
        for conflict_try in range(CONFLICT_RETRIES + 1):
            try:
                duplicate = await self._transaction(incoming, handler, _retries(delivery))
            except ConcurrencyConflict as e:
                if conflict_try < CONFLICT_RETRIES:
                    await asyncio.sleep(random.uniform(0.005, 0.05) * (conflict_try + 1))
                    continue
                await self.retry_later(delivery, e)
                return
            except PermanentError as e:
                span.set_status(trace.StatusCode.ERROR, str(e))
                await self.dead_letter(delivery, e)
                return
            except Exception as e:
                span.record_exception(e)
                if isinstance(e, TransientError) or is_transient_db_error(e):
                    await self.retry_later(delivery, e)
                else:
                    # An unexpected error (a bug, a surprise from a library): retry a bounded
                    # number of times like a transient one, then dead-letter with the reason.
                    log.error(
                        "handler_failed",
                        error=f"{type(e).__name__}: {str(e)[:500]}",
                        where=_where(e),
                    )
                    await self.retry_later(delivery, e)
                return
            break
        self.outbox.committed()
        await delivery.ack()
        if duplicate:
            self.counts["duplicates"] += 1
            span.set_attribute("sagabus.duplicate", True)
            log.info("duplicate_ignored")
        else:
            self.counts["processed"] += 1
            log.debug("message_processed")

    async def _transaction(self, incoming: Incoming, handler: Handler, retries: int) -> bool:
        env = incoming.envelope
        async with self.engine.begin() as conn:
            claimed = await conn.execute(
                insert(self.inbox)
                .values(message_id=env.message_id, message_type=env.type, saga_id=env.saga_id)
                .on_conflict_do_nothing(index_elements=["message_id"])
            )
            if claimed.rowcount == 0:
                return True
            ctx = Context(conn, incoming, self.service, retries=retries)
            await handler(ctx)
            await self.outbox.write(conn, ctx.outgoing)
        return False

    # -- failure routes ----------------------------------------------------------------------

    def _copy(self, delivery: AbstractIncomingMessage, extra: dict[str, Any]) -> aio_pika.Message:
        headers = dict(delivery.headers or {})
        headers.update(extra)
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
            user_id=None,
            app_id=delivery.app_id,
        )

    def _reason_headers(
        self, delivery: AbstractIncomingMessage, e: BaseException
    ) -> dict[str, Any]:
        headers = dict(delivery.headers or {})
        return {
            HeaderNames.ERROR_CLASS: type(e).__name__,
            HeaderNames.ERROR_MESSAGE: str(e)[:1000] or type(e).__name__,
            HeaderNames.FAILED_QUEUE: self.spec.name,
            # a message that went round a delay queue keeps its first exchange and routing key
            HeaderNames.ORIGINAL_EXCHANGE: headers.get(
                HeaderNames.ORIGINAL_EXCHANGE, delivery.exchange or ""
            ),
            HeaderNames.ORIGINAL_ROUTING_KEY: headers.get(
                HeaderNames.ORIGINAL_ROUTING_KEY, delivery.routing_key or ""
            ),
            HeaderNames.FAILED_AT: datetime.now(UTC).isoformat(),
        }

    async def dead_letter(
        self, delivery: AbstractIncomingMessage, e: BaseException, *, kind: str = "permanent"
    ) -> None:
        extra = self._reason_headers(delivery, e)
        extra[HeaderNames.FAILURE_KIND] = kind
        extra[HeaderNames.RETRY_COUNT] = _retries(delivery)
        await self.publisher.publish(
            DEAD_LETTER_EXCHANGE, self.spec.name, self._copy(delivery, extra)
        )
        await delivery.ack()
        self.counts["dead_lettered"] += 1
        log.warning(
            "message_dead_lettered",
            error_class=type(e).__name__,
            error=str(e)[:500],
            failure_kind=kind,
        )

    async def retry_later(self, delivery: AbstractIncomingMessage, e: BaseException) -> None:
        retries = _retries(delivery)
        if retries + 1 >= self.settings.max_attempts:
            await self.dead_letter(delivery, e, kind="retries_exhausted")
            return
        delays = self.settings.retry_delays_ms
        tier = min(retries, len(delays) - 1, RETRY_TIERS - 1)
        delay = _jittered(delays[min(retries, len(delays) - 1)], self.settings.retry_jitter)
        extra = self._reason_headers(delivery, e)
        extra[HeaderNames.RETRY_COUNT] = retries + 1
        message = self._copy(delivery, extra)
        message.expiration = delay / 1000
        await self.publisher.publish("", self.spec.retry_queue(tier + 1), message)
        await delivery.ack()
        self.counts["retried"] += 1
        log.info(
            "message_retry_scheduled",
            error_class=type(e).__name__,
            error=str(e)[:300],
            retry=retries + 1,
            delay_ms=delay,
        )
