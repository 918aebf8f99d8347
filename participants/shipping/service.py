"""Shipping service: books a shipment with the (flaky) carrier.

A carrier error that may pass is retried through the delay queues with backoff; after
``shipping_max_attempts`` deliveries the shipment fails and the process manager compensates.
Before every booking attempt, and before giving up, the service asks the carrier whether it
already booked this idempotency key, so a lost response never turns into a second shipment.
"""

from __future__ import annotations

import random

import structlog
from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid, select
from sqlalchemy.dialects.postgresql import insert

from messaging.consumer import Context, Handler
from messaging.errors import TransientError
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from participants.shipping.carrier import (
    Carrier,
    CarrierRejected,
    CarrierResponseLost,
    CarrierUnavailable,
    bookings_table,
)
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


def _key(ctx: Context) -> str:
    """The carrier booking key: one shipment per saga, whichever attempt asks."""
    return f"{ctx.envelope.saga_id}:shipment"


async def _record(
    ctx: Context, order_id: str, status: str, tracking: str | None, reason: str | None
) -> None:
    stmt = insert(shipments).values(
        order_id=order_id,
        saga_id=ctx.envelope.saga_id,
        status=status,
        tracking_number=tracking,
        reason=reason,
        updated_at=ctx.now,
    )
    await ctx.conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["order_id"],
            set_={
                "status": status,
                "tracking_number": tracking,
                "reason": reason,
                "updated_at": ctx.now,
            },
        )
    )


def make_handlers(carrier: Carrier, settings: Settings) -> dict[str, Handler]:
    async def create(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CreateShipment)
        row = (
            await ctx.conn.execute(
                select(shipments).where(shipments.c.order_id == cmd.order_id).with_for_update()
            )
        ).first()
        if row is not None:
            if row.status == "CREATED":
                ctx.reply(
                    ShipmentCreated(order_id=cmd.order_id, tracking_number=row.tracking_number)
                )
            else:
                reason = row.reason or (
                    "cancelled before creation" if row.status == "CANCELLED" else "failed"
                )
                ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=reason))
            return
        engine = ctx.conn.engine
        key = _key(ctx)
        tracking = await carrier.lookup(engine, key)
        if tracking is None:
            try:
                tracking = await carrier.book(engine, key, cmd.order_id, cmd.shipping_address)
            except CarrierRejected as e:
                await _record(ctx, cmd.order_id, "FAILED", None, str(e))
                ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=str(e)))
                return
            except (CarrierUnavailable, CarrierResponseLost) as e:
                tracking = await carrier.lookup(engine, key)
                if tracking is None:
                    if ctx.retries + 1 < settings.shipping_max_attempts:
                        raise TransientError(str(e)) from e
                    reason = f"carrier failed {ctx.retries + 1} times: {e}"
                    await _record(ctx, cmd.order_id, "FAILED", None, reason)
                    ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=reason))
                    return
                log.info("carrier_outcome_resolved", tracking_number=tracking, error=str(e))
        await _record(ctx, cmd.order_id, "CREATED", tracking, None)
        ctx.reply(ShipmentCreated(order_id=cmd.order_id, tracking_number=tracking))

    async def cancel(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CancelShipment)
        row = (
            await ctx.conn.execute(
                select(shipments).where(shipments.c.order_id == cmd.order_id).with_for_update()
            )
        ).first()
        engine = ctx.conn.engine
        key = _key(ctx)
        # Whatever our row says, the carrier may hold a booking whose answer was lost.
        had = await carrier.cancel(engine, key)
        if row is None:
            await _record(ctx, cmd.order_id, "CANCELLED", None, "cancelled before creation")
        elif row.status == "CREATED":
            await _record(ctx, cmd.order_id, "CANCELLED", row.tracking_number, "cancelled")
            had = True
        ctx.reply(ShipmentCancelled(order_id=cmd.order_id, had_shipment=had))

    return {CreateShipment.TYPE: create, CancelShipment.TYPE: cancel}


def definition(settings: Settings, *, rng: random.Random | None = None) -> ServiceDefinition:
    carrier = Carrier(
        bookings,
        failure_rate=settings.carrier_failure_rate,
        lose_response_rate=settings.carrier_lose_response_rate,
        latency_ms=settings.carrier_latency_ms,
        rng=rng,
    )
    return ServiceDefinition("shipping", SCHEMA, metadata, make_handlers(carrier, settings))
