"""Order service: orders and their user-visible status.

Commands are idempotent by order id: a re-sent command gets the reply that matches the order's
current status. A CancelOrder that arrives before its CreateOrder leaves a tombstone, so the late
CreateOrder creates nothing.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
import structlog
from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, Uuid

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.errors import PermanentError
from messaging.retention import RetentionRule
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


_ORDERS = qualified(orders)
_CREATE = (
    f"INSERT INTO {_ORDERS} (order_id, saga_id, customer_id, amount_minor, currency, status,"
    " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'PENDING', $6, $6)"
    " ON CONFLICT DO NOTHING"
)
_LOCK = (
    f"SELECT status, customer_id, amount_minor, currency, created_at FROM {_ORDERS}"
    " WHERE order_id = $1 FOR UPDATE"
)
_COMPLETE = f"UPDATE {_ORDERS} SET status = 'COMPLETED', updated_at = $2 WHERE order_id = $1"
_CANCEL = (
    f"UPDATE {_ORDERS} SET status = 'CANCELLED', reason = $2, updated_at = $3 WHERE order_id = $1"
)
#: cancel before create: a tombstone, so a late CreateOrder creates nothing
_TOMBSTONE = (
    f"INSERT INTO {_ORDERS} (order_id, saga_id, status, reason, created_at, updated_at)"
    " VALUES ($1, $2, 'CANCELLED', $3, $4, $4) ON CONFLICT DO NOTHING"
)


def _duration_ms(row: asyncpg.Record, now: datetime) -> int:
    created: datetime = row["created_at"]
    return max(0, int((now - created).total_seconds() * 1000))


async def create_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CreateOrder)
    pg = await driver(ctx.conn)
    await pg.execute(
        _CREATE,
        cmd.order_id,
        ctx.envelope.saga_id,
        cmd.customer_id,
        cmd.amount_minor,
        cmd.currency,
        ctx.now,
    )
    ctx.reply(OrderCreated(order_id=cmd.order_id))


async def complete_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CompleteOrder)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None:
        raise PermanentError(f"CompleteOrder for unknown order {cmd.order_id}")
    if row["status"] == "CANCELLED":
        raise PermanentError(f"order {cmd.order_id} is cancelled and cannot complete")
    fact = OrderCompleted(
        order_id=cmd.order_id,
        customer_id=row["customer_id"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        duration_ms=_duration_ms(row, ctx.now),
    )
    if row["status"] == "PENDING":
        await pg.execute(_COMPLETE, cmd.order_id, ctx.now)
        ctx.publish_fact(fact)
    ctx.reply(fact)


async def cancel_order(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CancelOrder)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    now = ctx.now
    if row is None:
        # Cancel before create: a tombstone, so a late CreateOrder creates nothing.
        await pg.execute(_TOMBSTONE, cmd.order_id, ctx.envelope.saga_id, cmd.reason, now)
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
    if row["status"] == "COMPLETED":
        raise PermanentError(f"order {cmd.order_id} is completed and cannot be cancelled")
    fact = OrderCancelled(
        order_id=cmd.order_id,
        customer_id=row["customer_id"] or "unknown",
        amount_minor=row["amount_minor"] or 0,
        currency=row["currency"] or "XXX",
        duration_ms=_duration_ms(row, now),
        reason=cmd.reason,
    )
    if row["status"] == "PENDING":
        await pg.execute(_CANCEL, cmd.order_id, cmd.reason, now)
        ctx.publish_fact(fact)
    ctx.reply(fact)


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        CreateOrder.TYPE: create_order,
        CompleteOrder.TYPE: complete_order,
        CancelOrder.TYPE: cancel_order,
    }
    # settled orders only; a PENDING one is still in a saga. A cancelled row without a
    # customer is a tombstone: a guard, like every rule here
    retained = (
        RetentionRule(
            orders, "updated_at", "participant_retention_s", "status IN ('COMPLETED', 'CANCELLED')"
        ),
    )
    return ServiceDefinition("order", SCHEMA, metadata, handlers, retained=retained)
