"""Shipping service: books a shipment with the (flaky) carrier.

A carrier error that may pass is retried through the delay queues with backoff; after
``shipping_max_attempts`` carrier failures the shipment fails and the process manager
compensates. Only carrier failures count (a header on the retried copy): retries caused by
anything else, a database restart say, do not make a shipment give up.
Before every booking attempt, and before giving up, the service asks the carrier whether it
already booked this idempotency key, so a lost response never turns into a second shipment.

The carrier is called before the message's transaction, outside it (``TwoPhase``): a slow
carrier delays its own shipment only, never the other deliveries that share a transaction with
it. The transaction then locks the shipment row and records what the carrier said; a booking
the row does not hold (a cancel that landed in between) is cancelled there.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import structlog
from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid, bindparam, select

from messaging.codec import Incoming
from messaging.consumer import Context, Handler, Preparation, TwoPhase
from messaging.db import driver, qualified
from messaging.errors import TransientError
from messaging.retention import RetentionRule
from messaging.service import ServiceContext, ServiceDefinition
from messaging.settings import Settings
from participants.shipping.carrier import (
    Carrier,
    CarrierRejected,
    CarrierResponseLost,
    CarrierUnavailable,
    bookings_table,
)
from schemas.envelope import Envelope, HeaderNames
from schemas.shipping import (
    CancelShipment,
    CreateShipment,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

SCHEMA = "shipping"
metadata = MetaData(schema=SCHEMA)
log = structlog.get_logger("sagabus.shipping")

shipments = Table(
    "shipments",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    #: CREATED | FAILED | CANCELLED (a CANCELLED row with no tracking number is a tombstone)
    Column("status", Text, nullable=False),
    Column("tracking_number", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
bookings = bookings_table(metadata)


#: carrier failures of this CreateShipment so far: set on the copy that goes round the delay
#: queue when the carrier fails, and on no other retry, so that a database outage's retries do not
#: spend the carrier's budget (``shipping_max_attempts``)
CARRIER_ATTEMPTS = HeaderNames.RETRY_STATE_PREFIX + "shipping-carrier-attempts"

_SHIPMENTS = qualified(shipments)
_LOCK = f"SELECT status, tracking_number, reason FROM {_SHIPMENTS} WHERE order_id = $1 FOR UPDATE"
_RECORD = (
    f"INSERT INTO {_SHIPMENTS} (order_id, saga_id, status, tracking_number, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO UPDATE SET"
    " status = EXCLUDED.status, tracking_number = EXCLUDED.tracking_number,"
    " reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at"
)
#: the first answer for an order, if there is none yet: a ``FOR UPDATE`` of a missing row locks
#: nothing, so two transactions that both found none meet here, and the second waits for the
#: first to commit and then writes nothing (it answers from the first's row)
_FIRST = (
    f"INSERT INTO {_SHIPMENTS} (order_id, saga_id, status, tracking_number, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING RETURNING 1"
)


def _key(envelope: Envelope) -> str:
    """The carrier booking key: one shipment per saga, whichever attempt asks."""
    return f"{envelope.saga_id}:shipment"


def carrier_attempts(incoming: Incoming) -> int:
    """How many deliveries of this command the carrier failed already."""
    value = incoming.headers.get(CARRIER_ATTEMPTS, 0)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


# What ``prepare`` of a CreateShipment found out, outside any transaction; ``apply`` records it.


@dataclass(frozen=True)
class Recorded:
    """The order had a shipment row already (a re-send, a duplicate, a tombstone): the carrier
    was not called, and the row is the answer."""


@dataclass(frozen=True)
class Booked:
    """The carrier holds a booking for the saga's key (made now, or earlier by another
    delivery: a lost answer resolved by ``lookup``)."""

    tracking_number: str


@dataclass(frozen=True)
class Rejected:
    """The carrier refused the shipment for good."""

    reason: str


@dataclass(frozen=True)
class GaveUp:
    """The carrier failed on its whole budget (or on the consumer's last delivery)."""

    reason: str


Outcome = Recorded | Booked | Rejected | GaveUp

_STATUS = select(shipments.c.status).where(shipments.c.order_id == bindparam("order_id"))


async def _record(
    ctx: Context,
    pg: asyncpg.Connection,
    order_id: str,
    status: str,
    tracking: str | None,
    reason: str | None,
) -> None:
    """Set the order's row (locked by us, or missing)."""
    await pg.execute(_RECORD, order_id, ctx.envelope.saga_id, status, tracking, reason, ctx.now)


async def _record_first(
    ctx: Context,
    pg: asyncpg.Connection,
    order_id: str,
    status: str,
    tracking: str | None,
    reason: str | None,
) -> bool:
    """Write the order's row unless another transaction did (True: ours is the answer)."""
    inserted = await pg.fetchval(
        _FIRST, order_id, ctx.envelope.saga_id, status, tracking, reason, ctx.now
    )
    return inserted is not None


def _answer(ctx: Context, order_id: str, row: asyncpg.Record) -> None:
    """Reply what the shipment row says."""
    if row["status"] == "CREATED":
        ctx.reply(ShipmentCreated(order_id=order_id, tracking_number=row["tracking_number"]))
        return
    reason = row["reason"] or (
        "cancelled before creation" if row["status"] == "CANCELLED" else "failed"
    )
    ctx.reply(ShipmentFailed(order_id=order_id, reason=reason))


class _InFlight:
    """CreateShipment carrier calls in flight in this process, by booking key."""

    def __init__(self) -> None:
        self._calls: dict[str, list[asyncio.Event]] = {}

    def start(self, key: str) -> asyncio.Event:
        call = asyncio.Event()
        self._calls.setdefault(key, []).append(call)
        return call

    def finish(self, key: str, call: asyncio.Event) -> None:
        call.set()
        calls = self._calls.get(key, [])
        if call in calls:
            calls.remove(call)
        if not calls:
            self._calls.pop(key, None)

    async def settled(self, key: str) -> None:
        """Until the calls for ``key`` in flight now have finished."""
        for call in tuple(self._calls.get(key, ())):
            await call.wait()


def make_handlers(carrier: Carrier, settings: Settings) -> dict[str, Handler]:
    """CreateShipment and CancelShipment, each a ``TwoPhase`` handler: the carrier is called in
    ``prepare``, before the message's transaction and outside it, so that a slow carrier holds
    neither a database connection nor a transaction shared with other deliveries (the consumer
    batches deliveries that wait together into one transaction). ``apply`` locks the shipment
    row, records what ``prepare`` found, and replies."""

    in_flight = _InFlight()

    async def prepare_create(p: Preparation) -> Outcome:
        key = _key(p.incoming.envelope)
        call = in_flight.start(key)  # before the first await: a cancel delivered after waits
        try:
            return await ask_carrier(p, key)
        finally:
            in_flight.finish(key, call)

    async def ask_carrier(p: Preparation, key: str) -> Outcome:
        cmd = p.incoming.body
        assert isinstance(cmd, CreateShipment)
        # A short read, no lock: its connection is back in the pool before the carrier is
        # called. A row written after this read is ``apply``'s business (it locks the row).
        async with p.engine.connect() as conn:
            status = (await conn.execute(_STATUS, {"order_id": cmd.order_id})).scalar_one_or_none()
        if status is not None:
            if status != "CREATED":
                # Cancelled or failed: whatever another instance's call left at the carrier
                # (a booking that landed after the cancel, its answer then lost with a crash) is
                # cancelled; it is idempotent, and nothing if there is no booking.
                await carrier.cancel(key)
            return Recorded()
        tracking = await carrier.lookup(key)
        if tracking is not None:
            return Booked(tracking)
        try:
            return Booked(await carrier.book(key, cmd.order_id, cmd.shipping_address))
        except CarrierRejected as e:
            return Rejected(str(e))
        except (CarrierUnavailable, CarrierResponseLost) as e:
            tracking = await carrier.lookup(key)
            if tracking is not None:
                log.info("carrier_outcome_resolved", tracking_number=tracking, error=str(e))
                return Booked(tracking)
            # only carrier failures count here, not the delivery's other retries
            attempts = carrier_attempts(p.incoming) + 1
            # Give up on the carrier's budget, or when this is the last delivery the consumer
            # will make (other retries, a database restart, spent the rest): the process
            # manager gets an answer either way, not a dead letter.
            last_delivery = p.retries + 1 >= settings.max_attempts
            if attempts < settings.shipping_max_attempts and not last_delivery:
                raise TransientError(str(e), headers={CARRIER_ATTEMPTS: attempts}) from e
            return GaveUp(f"carrier failed {attempts} times: {e}")

    async def apply_create(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CreateShipment)
        outcome = ctx.prepared
        pg = await driver(ctx.conn)
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        if row is None:
            match outcome:
                case Booked(tracking_number=tracking):
                    if await _record_first(ctx, pg, cmd.order_id, "CREATED", tracking, None):
                        ctx.reply(ShipmentCreated(order_id=cmd.order_id, tracking_number=tracking))
                        return
                case Rejected(reason=reason) | GaveUp(reason=reason):
                    if await _record_first(ctx, pg, cmd.order_id, "FAILED", None, reason):
                        ctx.reply(ShipmentFailed(order_id=cmd.order_id, reason=reason))
                        return
                case _:
                    # prepare saw a row that is gone now (pruned by retention), or did not
                    # run: prepare again on a retry rather than answer without the carrier
                    raise TransientError("the shipment row changed after prepare")
            # another transaction answered first (it committed while we waited to insert)
            row = await pg.fetchrow(_LOCK, cmd.order_id)
            assert row is not None
        # Recorded before us: a tombstone, another delivery of this command that got here
        # first, or a CancelShipment that landed between our prepare and now.
        if isinstance(outcome, Booked) and row["status"] != "CREATED":
            # Our prepare booked, or found a booking, that the row's answer does not hold: the
            # cancel found nothing to cancel at the carrier yet, or another delivery answered
            # ShipmentFailed. The booking must not stay. This is a carrier call inside the
            # (maybe shared) transaction, but only in this rare race, and a cancel is one short
            # call, not a booking; the common paths never get here.
            if await carrier.cancel(_key(ctx.envelope)):
                log.info("carrier_booking_cancelled_late", status=row["status"])
        _answer(ctx, cmd.order_id, row)

    async def prepare_cancel(p: Preparation) -> bool:
        """Cancel at the carrier, whatever our row says: it may hold a booking whose answer
        was lost. Idempotent (a cancelled booking stays cancelled). A CreateShipment of the
        same saga at the carrier in this process (delivered with it, a late one) goes first,
        so that the cancel finds its booking, as when deliveries were handled in order."""
        key = _key(p.incoming.envelope)
        await in_flight.settled(key)
        return await carrier.cancel(key)

    async def apply_cancel(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CancelShipment)
        had = bool(ctx.prepared)
        pg = await driver(ctx.conn)
        row = await pg.fetchrow(_LOCK, cmd.order_id)
        if row is None:
            if await _record_first(
                ctx, pg, cmd.order_id, "CANCELLED", None, "cancelled before creation"
            ):
                ctx.reply(ShipmentCancelled(order_id=cmd.order_id, had_shipment=had))
                return
            # a CreateShipment recorded first (it committed while we waited to insert)
            row = await pg.fetchrow(_LOCK, cmd.order_id)
            assert row is not None
        if row["status"] == "CREATED":
            if not had:
                # A CreateShipment booked after our prepare's cancel and recorded before us:
                # its booking is still live. A carrier call inside the transaction, in this
                # rare race only (normally prepare cancelled the booking already).
                await carrier.cancel(_key(ctx.envelope))
            await _record(ctx, pg, cmd.order_id, "CANCELLED", row["tracking_number"], "cancelled")
            had = True
        ctx.reply(ShipmentCancelled(order_id=cmd.order_id, had_shipment=had))

    return {
        CreateShipment.TYPE: TwoPhase(prepare_create, apply_create),
        CancelShipment.TYPE: TwoPhase(prepare_cancel, apply_cancel),
    }


def carrier_pool_owner(carrier: Carrier) -> Callable[[ServiceContext], Awaitable[None]]:
    """A background "loop" that owns the carrier's connection pool for the life of the service:
    the runtime cancels its loops after the consumer has stopped, and then the pool is closed."""

    async def carrier_pool(_: ServiceContext) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await carrier.close()

    return carrier_pool


def definition(settings: Settings, *, rng: random.Random | None = None) -> ServiceDefinition:
    carrier = Carrier(
        bookings,
        dsn=settings.asyncpg_url,
        failure_rate=settings.carrier_failure_rate,
        lose_response_rate=settings.carrier_lose_response_rate,
        latency_ms=settings.carrier_latency_ms,
        rng=rng,
    )
    return ServiceDefinition(
        "shipping",
        SCHEMA,
        metadata,
        make_handlers(carrier, settings),
        background=(carrier_pool_owner(carrier),),
        # shipments and the simulated carrier's bookings (its memory of idempotency keys)
        retained=(
            RetentionRule(shipments, "updated_at", "participant_retention_s"),
            RetentionRule(bookings, "created_at", "participant_retention_s"),
        ),
    )
