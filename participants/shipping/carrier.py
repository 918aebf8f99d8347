"""A simulated carrier API: slow, flaky, and sometimes it books a shipment and loses the answer.

It keeps its bookings in its own table, reached through its own connection pool, and commits
them in its own transaction, as a remote system would: the shipping service's transaction
rolling back does not undo a booking. Bookings are keyed by the caller's idempotency key, and
``lookup`` answers "did you book this key?", which is how the shipping service resolves an
unknown outcome without booking twice.

Test addresses (documented in the README): postal code ``00000`` is always rejected as
undeliverable; postal code ``99999`` always gets "carrier unavailable" (retried, then failed).
Pickups (a returned parcel collected at the shipping address): an address whose ``line1``
starts with "No Pickup" (any case) is always refused, "carrier cannot collect at this address"
(its shipment is booked as usual). A pickup is a booking like a shipment, under its own
idempotency key, so ``lookup`` and ``cancel`` serve both.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from sqlalchemy import Column, DateTime, MetaData, Table, Text, func

from messaging.db import affected, qualified
from schemas.common import ShippingAddress

UNDELIVERABLE_POSTAL_CODE = "00000"
UNAVAILABLE_POSTAL_CODE = "99999"
TRACKING_NAMESPACE = uuid.UUID("a4f2f0f5-0f0c-4a7e-8f7e-7c1c0f6d8e21")
#: an address whose ``line1`` starts with this (case-insensitive) gets no pickup
NO_PICKUP_PREFIX = "no pickup"
NO_PICKUP_REASON = "carrier cannot collect at this address"


class CarrierError(Exception):
    pass


class CarrierRejected(CarrierError):
    """A definitive refusal: retrying will not help."""


class CarrierUnavailable(CarrierError):
    """The carrier failed before booking anything."""


class CarrierResponseLost(CarrierError):
    """The carrier may or may not have booked: the outcome is unknown."""


@dataclass
class CarrierCall:
    """One call of the carrier's API: ``started``/``ended`` on ``time.monotonic()``."""

    operation: str
    key: str
    started: float
    ended: float | None = None
    #: "ok", or the error's class name
    outcome: str | None = None


#: calls kept in ``Carrier.history``
HISTORY = 1000


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
    """The carrier's API, simulated.

    It keeps a small connection pool of its own (``pool_size`` connections, opened on first
    use; ``close`` it when the service stops), as a client of a remote HTTP API would keep its
    own HTTP connections. It must not borrow from the service's database pool: the shipping
    handlers call it outside their transactions, but in a rare race a handler cancels a booking
    while it holds its transaction's pooled connection, and with as many of those as that pool
    has connections, every connection would be held by a handler waiting for one more (a pool
    deadlock). The carrier's pool waits on nothing but its own short statements, so it always
    drains.

    ``history`` keeps the last ``HISTORY`` calls (operation, key, start and end on the
    monotonic clock, outcome), to show how calls overlapped.
    """

    def __init__(
        self,
        table: Table,
        *,
        dsn: str,
        pool_size: int = 2,
        failure_rate: float = 0.0,
        lose_response_rate: float = 0.0,
        latency_ms: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.table = table
        self.dsn = dsn
        self.pool_size = pool_size
        self.failure_rate = failure_rate
        self.lose_response_rate = lose_response_rate
        self.latency_ms = latency_ms
        self.rng = rng or random.Random()
        self.calls = 0
        self.history: collections.deque[CarrierCall] = collections.deque(maxlen=HISTORY)
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        name = qualified(table)
        # each one statement in a transaction of its own: a remote system's commit
        self._book_sql = (
            f"INSERT INTO {name} (idempotency_key, order_id, tracking_number, status)"
            " VALUES ($1, $2, $3, 'BOOKED') ON CONFLICT DO NOTHING"
        )
        self._lookup_sql = f"SELECT tracking_number, status FROM {name} WHERE idempotency_key = $1"
        self._cancel_sql = (
            f"UPDATE {name} SET status = 'CANCELLED' WHERE idempotency_key = $1"
            " AND status = 'BOOKED'"
        )

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=0,
                        max_size=self.pool_size,
                        max_inactive_connection_lifetime=60,
                    )
        return self._pool

    async def close(self, timeout: float = 10) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            pool.terminate()

    async def _latency(self) -> None:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000 * self.rng.uniform(0.5, 1.5))

    @asynccontextmanager
    async def _call(self, operation: str, key: str) -> AsyncIterator[None]:
        call = CarrierCall(operation, key, time.monotonic())
        self.history.append(call)
        try:
            yield
        except BaseException as e:
            call.outcome = type(e).__name__
            raise
        else:
            call.outcome = "ok"
        finally:
            call.ended = time.monotonic()

    async def book(self, key: str, order_id: str, address: ShippingAddress) -> str:
        self.calls += 1
        async with self._call("book", key):
            await self._latency()
            if address.postal_code == UNDELIVERABLE_POSTAL_CODE:
                raise CarrierRejected("address undeliverable")
            if (
                address.postal_code == UNAVAILABLE_POSTAL_CODE
                or self.rng.random() < self.failure_rate
            ):
                raise CarrierUnavailable("carrier unavailable (503)")
            tracking = "TRK" + uuid.uuid5(TRACKING_NAMESPACE, key).hex[:12].upper()
            await (await self.pool()).execute(self._book_sql, key, order_id, tracking)
            if self.rng.random() < self.lose_response_rate:
                raise CarrierResponseLost("carrier timed out after accepting the request")
            return tracking

    async def book_pickup(self, key: str, order_id: str, address: ShippingAddress) -> str:
        """Book the collection of a parcel at ``address``; the pickup id. Idempotent by
        ``key``, like ``book`` (and as flaky)."""
        self.calls += 1
        async with self._call("book_pickup", key):
            await self._latency()
            if address.line1.casefold().startswith(NO_PICKUP_PREFIX):
                raise CarrierRejected(NO_PICKUP_REASON)
            if self.rng.random() < self.failure_rate:
                raise CarrierUnavailable("carrier unavailable (503)")
            pickup_id = "PU" + uuid.uuid5(TRACKING_NAMESPACE, key).hex[:12].upper()
            await (await self.pool()).execute(self._book_sql, key, order_id, pickup_id)
            if self.rng.random() < self.lose_response_rate:
                raise CarrierResponseLost("carrier timed out after accepting the request")
            return pickup_id

    async def lookup(self, key: str) -> str | None:
        async with self._call("lookup", key):
            row = await (await self.pool()).fetchrow(self._lookup_sql, key)
        return row["tracking_number"] if row is not None and row["status"] == "BOOKED" else None

    async def cancel(self, key: str) -> bool:
        async with self._call("cancel", key):
            status = await (await self.pool()).execute(self._cancel_sql, key)
        return affected(status) > 0
