"""Risk service: fraud screening of an order before any money moves.

A screening is a decision and nothing else: it reserves, charges or books nothing, so it has no
compensation command. Every order is screened once: the first ``ScreenOrder`` records its
decision in ``risk.screenings``, and a re-sent one (a redelivery, a re-send after a timeout, a
replay) is answered from that record, never screened again, so a changed limit or block list
never turns an approved order into a rejected one half way through its saga.

Rules, in this order (``decide``):

======================================  ==============================================
customer on the block list              ``RiskRejected`` reason ``customer_blocked``
amount above ``risk_max_amount_minor``  ``RiskRejected`` reason ``amount_above_limit``
anything else                           ``RiskApproved`` with a ``screening_id``
======================================  ==============================================

The block list is the table ``risk.blocked_customers``; the customer ids in the setting
``risk_blocked_customers`` (``SAGABUS_RISK_BLOCKED_CUSTOMERS``, comma separated) are added to it
at start, and are blocked even before that has happened. The limit is in minor units whatever
the currency (a simulation: a real service would convert).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from sqlalchemy import Column, DateTime, MetaData, Table, Text

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.retention import RetentionRule
from messaging.service import ServiceContext, ServiceDefinition
from messaging.settings import Settings
from schemas.risk import RiskApproved, RiskRejected, ScreenOrder

SCHEMA = "risk"
metadata = MetaData(schema=SCHEMA)

SCREENING_NAMESPACE = uuid.UUID("b7f0d8e2-5a41-4c9e-8d3b-2f6a1c7e9b40")
#: why a seeded customer is on the block list
CONFIGURED = "configured (SAGABUS_RISK_BLOCKED_CUSTOMERS)"

Decision = Literal["APPROVED", "REJECTED"]

screenings = Table(
    "screenings",
    metadata,
    Column("order_id", Text, primary_key=True),
    #: APPROVED | REJECTED
    Column("decision", Text, nullable=False),
    #: amount_above_limit | customer_blocked (REJECTED only)
    Column("reason", Text, nullable=True),
    Column("screening_id", Text, nullable=False),
    Column("screened_at", DateTime(timezone=True), nullable=False),
)

blocked_customers = Table(
    "blocked_customers",
    metadata,
    Column("customer_id", Text, primary_key=True),
    Column("reason", Text, nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False),
)

_SCREENINGS = qualified(screenings)
_BLOCKED = qualified(blocked_customers)
_RECORDED = f"SELECT decision, reason, screening_id FROM {_SCREENINGS} WHERE order_id = $1"
#: the decision, unless one is recorded already (then no row: read the recorded one)
_RECORD = (
    f"INSERT INTO {_SCREENINGS} (order_id, decision, reason, screening_id, screened_at)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING decision, reason, screening_id"
)
_IS_BLOCKED = f"SELECT EXISTS (SELECT 1 FROM {_BLOCKED} WHERE customer_id = $1)"
_SEED = (
    f"INSERT INTO {_BLOCKED} (customer_id, reason, added_at)"
    " SELECT unnest($1::text[]), $2, now() ON CONFLICT DO NOTHING"
)


def configured_block_list(settings: Settings) -> frozenset[str]:
    """The customer ids of ``risk_blocked_customers`` (comma separated; blanks ignored)."""
    return frozenset(c.strip() for c in settings.risk_blocked_customers.split(",") if c.strip())


def decide(
    amount_minor: int, *, blocked: bool, max_amount_minor: int
) -> tuple[Decision, str | None]:
    """The screening's decision and its reason: the rules of the module's docstring."""
    if blocked:
        return "REJECTED", "customer_blocked"
    if amount_minor > max_amount_minor:
        return "REJECTED", "amount_above_limit"
    return "APPROVED", None


def screening_id(order_id: str) -> str:
    """Derived from the order: the same screening id however often it is computed."""
    return f"scr_{uuid.uuid5(SCREENING_NAMESPACE, order_id).hex[:16]}"


def make_screen(settings: Settings) -> Handler:
    configured = configured_block_list(settings)
    limit = settings.risk_max_amount_minor

    async def screen(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, ScreenOrder)
        pg = await driver(ctx.conn)
        row = await pg.fetchrow(_RECORDED, cmd.order_id)
        if row is None:
            blocked = cmd.customer_id in configured or bool(
                await pg.fetchval(_IS_BLOCKED, cmd.customer_id)
            )
            decision, reason = decide(cmd.amount_minor, blocked=blocked, max_amount_minor=limit)
            row = await pg.fetchrow(
                _RECORD, cmd.order_id, decision, reason, screening_id(cmd.order_id), ctx.now
            )
            if row is None:
                # a concurrent delivery of the same command recorded first (this insert waited
                # for its commit): its decision is the answer
                row = await pg.fetchrow(_RECORDED, cmd.order_id)
                assert row is not None  # recorded, and kept at least as long as the inbox
        if row["decision"] == "APPROVED":
            ctx.reply(RiskApproved(order_id=cmd.order_id, screening_id=row["screening_id"]))
        else:
            ctx.reply(RiskRejected(order_id=cmd.order_id, reason=row["reason"] or "rejected"))

    return screen


def block_list_seeder(settings: Settings) -> Callable[[ServiceContext], Awaitable[None]]:
    """A background "loop" that runs once at start: the configured customers onto the block
    list (the ones there already are left as they are)."""
    configured = sorted(configured_block_list(settings))

    async def seed_block_list(ctx: ServiceContext) -> None:
        if not configured:
            return
        async with ctx.engine.begin() as conn:
            pg = await driver(conn)
            await pg.execute(_SEED, configured, CONFIGURED)

    return seed_block_list


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {ScreenOrder.TYPE: make_screen(settings)}
    # a screening remembers its decision for re-sent commands (a guard); the block list is
    # configuration and never expires
    retained = (RetentionRule(screenings, "screened_at", "participant_retention_s"),)
    return ServiceDefinition(
        "risk",
        SCHEMA,
        metadata,
        handlers,
        background=(block_list_seeder(settings),),
        retained=retained,
    )
