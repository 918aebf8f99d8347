"""Order service: orders and their user-visible status.

Commands are idempotent by order id: a re-sent command gets the reply that matches the order's
current status. A CancelOrder that arrives before its CreateOrder leaves a tombstone, so the late
CreateOrder creates nothing.
"""

from __future__ import annotations

from datetime import datetime

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    MetaData,
    Table,
    Text,
    Uuid,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert

from messaging.consumer import Context, Handler
from messaging.errors import PermanentError
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.order import (
    CancelOrder,
    CompleteOrder,
    CreateOrder,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
)

SCHEMA = "orders"
metadata = MetaData(schema=SCHEMA)
log = structlog.get_logger("sagabus.order")

orders = Table(
    "orders",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("customer_id", Text, nullable=True),
    Column("amount_minor", BigInteger, nullable=True),
    Column("currency", Text, nullable=True),
    #: PENDING -> COMPLETED | CANCELLED (user visible)
    Column("status", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


def _duration_ms(row: object, now: datetime) -> int:
    created: datetime = row.created_at  # type: ignore[attr-defined]
    return max(0, int((now - created).total_seconds() * 1000))


async def create_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CreateOrder)
    await ctx.conn.execute(
        insert(orders)
        .values(
            order_id=cmd.order_id,
            saga_id=ctx.envelope.saga_id,
            customer_id=cmd.customer_id,
            amount_minor=cmd.amount_minor,
            currency=cmd.currency,
            status="PENDING",
            created_at=ctx.now,
            updated_at=ctx.now,
        )
        .on_conflict_do_nothing()
    )
    ctx.reply(OrderCreated(order_id=cmd.order_id))


async def complete_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CompleteOrder)
    row = (
        await ctx.conn.execute(
            select(orders).where(orders.c.order_id == cmd.order_id).with_for_update()
        )
    ).first()
    if row is None:
        raise PermanentError(f"CompleteOrder for unknown order {cmd.order_id}")
    if row.status == "CANCELLED":
        raise PermanentError(f"order {cmd.order_id} is cancelled and cannot complete")
    fact = OrderCompleted(
        order_id=cmd.order_id,
        customer_id=row.customer_id,
        amount_minor=row.amount_minor,
        currency=row.currency,
        duration_ms=_duration_ms(row, ctx.now),
    )
    if row.status == "PENDING":
        await ctx.conn.execute(
            update(orders)
            .where(orders.c.order_id == cmd.order_id)
            .values(status="COMPLETED", updated_at=ctx.now)
        )
        ctx.publish_fact(fact)
    ctx.reply(fact)


async def cancel_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CancelOrder)
    row = (
        await ctx.conn.execute(
            select(orders).where(orders.c.order_id == cmd.order_id).with_for_update()
        )
    ).first()
    now = ctx.now
    if row is None:
        # Cancel before create: a tombstone, so a late CreateOrder creates nothing.
        await ctx.conn.execute(
            insert(orders)
            .values(
                order_id=cmd.order_id,
                saga_id=ctx.envelope.saga_id,
                status="CANCELLED",
                reason=cmd.reason,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        ctx.reply(
            OrderCancelled(
                order_id=cmd.order_id,
                customer_id="unknown",
                amount_minor=0,
                currency="XXX",
                duration_ms=0,
                reason=cmd.reason,
            )
        )
        return
    if row.status == "COMPLETED":
        raise PermanentError(f"order {cmd.order_id} is completed and cannot be cancelled")
    fact = OrderCancelled(
        order_id=cmd.order_id,
        customer_id=row.customer_id or "unknown",
        amount_minor=row.amount_minor or 0,
        currency=row.currency or "XXX",
        duration_ms=_duration_ms(row, now),
        reason=cmd.reason,
    )
    if row.status == "PENDING":
        await ctx.conn.execute(
            update(orders)
            .where(orders.c.order_id == cmd.order_id)
            .values(status="CANCELLED", reason=cmd.reason, updated_at=now)
        )
        ctx.publish_fact(fact)
    ctx.reply(fact)


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        CreateOrder.TYPE: create_order,
        CompleteOrder.TYPE: complete_order,
        CancelOrder.TYPE: cancel_order,
    }
    return ServiceDefinition("order", SCHEMA, metadata, handlers)
