"""Payment service: a simulated PSP with authorize, capture, void, refund and credit notes, and a
ledger.

The compensation ladder of a payment: void an authorization; refund a capture; when the refund
is refused, issue a credit note (store credit for the amount); when that is refused too, a human
(the process manager's manual case). ``RefundOrder`` refunds a completed order (the returns saga):
exactly what the ledger says was captured, through the same ledger row as ``RefundPayment``, so
one order is never refunded twice whichever command asked first.

Never a double charge: every money movement is a ledger entry unique per (order, kind), written in
the same transaction as the payment's status, so no redelivery or re-sent command can capture or
refund twice. Payment rows are locked while deciding.

Test payment tokens (documented in the README):

==========================  ================================================================
``tok_decline``             authorization declined (``card_declined``)
``tok_insufficient_funds``  authorization declined (``insufficient_funds``)
``tok_capture_fails``       authorizes, but the capture is refused
``tok_refund_fails``        authorizes and captures, but every refund is refused
``tok_no_credit``           authorizes and captures, but every refund is refused and so is
                            every credit note (``store credit not available``)
anything else               approved
==========================  ================================================================
"""

from __future__ import annotations

import uuid

import asyncpg
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
)

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.errors import PermanentError
from messaging.retention import RetentionRule
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.payment import (
    AuthorizationVoided,
    AuthorizePayment,
    CapturePayment,
    CreditNoteIssued,
    CreditNoteRefused,
    GetPaymentStatus,
    IssueCreditNote,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentCaptureFailed,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRefundFailed,
    PaymentStatusReported,
    RefundOrder,
    RefundPayment,
    VoidAuthorization,
)

SCHEMA = "payment"
metadata = MetaData(schema=SCHEMA)

DECLINING_TOKENS = {"tok_decline": "card_declined", "tok_insufficient_funds": "insufficient_funds"}
#: tokens whose refunds the PSP refuses
REFUND_REFUSING_TOKENS = frozenset({"tok_refund_fails", "tok_no_credit"})
#: tokens whose orders get no store credit
NO_CREDIT_TOKENS = frozenset({"tok_no_credit"})
AUTH_NAMESPACE = uuid.UUID("3d3c1a52-8f58-4f0c-9a0e-0f4f3c6b2a11")
CREDIT_NOTE_NAMESPACE = uuid.UUID("6a0f2c9e-1d47-4b8a-9e35-c2b7d04f8a63")
#: a refund or credit note asked for a capture whose payment row retention removed already
EXPIRED = "payment record expired"

payments = Table(
    "payments",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    Column("payment_token", Text, nullable=True),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", Text, nullable=True),
    #: AUTHORIZED, DECLINED, CAPTURED, VOIDED, REFUNDED, CREDITED (a credit note was issued)
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
    #: authorize | capture | void | refund | credit_note
    Column("kind", Text, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("idempotency_key", Text, nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("order_id", "kind", name="ledger_once_per_kind"),
)


_PAYMENTS = qualified(payments)
_LEDGER = qualified(ledger)
_ROW = "status, authorization_id, amount_minor, payment_token, reason"
_LOCK = f"SELECT {_ROW} FROM {_PAYMENTS} WHERE order_id = $1 FOR UPDATE"
_LEDGER_INSERT = (
    f"INSERT INTO {_LEDGER} (order_id, saga_id, kind, amount_minor, idempotency_key, at)"
)
_ONCE = "ON CONFLICT ON CONSTRAINT ledger_once_per_kind DO NOTHING RETURNING 1"
#: a money movement and the payment's new status in one round trip: the ledger entry (none if
#: the ledger holds one of this kind already), and the status only if the entry was written;
#: the answer is the number of entries written
_POST_AND_SET = (
    f"WITH posted AS ({_LEDGER_INSERT} VALUES ($1, $2, $3, $4, $5, $6) {_ONCE}),"
    f" status_set AS (UPDATE {_PAYMENTS} SET status = $7, updated_at = $6"
    " WHERE order_id = $1 AND EXISTS (SELECT 1 FROM posted) RETURNING 1)"
    " SELECT count(*) FROM posted"
)
#: a new payment and, if it is authorized, its ledger entry, in one round trip; no row if a
#: payment exists for the order already. ``posted`` is the number of ledger entries written.
_AUTHORIZE = (
    f"WITH created AS (INSERT INTO {_PAYMENTS} (order_id, saga_id, payment_token, amount_minor,"
    " currency, status, authorization_id, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
    f" RETURNING {_ROW}),"
    f" posted AS ({_LEDGER_INSERT} SELECT $1, $2, 'authorize', $4, $10, $9 FROM created"
    f" WHERE created.status = 'AUTHORIZED' {_ONCE})"
    f" SELECT {_ROW}, (SELECT count(*) FROM posted) AS posted FROM created"
)
#: a payment that never was: a late AuthorizePayment finds it and authorizes nothing
_TOMBSTONE = (
    f"INSERT INTO {_PAYMENTS} (order_id, saga_id, amount_minor, status, reason, updated_at)"
    " VALUES ($1, $2, 0, 'VOIDED', $3, $4) ON CONFLICT DO NOTHING"
    f" RETURNING {_ROW}"
)


async def _post(
    ctx: Context, pg: asyncpg.Connection, order_id: str, kind: str, amount: int, status: str
) -> None:
    """Write the ledger entry for ``kind`` and set the payment's ``status``."""
    posted = await pg.fetchval(
        _POST_AND_SET,
        order_id,
        ctx.envelope.saga_id,
        kind,
        amount,
        ctx.envelope.idempotency_key,
        ctx.now,
        status,
    )
    if posted != 1:
        # The status row said this had not happened, the ledger says it has: refuse to move
        # money twice and let an operator look.
        raise PermanentError(f"ledger already holds a {kind} for order {order_id}")


async def authorize(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, AuthorizePayment)
    pg = await driver(ctx.conn)
    declined = DECLINING_TOKENS.get(cmd.payment_token)
    auth_id = f"auth_{uuid.uuid5(AUTH_NAMESPACE, cmd.order_id).hex[:16]}"
    row = await pg.fetchrow(
        _AUTHORIZE,
        cmd.order_id,
        ctx.envelope.saga_id,
        cmd.payment_token,
        cmd.amount_minor,
        cmd.currency,
        "DECLINED" if declined else "AUTHORIZED",
        None if declined else auth_id,
        declined,
        ctx.now,
        ctx.envelope.idempotency_key,
    )
    if row is not None:
        if not declined and row["posted"] != 1:
            raise PermanentError(f"ledger already holds a authorize for order {cmd.order_id}")
    else:
        # A payment exists already: a re-send, a tombstone, or a concurrent delivery of the same
        # step (a re-send racing its original) that inserted first. Its row is the answer and no
        # money moves here.
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        assert row is not None  # payments are never deleted
    status = row["status"]
    if status in ("AUTHORIZED", "CAPTURED", "REFUNDED", "CREDITED"):
        ctx.reply(
            PaymentAuthorized(
                order_id=cmd.order_id,
                authorization_id=row["authorization_id"],
                amount_minor=row["amount_minor"],
            )
        )
    elif status == "VOIDED" and row["authorization_id"] is None:
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason="voided before authorization"))
    elif status == "VOIDED":
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason="authorization was voided"))
    else:
        ctx.reply(PaymentDeclined(order_id=cmd.order_id, reason=row["reason"] or "declined"))


async def capture(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, CapturePayment)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None or row["status"] not in ("AUTHORIZED", "CAPTURED"):
        status = "no authorization" if row is None else row["status"].lower()
        ctx.reply(PaymentCaptureFailed(order_id=cmd.order_id, reason=f"cannot capture: {status}"))
        return
    if row["status"] == "AUTHORIZED":
        if row["payment_token"] == "tok_capture_fails":
            ctx.reply(PaymentCaptureFailed(order_id=cmd.order_id, reason="capture refused by PSP"))
            return
        if cmd.amount_minor > row["amount_minor"]:
            ctx.reply(
                PaymentCaptureFailed(order_id=cmd.order_id, reason="amount exceeds authorization")
            )
            return
        await _post(ctx, pg, cmd.order_id, "capture", cmd.amount_minor, "CAPTURED")
    ctx.reply(
        PaymentCaptured(
            order_id=cmd.order_id,
            authorization_id=row["authorization_id"],
            amount_minor=cmd.amount_minor,
        )
    )


async def void(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, VoidAuthorization)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None:
        # Void before authorize: a tombstone, so a late AuthorizePayment authorizes nothing.
        await pg.execute(
            _TOMBSTONE,
            cmd.order_id,
            ctx.envelope.saga_id,
            "voided before authorization",
            ctx.now,
        )
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=False))
        return
    status = row["status"]
    if status == "CAPTURED":
        # A capture that raced its own undoing: the ladder's next rung is a refund, of what the
        # ledger says was captured (not of what was authorized)
        captured = await pg.fetchval(_MOVED, cmd.order_id, "capture")
        amount = captured if captured is not None else row["amount_minor"]
        await _post(ctx, pg, cmd.order_id, "refund", amount, "REFUNDED")
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    if status in ("REFUNDED", "CREDITED"):
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    if status == "AUTHORIZED":
        await _post(ctx, pg, cmd.order_id, "void", row["amount_minor"], "VOIDED")
        ctx.reply(AuthorizationVoided(order_id=cmd.order_id, had_authorization=True))
        return
    ctx.reply(
        AuthorizationVoided(
            order_id=cmd.order_id,
            had_authorization=status == "VOIDED" and row["authorization_id"] is not None,
        )
    )


_MOVED = f"SELECT amount_minor FROM {_LEDGER} WHERE order_id = $1 AND kind = $2"


async def refund(ctx: Context) -> None:
    """Give back what the ledger says was captured, whatever amount the command carries (the
    checkout's total: a capture may have taken less than was authorized). A payment never
    captured is voided instead, and nothing is refunded."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, RefundPayment)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    status = row["status"] if row is not None else None
    if row is not None and status in ("CAPTURED", "CREDITED"):
        refused = _refund_refused(row)
        if refused is not None:
            ctx.reply(PaymentRefundFailed(order_id=cmd.order_id, reason=refused))
            return
    if row is not None and status == "CAPTURED":
        captured = await pg.fetchval(_MOVED, cmd.order_id, "capture")
        if captured is None:
            raise PermanentError(
                f"payment of order {cmd.order_id} is CAPTURED, but the ledger holds no capture"
            )
        await _post(ctx, pg, cmd.order_id, "refund", captured, "REFUNDED")
        ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=captured))
        return
    if row is not None and status == "AUTHORIZED":
        # Never captured: the right counteraction is a void, and nothing is refunded.
        await _post(ctx, pg, cmd.order_id, "void", row["amount_minor"], "VOIDED")
        ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=0))
        return
    # Refunded already (a re-send): what the ledger's refund gave back. Anything else: nothing.
    refunded = await pg.fetchval(_MOVED, cmd.order_id, "refund") if status == "REFUNDED" else 0
    ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=refunded or 0))


def _refund_refused(row: asyncpg.Record) -> str | None:
    """Why a refund of a captured (or credited) payment is refused, or None."""
    if row["payment_token"] in REFUND_REFUSING_TOKENS:
        return "refund refused by PSP"
    if row["status"] == "CREDITED":
        # store credit was given instead: a refund as well would pay twice
        return "credit note issued"
    return None


async def refund_order(ctx: Context) -> None:
    """A completed order's return: refund exactly what the ledger says was captured. Never
    voids (a completed order's payment was captured, or there is nothing to give back). Shares
    the ledger's one ``refund`` row with ``RefundPayment``: an order refunded already, by either
    command, is answered with what that refund gave back, and no money moves."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, RefundOrder)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    # the ledger outlives the payment's row (retention): it answers re-sends on its own
    refunded = await pg.fetchval(_MOVED, cmd.order_id, "refund")
    if refunded is not None:
        ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=refunded))
        return
    captured = await pg.fetchval(_MOVED, cmd.order_id, "capture")
    if captured is None:
        ctx.reply(PaymentRefundFailed(order_id=cmd.order_id, reason="nothing captured"))
        return
    if row is None:
        ctx.reply(PaymentRefundFailed(order_id=cmd.order_id, reason=EXPIRED))
        return
    refused = _refund_refused(row)
    if refused is not None:
        ctx.reply(PaymentRefundFailed(order_id=cmd.order_id, reason=refused))
        return
    if row["status"] != "CAPTURED":
        raise PermanentError(
            f"payment of order {cmd.order_id} is {row['status']}, but the ledger holds a capture"
            " and no refund"
        )
    await _post(ctx, pg, cmd.order_id, "refund", captured, "REFUNDED")
    ctx.reply(PaymentRefunded(order_id=cmd.order_id, amount_minor=captured))


def credit_note_id(order_id: str) -> str:
    """Derived from the order (the ledger holds one credit note per order): the same id for
    every re-send."""
    return f"cn_{uuid.uuid5(CREDIT_NOTE_NAMESPACE, order_id).hex[:16]}"


async def issue_credit_note(ctx: Context) -> None:
    """Store credit for the amount, when the refund was refused: a ledger entry of kind
    ``credit_note`` and status CREDITED. At most what was captured and not refunded; a re-send
    is answered with the credit note issued (its id and the ledger's amount)."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, IssueCreditNote)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    issued = await pg.fetchval(_MOVED, cmd.order_id, "credit_note")
    if issued is not None:
        ctx.reply(
            CreditNoteIssued(
                order_id=cmd.order_id,
                credit_note_id=credit_note_id(cmd.order_id),
                amount_minor=issued,
            )
        )
        return
    refused = _credit_refused(row, cmd.amount_minor, await _uncredited(pg, cmd.order_id))
    if refused is not None:
        ctx.reply(CreditNoteRefused(order_id=cmd.order_id, reason=refused))
        return
    await _post(ctx, pg, cmd.order_id, "credit_note", cmd.amount_minor, "CREDITED")
    ctx.reply(
        CreditNoteIssued(
            order_id=cmd.order_id,
            credit_note_id=credit_note_id(cmd.order_id),
            amount_minor=cmd.amount_minor,
        )
    )


async def _uncredited(pg: asyncpg.Connection, order_id: str) -> int:
    """What was captured and not refunded, by the ledger (0: nothing captured)."""
    captured = await pg.fetchval(_MOVED, order_id, "capture") or 0
    refunded = await pg.fetchval(_MOVED, order_id, "refund") or 0
    return max(0, captured - refunded)


def _credit_refused(row: asyncpg.Record | None, amount: int, available: int) -> str | None:
    """Why a credit note of ``amount`` is refused, or None."""
    if row is None and available > 0:
        return EXPIRED
    if row is None or row["status"] not in ("CAPTURED", "REFUNDED"):
        return "nothing captured"
    if row["payment_token"] in NO_CREDIT_TOKENS:
        return "store credit not available"
    if amount == 0:
        return "nothing to credit"
    if amount > available:
        return "amount exceeds what was captured and not refunded"
    return None


async def status(ctx: Context) -> None:
    """Report what happened to an order's payment. The answer is also a fence: "none" leaves a
    tombstone (like a void before authorize), so an AuthorizePayment still in flight can no
    longer authorize after the process manager was told nothing happened. An in-flight
    authorization that inserted first makes this wait on its row and report it."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, GetPaymentStatus)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(
        _TOMBSTONE,
        cmd.order_id,
        ctx.envelope.saga_id,
        "closed by a status query before authorization",
        ctx.now,
    )
    if row is None:  # a payment exists: wait for it (an authorization in flight) and report it
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        assert row is not None  # payments are never deleted
    reported = (
        "none"
        if row["authorization_id"] is None and row["status"] == "VOIDED"
        else row["status"].lower()
    )
    ctx.reply(PaymentStatusReported(order_id=cmd.order_id, status=reported))


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        AuthorizePayment.TYPE: authorize,
        CapturePayment.TYPE: capture,
        VoidAuthorization.TYPE: void,
        RefundPayment.TYPE: refund,
        RefundOrder.TYPE: refund_order,
        IssueCreditNote.TYPE: issue_credit_note,
        GetPaymentStatus.TYPE: status,
    }
    # settled payments (an AUTHORIZED one still holds money). The ledger is kept: it is the
    # accounting record and the last guard against a second capture, and holds no personal data
    retained = (
        RetentionRule(
            payments,
            "updated_at",
            "participant_retention_s",
            "status IN ('CAPTURED', 'VOIDED', 'REFUNDED', 'CREDITED', 'DECLINED')",
        ),
    )
    return ServiceDefinition("payment", SCHEMA, metadata, handlers, retained=retained)
