"""Order service: orders and their user-visible status.

Commands are idempotent by order id: a re-sent command gets the reply that matches the order's
current status. A CancelOrder that arrives before its CreateOrder leaves a tombstone, so the late
CreateOrder creates nothing.

Statuses: PENDING (checkout in progress) -> COMPLETED | CANCELLED | BACKORDERED; BACKORDERED ->
COMPLETED | CANCELLED; the returns saga: COMPLETED -> RETURN_PENDING -> RETURNED, or back to
COMPLETED when the return is cancelled. The public facts (OrderCompleted, OrderCancelled,
OrderBackordered, OrderReturned) are published once, on the transition; a re-sent command gets
the same fact as its reply only.
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
    CancelReturn,
    CompleteOrder,
    CompleteReturn,
    CreateOrder,
    MarkOrderBackordered,
    MarkReturnPending,
    OrderBackordered,
    OrderCancelled,
    OrderCompleted,
    OrderCreated,
    OrderReturnCancelled,
    OrderReturned,
    OrderReturnPending,
    OrderReturnRefused,
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
    #: PENDING -> COMPLETED | CANCELLED | BACKORDERED; BACKORDERED -> COMPLETED | CANCELLED;
    #: COMPLETED -> RETURN_PENDING -> RETURNED | COMPLETED (user visible)
    Column("status", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: tombstones of cancelled returns, by returns saga: a MarkReturnPending of that saga that is
#: processed after its CancelReturn (re-sent, delayed by a retry) must not mark the order again
return_cancellations = Table(
    "return_cancellations",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    Column("order_id", Text, nullable=False),
    Column("cancelled_at", DateTime(timezone=True), nullable=False),
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
_SET_STATUS = f"UPDATE {_ORDERS} SET status = $2, updated_at = $3 WHERE order_id = $1"
_RETURN_CANCELLED = "SELECT 1 FROM orders.return_cancellations WHERE saga_id = $1"
_CANCEL_RETURN = (
    "INSERT INTO orders.return_cancellations (saga_id, order_id, cancelled_at)"
    " VALUES ($1, $2, $3) ON CONFLICT (saga_id) DO NOTHING"
)
#: an order still in its checkout (it may complete or be cancelled)
_OPEN = ("PENDING", "BACKORDERED")
#: a completed order, and where its returns saga takes it
_COMPLETED = ("COMPLETED", "RETURN_PENDING", "RETURNED")
NOT_COMPLETED = "order not completed"
ALREADY_RETURNED = "order already returned"
RETURN_CANCELLED = "return cancelled"
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
    if row["status"] in _OPEN:
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
    if row["status"] in _COMPLETED:
        raise PermanentError(f"order {cmd.order_id} is completed and cannot be cancelled")
    fact = OrderCancelled(
        order_id=cmd.order_id,
        customer_id=row["customer_id"] or "unknown",
        amount_minor=row["amount_minor"] or 0,
        currency=row["currency"] or "XXX",
        duration_ms=_duration_ms(row, now),
        reason=cmd.reason,
    )
    if row["status"] in _OPEN:
        await pg.execute(_CANCEL, cmd.order_id, cmd.reason, now)
        ctx.publish_fact(fact)
    ctx.reply(fact)


# -- the returns saga ---------------------------------------------------------------------------


async def mark_return_pending(ctx: Context) -> None:
    """COMPLETED -> RETURN_PENDING (a re-send while RETURN_PENDING answers the same); any other
    order is refused, by a reply: the returns saga ends there."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, MarkReturnPending)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if await pg.fetchval(_RETURN_CANCELLED, ctx.envelope.saga_id):
        # this return was cancelled first (a late or re-sent command): mark nothing
        ctx.reply(OrderReturnRefused(order_id=cmd.order_id, reason=RETURN_CANCELLED))
        return
    status = None if row is None else row["status"]
    if status == "COMPLETED":
        await pg.execute(_SET_STATUS, cmd.order_id, "RETURN_PENDING", ctx.now)
    if status in ("COMPLETED", "RETURN_PENDING"):
        ctx.reply(OrderReturnPending(order_id=cmd.order_id))
        return
    reason = ALREADY_RETURNED if status == "RETURNED" else NOT_COMPLETED
    ctx.reply(OrderReturnRefused(order_id=cmd.order_id, reason=reason))


async def cancel_return(ctx: Context) -> None:
    """RETURN_PENDING -> COMPLETED; anything else is a repeat or a no-op (``had_return``
    False), so the compensation always gets its answer. Either way it leaves a tombstone for
    the returns saga: a MarkReturnPending of that saga processed later (re-sent, or delayed by a
    retry) marks nothing and is refused, which the saga, being past that step, ignores."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, CancelReturn)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    had = row is not None and row["status"] == "RETURN_PENDING"
    if had:
        await pg.execute(_SET_STATUS, cmd.order_id, "COMPLETED", ctx.now)
    await pg.execute(_CANCEL_RETURN, ctx.envelope.saga_id, cmd.order_id, ctx.now)
    ctx.reply(OrderReturnCancelled(order_id=cmd.order_id, had_return=had))


async def complete_return(ctx: Context) -> None:
    """RETURN_PENDING -> RETURNED, publishing ``OrderReturned``; a re-send (RETURNED) replies
    the same fact again. Any other order is a dead letter: the saga never sends it then."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, CompleteReturn)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None:
        raise PermanentError(f"CompleteReturn for unknown order {cmd.order_id}")
    if row["status"] not in ("RETURN_PENDING", "RETURNED"):
        raise PermanentError(
            f"order {cmd.order_id} is {row['status']}, not RETURN_PENDING: it cannot be returned"
        )
    fact = OrderReturned(
        order_id=cmd.order_id,
        customer_id=row["customer_id"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
    )
    if row["status"] == "RETURN_PENDING":
        await pg.execute(_SET_STATUS, cmd.order_id, "RETURNED", ctx.now)
        ctx.publish_fact(fact)
    ctx.reply(fact)


# -- backorders ---------------------------------------------------------------------------------


async def mark_backordered(ctx: Context) -> None:
    """PENDING -> BACKORDERED, publishing ``OrderBackordered``; a re-send (BACKORDERED) replies
    the same fact again. Any other order (unknown, cancelled, completed) is a dead letter."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, MarkOrderBackordered)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None:
        raise PermanentError(f"MarkOrderBackordered for unknown order {cmd.order_id}")
    if row["status"] not in _OPEN:
        raise PermanentError(
            f"order {cmd.order_id} is {row['status']}, not in its checkout: it cannot be"
            " backordered"
        )
    fact = OrderBackordered(
        order_id=cmd.order_id,
        customer_id=row["customer_id"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
    )
    if row["status"] == "PENDING":
        await pg.execute(_SET_STATUS, cmd.order_id, "BACKORDERED", ctx.now)
        ctx.publish_fact(fact)
    ctx.reply(fact)


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        CreateOrder.TYPE: create_order,
        CompleteOrder.TYPE: complete_order,
        CancelOrder.TYPE: cancel_order,
        MarkReturnPending.TYPE: mark_return_pending,
        CancelReturn.TYPE: cancel_return,
        CompleteReturn.TYPE: complete_return,
        MarkOrderBackordered.TYPE: mark_backordered,
    }
    # settled orders only; a PENDING or BACKORDERED one is still in a saga, and so is a
    # RETURN_PENDING one (its returns saga). A cancelled row without a customer is a tombstone:
    # a guard, like every rule here
    retained = (
        RetentionRule(
            orders,
            "updated_at",
            "participant_retention_s",
            "status IN ('COMPLETED', 'CANCELLED', 'RETURNED')",
        ),
        RetentionRule(return_cancellations, "cancelled_at", "participant_retention_s"),
    )
    return ServiceDefinition("order", SCHEMA, metadata, handlers, retained=retained)
