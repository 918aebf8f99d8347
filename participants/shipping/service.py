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

Pickups (the returns saga): BookPickup has the carrier collect the parcel at the address of the
order's shipment (kept with a CREATED shipment in ``shipment_addresses``), in the same two
phases as CreateShipment and under its own carrier key (one pickup per saga). No CREATED
shipment: PickupFailed "no shipment for this order". An address whose ``line1`` starts with
"No Pickup" (any case) is refused by the carrier: PickupFailed "carrier cannot collect at this
address" (its shipment was booked as usual). CancelPickup cancels at the carrier and records
the cancel; before its BookPickup it leaves a tombstone, so the late BookPickup books nothing
(PickupFailed "cancelled before booking").
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import structlog
from sqlalchemy import Column, DateTime, MetaData, Table, Text, Uuid, bindparam, select
from sqlalchemy.dialects.postgresql import JSONB

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
from schemas.common import ShippingAddress
from schemas.envelope import Envelope, HeaderNames
from schemas.shipping import (
    BookPickup,
    CancelPickup,
    CancelShipment,
    CreateShipment,
    PickupBooked,
    PickupCancelled,
    PickupFailed,
    ShipmentCancelled,
    ShipmentCreated,
    ShipmentFailed,
)

T = TypeVar("T")

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
#: where a CREATED shipment was sent: the address a pickup collects from (personal data, kept
#: as long as the shipment)
shipment_addresses = Table(
    "shipment_addresses",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("address", JSONB, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
pickups = Table(
    "pickups",
    metadata,
    #: one pickup per returns saga: a cancelled return's saga does not block the next one's
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, primary_key=True),
    #: BOOKED | FAILED | CANCELLED (a CANCELLED row with no pickup id is a tombstone)
    Column("status", Text, nullable=False),
    Column("pickup_id", Text, nullable=True),
    Column("reason", Text, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
NO_SHIPMENT = "no shipment for this order"
CANCELLED_BEFORE_BOOKING = "cancelled before booking"


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


def _pickup_key(envelope: Envelope) -> str:
    """The carrier's key for a pickup: one per (returns) saga."""
    return f"{envelope.saga_id}:pickup"


_ADDRESSES = qualified(shipment_addresses)
_KEEP_ADDRESS = (
    f"INSERT INTO {_ADDRESSES} (order_id, address, updated_at) VALUES ($1, $2::jsonb, $3)"
    " ON CONFLICT (order_id) DO NOTHING"
)
_PICKUPS = qualified(pickups)
_LOCK_PICKUP = (
    f"SELECT status, pickup_id, reason FROM {_PICKUPS} WHERE order_id = $1 AND saga_id = $2"
    " FOR UPDATE"
)
_RECORD_PICKUP = (
    f"INSERT INTO {_PICKUPS} (order_id, saga_id, status, pickup_id, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id, saga_id) DO UPDATE SET"
    " status = EXCLUDED.status, pickup_id = EXCLUDED.pickup_id, reason = EXCLUDED.reason,"
    " updated_at = EXCLUDED.updated_at"
)
#: as ``_FIRST``: the first answer for a pickup, if there is none yet
_FIRST_PICKUP = (
    f"INSERT INTO {_PICKUPS} (order_id, saga_id, status, pickup_id, reason, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id, saga_id) DO NOTHING RETURNING 1"
)
_PICKUP_STATUS = select(pickups.c.status).where(
    pickups.c.order_id == bindparam("order_id"), pickups.c.saga_id == bindparam("saga_id")
)
#: the address of the order's shipment, if it is booked (CREATED)
_SHIPPED_TO = (
    select(shipment_addresses.c.address)
    .join(shipments, shipments.c.order_id == shipment_addresses.c.order_id)
    .where(shipments.c.order_id == bindparam("order_id"), shipments.c.status == "CREATED")
)


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
    delivery: a lost answer resolved by ``lookup``). For a pickup, ``tracking_number`` is the
    pickup id."""

    tracking_number: str


@dataclass(frozen=True)
class Rejected:
    """The carrier refused the shipment for good."""

    reason: str


@dataclass(frozen=True)
class GaveUp:
    """The carrier failed on its whole budget (or on the consumer's last delivery)."""

    reason: str


@dataclass(frozen=True)
class NoShipment:
    """BookPickup: the order has no CREATED shipment (so no address): the carrier was not
    called."""


Outcome = Recorded | Booked | Rejected | GaveUp
PickupOutcome = Outcome | NoShipment

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


async def _keep_address(ctx: Context, pg: asyncpg.Connection, cmd: CreateShipment) -> None:
    """Keep where a CREATED shipment goes, for a later pickup."""
    await pg.execute(_KEEP_ADDRESS, cmd.order_id, cmd.shipping_address.model_dump_json(), ctx.now)


def _answer(ctx: Context, order_id: str, row: asyncpg.Record) -> None:
    """Reply what the shipment row says."""
    if row["status"] == "CREATED":
        ctx.reply(ShipmentCreated(order_id=order_id, tracking_number=row["tracking_number"]))
        return
    reason = row["reason"] or (
        "cancelled before creation" if row["status"] == "CANCELLED" else "failed"
    )
    ctx.reply(ShipmentFailed(order_id=order_id, reason=reason))


async def _record_pickup_first(
    ctx: Context,
    pg: asyncpg.Connection,
    order_id: str,
    status: str,
    pickup_id: str | None,
    reason: str | None,
) -> bool:
    """Write the saga's pickup row unless another transaction did (True: ours is the answer)."""
    inserted = await pg.fetchval(
        _FIRST_PICKUP, order_id, ctx.envelope.saga_id, status, pickup_id, reason, ctx.now
    )
    return inserted is not None


def _answer_pickup(ctx: Context, order_id: str, row: asyncpg.Record) -> None:
    """Reply what the pickup row says."""
    if row["status"] == "BOOKED":
        ctx.reply(PickupBooked(order_id=order_id, pickup_id=row["pickup_id"]))
        return
    reason = row["reason"] or (
        CANCELLED_BEFORE_BOOKING if row["status"] == "CANCELLED" else "failed"
    )
    ctx.reply(PickupFailed(order_id=order_id, reason=reason))


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
    row, records what ``prepare`` found, and replies. BookPickup and CancelPickup work the same
    way on the pickup row."""

    in_flight = _InFlight()

    def retry_or_give_up(p: Preparation, e: Exception) -> GaveUp:
        """A carrier failure with nothing booked: a retry (raised), or the end of its budget."""
        # only carrier failures count here, not the delivery's other retries
        attempts = carrier_attempts(p.incoming) + 1
        # Give up on the carrier's budget, or when this is the last delivery the consumer
        # will make (other retries, a database restart, spent the rest): the process
        # manager gets an answer either way, not a dead letter.
        last_delivery = p.retries + 1 >= settings.max_attempts
        if attempts < settings.shipping_max_attempts and not last_delivery:
            raise TransientError(str(e), headers={CARRIER_ATTEMPTS: attempts}) from e
        return GaveUp(f"carrier failed {attempts} times: {e}")

    async def guarded(key: str, ask: Callable[[], Awaitable[T]]) -> T:
        """A carrier conversation under ``key``, registered as in flight so a cancel
        delivered meanwhile waits for it."""
        call = in_flight.start(key)  # before the first await: a cancel delivered after waits
        try:
            return await ask()
        finally:
            in_flight.finish(key, call)

    async def prepare_create(p: Preparation) -> Outcome:
        key = _key(p.incoming.envelope)
        return await guarded(key, lambda: ask_carrier(p, key))

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
            return retry_or_give_up(p, e)

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
                        await _keep_address(ctx, pg, cmd)
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
        if row["status"] == "CREATED":
            await _keep_address(ctx, pg, cmd)  # a re-send: kept already (or before pickups)
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

    # -- pickups (the returns saga) --------------------------------------------------------------

    async def prepare_pickup(p: Preparation) -> PickupOutcome:
        key = _pickup_key(p.incoming.envelope)
        return await guarded(key, lambda: ask_carrier_pickup(p, key))

    async def ask_carrier_pickup(p: Preparation, key: str) -> PickupOutcome:
        cmd = p.incoming.body
        assert isinstance(cmd, BookPickup)
        # short reads, no lock, as for a shipment: ``apply`` locks the pickup row
        async with p.engine.connect() as conn:
            params = {"order_id": cmd.order_id, "saga_id": p.incoming.envelope.saga_id}
            status = (await conn.execute(_PICKUP_STATUS, params)).scalar_one_or_none()
            shipped_to = (
                None
                if status is not None
                else (
                    await conn.execute(_SHIPPED_TO, {"order_id": cmd.order_id})
                ).scalar_one_or_none()
            )
        if status is not None:
            if status != "BOOKED":
                # cancelled or failed: whatever another instance's call left at the carrier
                # is cancelled (idempotent; nothing if there is no booking)
                await carrier.cancel(key)
            return Recorded()
        if shipped_to is None:
            return NoShipment()
        address = ShippingAddress.model_validate(shipped_to)
        pickup_id = await carrier.lookup(key)
        if pickup_id is not None:
            return Booked(pickup_id)
        try:
            return Booked(await carrier.book_pickup(key, cmd.order_id, address))
        except CarrierRejected as e:
            return Rejected(str(e))
        except (CarrierUnavailable, CarrierResponseLost) as e:
            pickup_id = await carrier.lookup(key)
            if pickup_id is not None:
                log.info("carrier_outcome_resolved", pickup_id=pickup_id, error=str(e))
                return Booked(pickup_id)
            return retry_or_give_up(p, e)

    async def apply_pickup(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, BookPickup)
        outcome = ctx.prepared
        pg = await driver(ctx.conn)
        saga_id = ctx.envelope.saga_id
        row = await pg.fetchrow(_LOCK_PICKUP, cmd.order_id, saga_id)
        if row is None:
            match outcome:
                case Booked(tracking_number=pickup_id):
                    if await _record_pickup_first(ctx, pg, cmd.order_id, "BOOKED", pickup_id, None):
                        ctx.reply(PickupBooked(order_id=cmd.order_id, pickup_id=pickup_id))
                        return
                case Rejected(reason=reason) | GaveUp(reason=reason):
                    if await _record_pickup_first(ctx, pg, cmd.order_id, "FAILED", None, reason):
                        ctx.reply(PickupFailed(order_id=cmd.order_id, reason=reason))
                        return
                case NoShipment():
                    if await _record_pickup_first(
                        ctx, pg, cmd.order_id, "FAILED", None, NO_SHIPMENT
                    ):
                        ctx.reply(PickupFailed(order_id=cmd.order_id, reason=NO_SHIPMENT))
                        return
                case _:
                    # prepare saw a row that is gone now (pruned), or did not run
                    raise TransientError("the pickup row changed after prepare")
            # another transaction answered first (it committed while we waited to insert)
            row = await pg.fetchrow(_LOCK_PICKUP, cmd.order_id, saga_id)
            assert row is not None
        if isinstance(outcome, Booked) and row["status"] != "BOOKED":
            # a CancelPickup (its tombstone) or another delivery's failure answered first: the
            # booking must not stay (a carrier call in the transaction, in this race only)
            if await carrier.cancel(_pickup_key(ctx.envelope)):
                log.info("carrier_pickup_cancelled_late", status=row["status"])
        _answer_pickup(ctx, cmd.order_id, row)

    async def prepare_cancel_pickup(p: Preparation) -> bool:
        """Cancel at the carrier whatever our row says, after a BookPickup of the same saga in
        flight in this process (as ``prepare_cancel``)."""
        key = _pickup_key(p.incoming.envelope)
        await in_flight.settled(key)
        return await carrier.cancel(key)

    async def apply_cancel_pickup(ctx: Context) -> None:
        cmd = ctx.incoming.body
        assert isinstance(cmd, CancelPickup)
        had = bool(ctx.prepared)
        pg = await driver(ctx.conn)
        saga_id = ctx.envelope.saga_id
        row = await pg.fetchrow(_LOCK_PICKUP, cmd.order_id, saga_id)
        if row is None:
            if await _record_pickup_first(
                ctx, pg, cmd.order_id, "CANCELLED", None, CANCELLED_BEFORE_BOOKING
            ):
                # a tombstone: the late BookPickup books nothing
                ctx.reply(PickupCancelled(order_id=cmd.order_id, had_pickup=had))
                return
            # a BookPickup recorded first (it committed while we waited to insert)
            row = await pg.fetchrow(_LOCK_PICKUP, cmd.order_id, saga_id)
            assert row is not None
        if row["status"] == "BOOKED":
            if not had:
                # booked after our prepare's cancel, recorded before us (a rare race)
                await carrier.cancel(_pickup_key(ctx.envelope))
            await pg.execute(
                _RECORD_PICKUP,
                cmd.order_id,
                saga_id,
                "CANCELLED",
                row["pickup_id"],
                "cancelled",
                ctx.now,
            )
            had = True
        elif row["status"] == "CANCELLED" and row["pickup_id"] is not None:
            had = True  # a re-send: the pickup was booked, and this saga cancelled it
        ctx.reply(PickupCancelled(order_id=cmd.order_id, had_pickup=had))

    return {
        CreateShipment.TYPE: TwoPhase(prepare_create, apply_create),
        CancelShipment.TYPE: TwoPhase(prepare_cancel, apply_cancel),
        BookPickup.TYPE: TwoPhase(prepare_pickup, apply_pickup),
        CancelPickup.TYPE: TwoPhase(prepare_cancel_pickup, apply_cancel_pickup),
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
        # shipments, their addresses and pickups, and the simulated carrier's bookings (its
        # memory of idempotency keys)
        retained=(
            RetentionRule(shipments, "updated_at", "participant_retention_s"),
            RetentionRule(shipment_addresses, "updated_at", "participant_retention_s"),
            RetentionRule(pickups, "updated_at", "participant_retention_s"),
            RetentionRule(bookings, "created_at", "participant_retention_s"),
        ),
    )
