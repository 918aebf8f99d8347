"""Analytics service (choreographed): counts and durations of checkouts by outcome."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, DateTime, MetaData, Table, Text, func
from sqlalchemy.dialects.postgresql import insert

from messaging.consumer import Context, Handler
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.order import OrderCancelled, OrderCompleted

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


async def count(ctx: Context) -> None:
    fact = ctx.incoming.body
    assert isinstance(fact, OrderCompleted | OrderCancelled)
    outcome = "completed" if isinstance(fact, OrderCompleted) else fact.outcome
    stmt = insert(outcomes).values(
        outcome=outcome,
        count=1,
        total_duration_ms=fact.duration_ms,
        max_duration_ms=fact.duration_ms,
        amount_minor=fact.amount_minor if outcome == "completed" else 0,
    )
    await ctx.conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["outcome"],
            set_={
                "count": outcomes.c.count + 1,
                "total_duration_ms": outcomes.c.total_duration_ms + stmt.excluded.total_duration_ms,
                "max_duration_ms": func.greatest(
                    outcomes.c.max_duration_ms, stmt.excluded.max_duration_ms
                ),
                "amount_minor": outcomes.c.amount_minor + stmt.excluded.amount_minor,
                "updated_at": func.now(),
            },
        )
    )


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {OrderCompleted.TYPE: count, OrderCancelled.TYPE: count}
    return ServiceDefinition("analytics", SCHEMA, metadata, handlers)
