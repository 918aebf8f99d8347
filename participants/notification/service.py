"""Notification service (choreographed): reacts to public order facts and records what it
"sent". Facts carry ids and tokens only; the address book lookup would happen here, keyed by the
customer token, which is why no personal data needs to travel on the bus."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.retention import RetentionRule
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.order import OrderCancelled, OrderCompleted

SCHEMA = "notification"
metadata = MetaData(schema=SCHEMA)

notifications = Table(
    "notifications",
    metadata,
    Column("fact_id", Uuid, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("order_id", Text, nullable=False),
    Column("customer_token", Text, nullable=False),
    Column("template", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=False),
)


_NOTIFY = (
    f"INSERT INTO {qualified(notifications)} (fact_id, saga_id, order_id, customer_token,"
    " template, channel, sent_at) VALUES ($1, $2, $3, $4, $5, 'email', $6)"
    " ON CONFLICT DO NOTHING"
)


async def notify(ctx: Context) -> None:
    fact = ctx.incoming.body
    assert isinstance(fact, OrderCompleted | OrderCancelled)
    template = "order_confirmed" if isinstance(fact, OrderCompleted) else "order_cancelled"
    pg = await driver(ctx.conn)
    await pg.execute(
        _NOTIFY,
        ctx.envelope.message_id,
        ctx.envelope.saga_id,
        fact.order_id,
        fact.customer_id,
        template,
        ctx.now,
    )


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {OrderCompleted.TYPE: notify, OrderCancelled.TYPE: notify}
    retained = (RetentionRule(notifications, "sent_at", "participant_retention_s"),)
    return ServiceDefinition("notification", SCHEMA, metadata, handlers, retained=retained)
