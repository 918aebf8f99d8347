"""Shipping service: books a shipment with the (flaky) carrier.

A carrier error that may pass is retried through the delay queues with backoff; after
``shipping_max_attempts`` carrier failures the shipment fails and the process manager
compensates. Only carrier failures count (a header on the retried copy): retries caused by
anything else, a database restart say, do not make a shipment give up.
Before every booking attempt, and before giving up, the service asks the carrier whether it
already booked this idempotency key, so a lost response never turns into a second shipment.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.errors import TransientError
from messaging.retention import RetentionRule
from messaging.service import ServiceContext, ServiceDefinition
from messaging.settings import Settings
from participants.shipping.carrier import (
    Carrier,
    CarrierRejected,
    CarrierResponseLost,
    CarrierUnavailable,
    bookings_table,
)
from schemas.envelope import HeaderNames
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

SCHEMA = "shipping"
metadata = MetaData(schema=SCHEMA)
log = structlog.get_logger("sagabus.shipping")

shipments = Table(
    "shipments",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    #: CREATED | FAILED | CANCELLED (a CANCELLED row with no tracking number is a tombstone)
    Column("status", Text, nullable=False),
    Column("tracking_number", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
bookings = bookings_table(metadata)


#: carrier failures of this CreateShipment so far: set on the copy that goes round the delay
#: queue when the carrier fails, and on no other retry, so that a database outage's retries do not
#: spend the carrier's budget (``shipping_max_attempts``)
CARRIER_ATTEMPTS = HeaderNames.RETRY_STATE_PREFIX + "shipping-carrier-attempts"

_SHIPMENTS = qualified(shipments)
_LOCK = f"SELECT status, tracking_number, reason FROM {_SHIPMENTS} WHERE order_id = $1 FOR UPDATE"
_RECORD = (
    f"INSERT INTO {_SHIPMENTS} (order_id, saga_id, status, tracking_number, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO UPDATE SET"
    " status = EXCLUDED.status, tracking_number = EXCLUDED.tracking_number,"
    " reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at"
)


def _key(ctx: Context) -> str:
    """The carrier booking key: one shipment per saga, whichever attempt asks."""
    return f"{ctx.envelope.saga_id}:shipment"


def carrier_attempts(ctx: Context) -> int:
    """How many deliveries of this command the carrier failed already."""
    value = ctx.incoming.headers.get(CARRIER_ATTEMPTS, 0)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


async def _record(
    ctx: Context,
    pg: asyncpg.Connection,
    order_id: str,
    status: str,
    tracking: str | None,
    reason: str | None,
) -> None:
    await pg.execute(_RECORD, order_id, ctx.envelope.saga_id, status, tracking, reason, ctx.now)


def make_handlers(carrier: Carrier, settings: Settings) -> dict[str, Handler]:
    async def create(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CreateShipment)
        pg = await driver(ctx.conn)
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        if row is not None:
            if row["status"] == "CREATED":
                ctx.reply(
                    ShipmentCreated(order_id=cmd.order_id, tracking_number=row["tracking_number"])
                )
            else:
                reason = row["reason"] or (
                    "cancelled before creation" if row["status"] == "CANCELLED" else "failed"
                )
                ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=reason))
            return
        key = _key(ctx)
        tracking = await carrier.lookup(key)
        if tracking is None:
            try:
                tracking = await carrier.book(key, cmd.order_id, cmd.shipping_address)
            except CarrierRejected as e:
                await _record(ctx, pg, cmd.order_id, "FAILED", None, str(e))
                ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=str(e)))
                return
            except (CarrierUnavailable, CarrierResponseLost) as e:
                tracking = await carrier.lookup(key)
                if tracking is None:
                    # only carrier failures count here, not the delivery's other retries
                    attempts = carrier_attempts(ctx) + 1
                    # Give up on the carrier's budget, or when this is the last delivery the
                    # consumer will make (other retries, a database restart, spent the rest):
                    # the process manager gets an answer either way, not a dead letter.
                    last_delivery = ctx.retries + 1 >= settings.max_attempts
                    if attempts < settings.shipping_max_attempts and not last_delivery:
                        raise TransientError(str(e), headers={CARRIER_ATTEMPTS: attempts}) from e
                    reason = f"carrier failed {attempts} times: {e}"
                    await _record(ctx, pg, cmd.order_id, "FAILED", None, reason)
                    ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=reason))
                    return
                log.info("carrier_outcome_resolved", tracking_number=tracking, error=str(e))
        await _record(ctx, pg, cmd.order_id, "CREATED", tracking, None)
        ctx.reply(ShipmentCreated(order_id=cmd.order_id, tracking_number=tracking))

    async def cancel(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CancelShipment)
        pg = await driver(ctx.conn)
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        # Whatever our row says, the carrier may hold a booking whose answer was lost.
        had = await carrier.cancel(_key(ctx))
        if row is None:
            await _record(ctx, pg, cmd.order_id, "CANCELLED", None, "cancelled before creation")
        elif row["status"] == "CREATED":
            await _record(ctx, pg, cmd.order_id, "CANCELLED", row["tracking_number"], "cancelled")
            had = True
        ctx.reply(ShipmentCancelled(order_id=cmd.order_id, had_shipment=had))

    return {CreateShipment.TYPE: create, CancelShipment.TYPE: cancel}


def carrier_pool_owner(carrier: Carrier) -> Callable[[ServiceContext], Awaitable[None]]:
    """A background "loop" that owns the carrier's connection pool for the life of the service:
    the runtime cancels its loops after the consumer has stopped, and then the pool is closed."""

    async def carrier_pool(_: ServiceContext) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await carrier.close()

    return carrier_pool


def definition(settings: Settings, *, rng: random.Random | None = None) -> ServiceDefinition:
    carrier = Carrier(
        bookings,
        dsn=settings.asyncpg_url,
        failure_rate=settings.carrier_failure_rate,
        lose_response_rate=settings.carrier_lose_response_rate,
        latency_ms=settings.carrier_latency_ms,
        rng=rng,
    )
    return ServiceDefinition(
        "shipping",
        SCHEMA,
        metadata,
        make_handlers(carrier, settings),
        background=(carrier_pool_owner(carrier),),
        # shipments and the simulated carrier's bookings (its memory of idempotency keys)
        retained=(
            RetentionRule(shipments, "updated_at", "participant_retention_s"),
            RetentionRule(bookings, "created_at", "participant_retention_s"),
        ),
    )
