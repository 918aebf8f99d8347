"""Analytics service (choreographed): counts and durations of checkouts by outcome.

Outcomes: ``completed`` (its amount summed), ``cancelled`` and ``needs_manual`` (amount 0), and
the later events of an order: ``backordered`` and ``returned`` (their amounts summed; they carry
no duration, counted as 0). An order that was backordered and then completed counts in both."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, func

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.order import OrderBackordered, OrderCancelled, OrderCompleted, OrderReturned

SCHEMA = "analytics"
metadata = MetaData(schema=SCHEMA)

outcomes = Table(
    "outcomes",
    metadata,
    Column("outcome", Text, primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("total_duration_ms", BigInteger, nullable=False),
    Column("max_duration_ms", BigInteger, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)


_OUTCOMES = qualified(outcomes)
_COUNT = (
    f"INSERT INTO {_OUTCOMES} AS o (outcome, count, total_duration_ms, max_duration_ms,"
    " amount_minor) VALUES ($1, 1, $2, $2, $3)"
    " ON CONFLICT (outcome) DO UPDATE SET count = o.count + 1,"
    " total_duration_ms = o.total_duration_ms + EXCLUDED.total_duration_ms,"
    " max_duration_ms = greatest(o.max_duration_ms, EXCLUDED.max_duration_ms),"
    " amount_minor = o.amount_minor + EXCLUDED.amount_minor, updated_at = now()"
)


async def count(ctx: Context) -> None:
    fact = ctx.incoming.body
    assert isinstance(fact, OrderCompleted | OrderCancelled | OrderBackordered | OrderReturned)
    match fact:
        case OrderCompleted():
            outcome, duration_ms, amount = "completed", fact.duration_ms, fact.amount_minor
        case OrderCancelled():
            outcome, duration_ms, amount = fact.outcome, fact.duration_ms, 0
        case OrderBackordered():
            outcome, duration_ms, amount = "backordered", 0, fact.amount_minor
        case OrderReturned():
            outcome, duration_ms, amount = "returned", 0, fact.amount_minor
    pg = await driver(ctx.conn)
    await pg.execute(_COUNT, outcome, duration_ms, amount)


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        OrderCompleted.TYPE: count,
        OrderCancelled.TYPE: count,
        OrderBackordered.TYPE: count,
        OrderReturned.TYPE: count,
    }
    return ServiceDefinition("analytics", SCHEMA, metadata, handlers)
