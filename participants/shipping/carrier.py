"""A simulated carrier API: slow, flaky, and sometimes it books a shipment and loses the answer.

It keeps its bookings in its own table and commits them in its own transaction, as a remote
system would: the shipping service's transaction rolling back does not undo a booking. Bookings
are keyed by the caller's idempotency key, and ``lookup`` answers "did you book this key?", which
is how the shipping service resolves an unknown outcome without booking twice.

Test addresses (documented in the README): postal code ``00000`` is always rejected as
undeliverable; postal code ``99999`` always gets "carrier unavailable" (retried, then failed).
"""

from __future__ import annotations

import asyncio
import random
import uuid

from sqlalchemy import Column, DateTime, MetaData, Table, Text, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.common import ShippingAddress

UNDELIVERABLE_POSTAL_CODE = "00000"
UNAVAILABLE_POSTAL_CODE = "99999"
TRACKING_NAMESPACE = uuid.UUID("a4f2f0f5-0f0c-4a7e-8f7e-7c1c0f6d8e21")


class CarrierError(Exception):
    pass


class CarrierRejected(CarrierError):
    """A definitive refusal: retrying will not help."""


class CarrierUnavailable(CarrierError):
    """The carrier failed before booking anything."""


class CarrierResponseLost(CarrierError):
    """The carrier may or may not have booked: the outcome is unknown."""


def bookings_table(metadata: MetaData) -> Table:
    return Table(
        "carrier_bookings",
        metadata,
        Column("idempotency_key", Text, primary_key=True),
        Column("order_id", Text, nullable=False),
        Column("tracking_number", Text, nullable=False),
        Column("status", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    )


class Carrier:
    def __init__(
        self,
        table: Table,
        *,
        failure_rate: float = 0.0,
        lose_response_rate: float = 0.0,
        latency_ms: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.table = table
        self.failure_rate = failure_rate
        self.lose_response_rate = lose_response_rate
        self.latency_ms = latency_ms
        self.rng = rng or random.Random()
        self.calls = 0

    async def _latency(self) -> None:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000 * self.rng.uniform(0.5, 1.5))

    async def book(
        self, engine: AsyncEngine, key: str, order_id: str, address: ShippingAddress
    ) -> str:
        self.calls += 1
        await self._latency()
        if address.postal_code == UNDELIVERABLE_POSTAL_CODE:
            raise CarrierRejected("address undeliverable")
        if address.postal_code == UNAVAILABLE_POSTAL_CODE or self.rng.random() < self.failure_rate:
            raise CarrierUnavailable("carrier unavailable (503)")
        tracking = "TRK" + uuid.uuid5(TRACKING_NAMESPACE, key).hex[:12].upper()
        async with engine.begin() as conn:
            await conn.execute(
                insert(self.table)
                .values(
                    idempotency_key=key,
                    order_id=order_id,
                    tracking_number=tracking,
                    status="BOOKED",
                )
                .on_conflict_do_nothing()
            )
        if self.rng.random() < self.lose_response_rate:
            raise CarrierResponseLost("carrier timed out after accepting the request")
        return tracking

    async def lookup(self, engine: AsyncEngine, key: str) -> str | None:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(self.table.c.tracking_number, self.table.c.status).where(
                        self.table.c.idempotency_key == key
                    )
                )
            ).first()
        return row.tracking_number if row is not None and row.status == "BOOKED" else None

    async def cancel(self, engine: AsyncEngine, key: str) -> bool:
        async with engine.begin() as conn:
            result = await conn.execute(
                update(self.table)
                .where(self.table.c.idempotency_key == key, self.table.c.status == "BOOKED")
                .values(status="CANCELLED")
            )
        return bool(result.rowcount)
