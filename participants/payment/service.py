"""Payment service: a simulated PSP with authorize, capture, void and refund, and a ledger.

Never a double charge: every money movement is a ledger entry unique per (order, kind), written in
the same transaction as the payment's status, so no redelivery or re-sent command can capture or
refund twice. Payment rows are locked while deciding.

Test payment tokens (documented in the README):

==========================  ================================================================
``tok_decline``             authorization declined (``card_declined``)
``tok_insufficient_funds``  authorization declined (``insufficient_funds``)
``tok_capture_fails``       authorizes, but the capture is refused
``tok_refund_fails``        authorizes and captures, but every refund is refused
anything else               approved
==========================  ================================================================
"""

from __future__ import annotations

import uuid

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert

from messaging.consumer import Context, Handler
from messaging.errors import PermanentError
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.payment import (
    AuthorizationVoided,
    AuthorizePayment,
    CapturePayment,
    GetPaymentStatus,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
    RefundPayment,
    VoidAuthorization,
)

SCHEMA = "payment"
metadata = MetaData(schema=SCHEMA)

DECLINING_TOKENS = {"tok_decline": "card_declined", "tok_insufficient_funds": "insufficient_funds"}
AUTH_NAMESPACE = uuid.UUID("3d3c1a52-8f58-4f0c-9a0e-0f4f3c6b2a11")

payments = Table(
    "payments",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("payment_token", Text, nullable=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=True),
    #: AUTHORIZED, DECLINED, CAPTURED, VOIDED, REFUNDED
    Column("status", Text, nullable=False),
    Column("authorization_id", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_id", Text, nullable=False),
    Column("saga_id", Uuid, nullable=False),
    #: authorize | capture | void | refund
    Column("kind", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("idempotency_key", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("order_id", "kind", name="ledger_once_per_kind"),
)


async def _lock(ctx: Context, order_id: str):  # type: ignore[no-untyped-def]
    return (
        await ctx.conn.execute(
            select(payments).where(payments.c.order_id == order_id).with_for_update()
        )
    ).first()


async def _post(ctx: Context, order_id: str, kind: str, amount: int) -> None:
    result = await ctx.conn.execute(
        insert(ledger)
        .values(
            order_id=order_id,
            saga_id=ctx.envelope.saga_id,
            kind=kind,
            amount_minor=amount,
            idempotency_key=ctx.envelope.idempotency_key,
            at=ctx.now,
        )
        .on_conflict_do_nothing(constraint="ledger_once_per_kind")
    )
    if result.rowcount != 1:
        # The status row said this had not happened, the ledger says it has: refuse to move
        # money twice and let an operator look.
        raise PermanentError(f"ledger already holds a {kind} for order {order_id}")


async def _set(ctx: Context, order_id: str, **values: object) -> None:
    await ctx.conn.execute(
        update(payments).where(payments.c.order_id == order_id).values(updated_at=ctx.now, **values)
    )


async def authorize(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, AuthorizePayment)
    row = await _lock(ctx, cmd.order_id)
    if row is None:
        declined = DECLINING_TOKENS.get(cmd.payment_token)
        auth_id = f"auth_{uuid.uuid5(AUTH_NAMESPACE, cmd.order_id).hex[:16]}"
        inserted = await ctx.conn.execute(
            insert(payments)
            .values(
                order_id=cmd.order_id,
                saga_id=ctx.envelope.saga_id,
                payment_token=cmd.payment_token,
                amount_minor=cmd.amount_minor,
                currency=cmd.currency,
                status="DECLINED" if declined else "AUTHORIZED",
                authorization_id=None if declined else auth_id,
                reason=declined,
                updated_at=ctx.now,
            )
            .on_conflict_do_nothing()
        )
        # A concurrent delivery of the same step (a re-send racing its original) may have
        # inserted first: then its row is the answer and no money moves here.
        if inserted.rowcount == 1 and not declined:
            await _post(ctx, cmd.order_id, "authorize", cmd.amount_minor)
        row = await _lock(ctx, cmd.order_id)
    if row.status in ("AUTHORIZED", "CAPTURED", "REFUNDED"):
        ctx.reply(
            PaymentAuthorized(
                order_id=cmd.order_id,
                authorization_id=row.authorization_id,
                amount_minor=row.amount_minor,
            )
        )
    elif row.status == "VOIDED" and row.authorization_id is None:
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason="voided before authorization"))
    elif row.status == "VOIDED":
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason="authorization was voided"))
    else:
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason=row.reason or "declined"))


async def capture(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CapturePayment)
    row = await _lock(ctx, cmd.order_id)
    if row is None or row.status not in ("AUTHORIZED", "CAPTURED"):
        status = "no authorization" if row is None else row.status.lower()
        ctx.reply(PaymentCaptureFailed(order_id=cmd.order_id, reason=f"cannot capture: {status}"))
        return
    if row.status == "AUTHORIZED":
        if row.payment_token == "tok_capture_fails":
            ctx.reply(PaymentCaptureFailed(order_id=cmd.order_id, reason="capture refused by PSP"))
            return
        if cmd.amount_minor > row.amount_minor:
            ctx.reply(
                PaymentCaptureFailed(order_id=cmd.order_id, reason="amount exceeds authorization")
            )
            return
        await _post(ctx, cmd.order_id, "capture", cmd.amount_minor)
        await _set(ctx, cmd.order_id, status="CAPTURED")
    ctx.reply(
        PaymentCaptured(
            order_id=cmd.order_id,
            authorization_id=row.authorization_id,
            amount_minor=cmd.amount_minor,
        )
    )


async def void(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, VoidAuthorization)
    row = await _lock(ctx, cmd.order_id)
    if row is None:
        # Void before authorize: a tombstone, so a late AuthorizePayment authorizes nothing.
        await ctx.conn.execute(
            insert(payments)
            .values(
                order_id=cmd.order_id,
                saga_id=ctx.envelope.saga_id,
                amount_minor=0,
                status="VOIDED",
                reason="voided before authorization",
                updated_at=ctx.now,
            )
            .on_conflict_do_nothing()
        )
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=False))
        return
    if row.status == "CAPTURED":
        # A capture that raced its own undoing: the ladder's next rung is a refund.
        await _post(ctx, cmd.order_id, "refund", row.amount_minor)
        await _set(ctx, cmd.order_id, status="REFUNDED")
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    if row.status == "REFUNDED":
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    if row.status == "AUTHORIZED":
        await _post(ctx, cmd.order_id, "void", row.amount_minor)
        await _set(ctx, cmd.order_id, status="VOIDED")
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    ctx.reply(
        AuthorizationVoided(
            order_id=cmd.order_id,
            had_authorization=row.status == "VOIDED" and row.authorization_id is not None,
        )
    )


async def refund(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, RefundPayment)
    row = await _lock(ctx, cmd.order_id)
    if row is not None and row.payment_token == "tok_refund_fails" and row.status == "CAPTURED":
        ctx.reply(PaymentRefundFailed(order_id=cmd.order_id, reason="refund refused by PSP"))
        return
    if row is not None and row.status == "CAPTURED":
        await _post(ctx, cmd.order_id, "refund", row.amount_minor)
        await _set(ctx, cmd.order_id, status="REFUNDED")
        ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=row.amount_minor))
        return
    if row is not None and row.status == "AUTHORIZED":
        # Never captured: the right counteraction is a void, and nothing is refunded.
        await _post(ctx, cmd.order_id, "void", row.amount_minor)
        await _set(ctx, cmd.order_id, status="VOIDED")
        ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=0))
        return
    refunded = row.amount_minor if row is not None and row.status == "REFUNDED" else 0
    ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=refunded))


async def status(ctx: Context) -> None:
    """Report what happened to an order's payment. The answer is also a fence: "none" leaves a
    tombstone (like a void before authorize), so an AuthorizePayment still in flight can no
    longer authorize after the process manager was told nothing happened. An in-flight
    authorization that inserted first makes this wait on its row and report it."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, GetPaymentStatus)
    await ctx.conn.execute(
        insert(payments)
        .values(
            order_id=cmd.order_id,
            saga_id=ctx.envelope.saga_id,
            amount_minor=0,
            status="VOIDED",
            reason="closed by a status query before authorization",
            updated_at=ctx.now,
        )
        .on_conflict_do_nothing()
    )
    row = await _lock(ctx, cmd.order_id)
    reported = (
        "none" if row.authorization_id is None and row.status == "VOIDED" else row.status.lower()
    )
    ctx.reply(PaymentStatusReported(order_id=cmd.order_id, status=reported))


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        AuthorizePayment.TYPE: authorize,
        CapturePayment.TYPE: capture,
        VoidAuthorization.TYPE: void,
        RefundPayment.TYPE: refund,
        GetPaymentStatus.TYPE: status,
    }
    return ServiceDefinition("payment", SCHEMA, metadata, handlers)
