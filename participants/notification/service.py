"""Notification service (choreographed): reacts to public order facts and records what it
"sent". Facts carry ids and tokens only; the address book lookup would happen here, keyed by the
customer token, which is why no personal data needs to travel on the bus.

Every public order fact gets one email: OrderCompleted ``order_confirmed``, OrderCancelled
``order_cancelled``, OrderBackordered ``order_backordered``, OrderReturned ``order_returned``."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.retention import RetentionRule
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.order import OrderBackordered, OrderCancelled, OrderCompleted, OrderReturned

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


#: the email template of each public fact
TEMPLATES: dict[str, str] = {
    OrderCompleted.TYPE: "order_confirmed",
    OrderCancelled.TYPE: "order_cancelled",
    OrderBackordered.TYPE: "order_backordered",
    OrderReturned.TYPE: "order_returned",
}


async def notify(ctx: Context) -> None:
    fact = ctx.incoming.body
    assert isinstance(fact, OrderCompleted | OrderCancelled | OrderBackordered | OrderReturned)
    template = TEMPLATES[fact.TYPE]
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
    handlers: dict[str, Handler] = dict.fromkeys(TEMPLATES, notify)
    retained = (RetentionRule(notifications, "sent_at", "participant_retention_s"),)
    return ServiceDefinition("notification", SCHEMA, metadata, handlers, retained=retained)
