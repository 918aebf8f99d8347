"""Inventory service: stock per SKU and one reservation per order.

Never oversell: a reservation takes units with ``UPDATE ... SET available = available - q WHERE
available >= q``, one row lock per SKU in a fixed order, so two sagas racing for the last unit
serialise on the row and the second finds nothing left. A ``CHECK (available >= 0)`` backs it.
All-or-nothing: if any SKU is short, the decrements are rolled back to a savepoint.
Tombstones: a ReleaseInventory that arrives before its ReserveInventory records the release, and
the late reservation takes nothing.

Backorders: a ReserveInventory with ``allow_backorder`` that finds a SKU short takes no stock at
all; it records a backorder (``backorders``, OPEN) and answers InventoryBackordered with the
short SKUs. A ReleaseInventory of a backordered order cancels the backorder (CANCELLED) and
releases nothing.
Returns: RestockItems puts back on the shelf what the order's reservation took, once (the
reservation becomes RESTOCKED); a reservation that took nothing, or gave it back already
(released), restocks nothing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import asyncpg
from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from messaging.consumer import Context, Handler
from messaging.db import driver, qualified
from messaging.errors import PermanentError, TransientError
from messaging.retention import RetentionRule
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.inventory import (
    InventoryBackordered,
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ItemsRestocked,
    ReleaseInventory,
    ReserveInventory,
    RestockItems,
)

SCHEMA = "inventory"
metadata = MetaData(schema=SCHEMA)

stock = Table(
    "stock",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("available", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("available >= 0", name="stock_never_negative"),
)

reservations = Table(
    "reservations",
    metadata,
    Column("order_id", Text, primary_key=True),
    Column("saga_id", Uuid, nullable=False),
    #: PENDING (claimed in this transaction) -> RESERVED | UNAVAILABLE | BACKORDERED;
    #: RESERVED -> RELEASED | RESTOCKED (returned: its units back on the shelf);
    #: RELEASED without a reservation is a tombstone
    Column("status", Text, nullable=False),
    Column("items", JSONB, nullable=False),
    Column("short_skus", JSONB, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

backorders = Table(
    "backorders",
    metadata,
    Column("order_id", Text, primary_key=True),
    #: the order's line items, as its ReserveInventory asked for them
    Column("items", JSONB, nullable=False),
    #: OPEN (waiting for stock) -> CANCELLED (its checkout was compensated)
    Column("status", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


_STOCK = qualified(stock)
_RESERVATIONS = qualified(reservations)
_ROW = "status, items, short_skus"
_CLAIM = (
    f"INSERT INTO {_RESERVATIONS} (order_id, saga_id, status, items, updated_at)"
    f" VALUES ($1, $2, $3, $4::jsonb, $5) ON CONFLICT DO NOTHING RETURNING {_ROW}"
)
_LOCK = f"SELECT {_ROW} FROM {_RESERVATIONS} WHERE order_id = $1 FOR UPDATE"
#: the stock rows of an order, locked one by one in SKU order (so no two reservations can
#: deadlock), with their current levels: a lock that waited returns the row as it is now
_LOCK_STOCK = (
    f"SELECT sku, available FROM {_STOCK} WHERE sku = ANY($1::text[]) ORDER BY sku FOR UPDATE"
)
_WANTED = "unnest($1::text[], $2::int[]) AS wanted(sku, quantity)"
#: take the units (rows locked and checked just before) and mark the reservation, in one round
#: trip; the answer is the number of SKUs taken. ``available >= quantity`` stays as a guard,
#: behind the CHECK constraint.
_TAKE = (
    f"WITH taken AS (UPDATE {_STOCK} s SET available = s.available - wanted.quantity,"
    f" updated_at = $3 FROM {_WANTED}"
    " WHERE s.sku = wanted.sku AND s.available >= wanted.quantity RETURNING s.sku)"
    f" UPDATE {_RESERVATIONS} SET status = 'RESERVED', updated_at = $3 WHERE order_id = $4"
    " RETURNING (SELECT count(*) FROM taken)"
)
_GIVE_BACK = (
    f"WITH returned AS (UPDATE {_STOCK} s SET available = s.available + wanted.quantity,"
    f" updated_at = $3 FROM {_WANTED} WHERE s.sku = wanted.sku RETURNING s.sku)"
    f" UPDATE {_RESERVATIONS} SET status = 'RELEASED', updated_at = $3 WHERE order_id = $4"
    " RETURNING (SELECT count(*) FROM returned)"
)
_SHORT = (
    f"UPDATE {_RESERVATIONS} SET status = $4, short_skus = $2::jsonb,"
    " updated_at = $3 WHERE order_id = $1"
)
_BACKORDERS = qualified(backorders)
_BACKORDER = (
    f"INSERT INTO {_BACKORDERS} (order_id, items, status, created_at)"
    " VALUES ($1, $2::jsonb, 'OPEN', $3) ON CONFLICT DO NOTHING"
)
_CANCEL_BACKORDER = (
    f"UPDATE {_BACKORDERS} SET status = 'CANCELLED' WHERE order_id = $1 AND status = 'OPEN'"
)
#: back on the shelf: the units the reservation took, and the reservation marked, in one round
#: trip (a SKU whose stock row is gone gets its row back)
_RESTOCK = (
    f"WITH restocked AS (INSERT INTO {_STOCK} AS s (sku, available, updated_at)"
    f" SELECT wanted.sku, wanted.quantity, $3::timestamptz FROM {_WANTED}"
    " ON CONFLICT (sku) DO UPDATE SET available = s.available + EXCLUDED.available,"
    " updated_at = EXCLUDED.updated_at RETURNING s.sku)"
    f" UPDATE {_RESERVATIONS} SET status = 'RESTOCKED', updated_at = $3 WHERE order_id = $4"
    " RETURNING (SELECT count(*) FROM restocked)"
)


async def _claim(
    ctx: Context, pg: asyncpg.Connection, order_id: str, status: str, items: list[dict[str, Any]]
) -> tuple[asyncpg.Record, bool]:
    """Insert our row, or wait for and lock the existing one. Returns (row, inserted)."""
    row = await pg.fetchrow(
        _CLAIM, order_id, ctx.envelope.saga_id, status, json.dumps(items), ctx.now
    )
    if row is not None:
        return row, True
    # Someone's row is there (committed, or inserted by a transaction we waited for): a new
    # statement sees it, and waits for its lock.
    row = await pg.fetchrow(_LOCK, order_id)
    if row is None:
        raise TransientError(f"reservation of {order_id} vanished while claiming it")
    return row, False


def _json(value: Any) -> Any:
    """A JSONB value, whichever codec the connection has (SQLAlchemy's decodes it)."""
    return json.loads(value) if isinstance(value, str) else value


def _quantities(items: Iterable[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Units per SKU (a SKU listed twice takes both), in SKU order: the lock order."""
    wanted: dict[str, int] = defaultdict(int)
    for sku, quantity in items:
        wanted[sku] += quantity
    skus = sorted(wanted)
    return skus, [wanted[sku] for sku in skus]


async def reserve(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, ReserveInventory)
    pg = await driver(ctx.conn)
    items = [i.model_dump() for i in cmd.items]
    row, inserted = await _claim(ctx, pg, cmd.order_id, "PENDING", items)
    if not inserted:
        if row["status"] in ("RESERVED", "RESTOCKED"):
            ctx.reply(InventoryReserved(order_id=cmd.order_id, reservation_id=cmd.order_id))
        elif row["status"] == "BACKORDERED":
            short_skus = tuple(_json(row["short_skus"]) or [])
            ctx.reply(InventoryBackordered(order_id=cmd.order_id, skus=short_skus))
        else:
            ctx.reply(
                InventoryUnavailable(
                    order_id=cmd.order_id,
                    skus=tuple(_json(row["short_skus"]) or []),
                    released_before_reserve=row["status"] == "RELEASED",
                )
            )
        return
    skus, quantities = _quantities((i.sku, i.quantity) for i in cmd.items)
    # All or nothing: lock every SKU of the order first (in a fixed order: no deadlocks), and
    # take units only if every one has enough. Two sagas racing for the last unit serialise on
    # the row lock, and the second sees what the first left.
    levels = {r["sku"]: r["available"] for r in await pg.fetch(_LOCK_STOCK, skus)}
    short = [
        sku for sku, quantity in zip(skus, quantities, strict=True) if levels.get(sku, 0) < quantity
    ]
    if short and cmd.allow_backorder:
        # the order waits for stock: it takes none now (no unit is held for a backorder)
        await pg.execute(_SHORT, cmd.order_id, json.dumps(short), ctx.now, "BACKORDERED")
        await pg.execute(_BACKORDER, cmd.order_id, json.dumps(items), ctx.now)
        ctx.reply(InventoryBackordered(order_id=cmd.order_id, skus=tuple(short)))
        return
    if short:
        await pg.execute(_SHORT, cmd.order_id, json.dumps(short), ctx.now, "UNAVAILABLE")
        ctx.reply(InventoryUnavailable(order_id=cmd.order_id, skus=tuple(short)))
        return
    taken = await pg.fetchval(_TAKE, skus, quantities, ctx.now, cmd.order_id)
    if taken != len(skus):
        # cannot happen while the rows are locked: roll the whole transaction back
        raise PermanentError(f"took {taken} of {len(skus)} locked SKUs for {cmd.order_id}")
    ctx.reply(InventoryReserved(order_id=cmd.order_id, reservation_id=cmd.order_id))


async def release(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, ReleaseInventory)
    pg = await driver(ctx.conn)
    row, inserted = await _claim(ctx, pg, cmd.order_id, "RELEASED", [])
    if not inserted and row["status"] == "BACKORDERED":
        # it took no stock: the backorder is cancelled (idempotent), nothing is released. The
        # reservation stays BACKORDERED, so a re-sent ReserveInventory answers as before.
        await pg.execute(_CANCEL_BACKORDER, cmd.order_id)
        ctx.reply(InventoryReleased(order_id=cmd.order_id, units_released=0))
        return
    if inserted or row["status"] != "RESERVED":
        # nothing was reserved (or it was released already): a tombstone or a repeat
        ctx.reply(InventoryReleased(order_id=cmd.order_id, units_released=0))
        return
    skus, quantities = _quantities((i["sku"], int(i["quantity"])) for i in _json(row["items"]))
    await pg.fetch(_LOCK_STOCK, skus)  # the same lock order as a reservation
    await pg.fetchval(_GIVE_BACK, skus, quantities, ctx.now, cmd.order_id)
    ctx.reply(InventoryReleased(order_id=cmd.order_id, units_released=sum(quantities)))


async def restock(ctx: Context) -> None:
    """Put back what the order's reservation took, once. A re-send finds the reservation
    RESTOCKED and answers the same count; an order whose reservation took nothing (unknown,
    unavailable, backordered) or gave it back already (released) restocks 0 and writes
    nothing."""
    cmd = ctx.incoming.body
    assert isinstance(cmd, RestockItems)
    pg = await driver(ctx.conn)
    row = await pg.fetchrow(_LOCK, cmd.order_id)
    if row is None or row["status"] not in ("RESERVED", "RESTOCKED"):
        ctx.reply(ItemsRestocked(order_id=cmd.order_id, units_restocked=0))
        return
    skus, quantities = _quantities((i["sku"], int(i["quantity"])) for i in _json(row["items"]))
    if row["status"] == "RESERVED":
        await pg.fetch(_LOCK_STOCK, skus)  # the same lock order as a reservation
        await pg.fetchval(_RESTOCK, skus, quantities, ctx.now, cmd.order_id)
    ctx.reply(ItemsRestocked(order_id=cmd.order_id, units_restocked=sum(quantities)))


async def seed(conn: AsyncConnection, levels: dict[str, int], *, add: bool = False) -> None:
    """Set (or with ``add``, increase) the available units of SKUs."""
    for sku, qty in levels.items():
        stmt = insert(stock).values(sku=sku, available=qty)
        stmt = stmt.on_conflict_do_update(
            index_elements=["sku"],
            set_={
                "available": (stock.c.available + qty) if add else qty,
                "updated_at": func.now(),
            },
        )
        await conn.execute(stmt)


def definition(settings: Settings) -> ServiceDefinition:
    handlers: dict[str, Handler] = {
        ReserveInventory.TYPE: reserve,
        ReleaseInventory.TYPE: release,
        RestockItems.TYPE: restock,
    }
    # reservations that are settled (PENDING exists only inside a transaction); stock is kept,
    # and so are the OPEN backorders (they wait for stock)
    retained = (
        RetentionRule(reservations, "updated_at", "participant_retention_s", "status <> 'PENDING'"),
        RetentionRule(backorders, "created_at", "participant_retention_s", "status = 'CANCELLED'"),
    )
    return ServiceDefinition("inventory", SCHEMA, metadata, handlers, retained=retained)
