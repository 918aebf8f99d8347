"""Inventory service: stock per SKU and one reservation per order.

Never oversell: a reservation takes units with ``UPDATE ... SET available = available - q WHERE
available >= q``, one row lock per SKU in a fixed order, so two sagas racing for the last unit
serialise on the row and the second finds nothing left. A ``CHECK (available >= 0)`` backs it.
All-or-nothing: if any SKU is short, the decrements are rolled back to a savepoint.
Tombstones: a ReleaseInventory that arrives before its ReserveInventory records the release, and
the late reservation takes nothing.
"""

from __future__ import annotations

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
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from messaging.consumer import Context, Handler
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from schemas.inventory import (
    InventoryReleased,
    InventoryReserved,
    InventoryUnavailable,
    ReleaseInventory,
    ReserveInventory,
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
    #: PENDING (claimed in this transaction) -> RESERVED | UNAVAILABLE; RESERVED -> RELEASED;
    #: RELEASED without a reservation is a tombstone
    Column("status", Text, nullable=False),
    Column("items", JSONB, nullable=False),
    Column("short_skus", JSONB, nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


async def _claim(ctx: Context, order_id: str, status: str, items: list[dict[str, object]]):  # type: ignore[no-untyped-def]
    """Insert our row, or wait for and lock the existing one. Returns (row, inserted)."""
    inserted = await ctx.conn.execute(
        insert(reservations)
        .values(
            order_id=order_id,
            saga_id=ctx.envelope.saga_id,
            status=status,
            items=items,
            updated_at=ctx.now,
        )
        .on_conflict_do_nothing()
    )
    row = (
        await ctx.conn.execute(
            select(reservations).where(reservations.c.order_id == order_id).with_for_update()
        )
    ).one()
    return row, inserted.rowcount == 1


async def reserve(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, ReserveInventory)
    items = [i.model_dump() for i in cmd.items]
    row, inserted = await _claim(ctx, cmd.order_id, "PENDING", items)
    if not inserted:
        if row.status == "RESERVED":
            ctx.reply(InventoryReserved(order_id=cmd.order_id, reservation_id=cmd.order_id))
        else:
            ctx.reply(
                InventoryUnavailable(
                    order_id=cmd.order_id,
                    skus=tuple(row.short_skus or []),
                    released_before_reserve=row.status == "RELEASED",
                )
            )
        return
    short: list[str] = []
    savepoint = await ctx.conn.begin_nested()
    for item in sorted(cmd.items, key=lambda i: i.sku):  # fixed lock order: no deadlocks
        taken = await ctx.conn.execute(
            update(stock)
            .where(stock.c.sku == item.sku, stock.c.available >= item.quantity)
            .values(available=stock.c.available - item.quantity, updated_at=ctx.now)
        )
        if taken.rowcount != 1:
            short.append(item.sku)
    if short:
        await savepoint.rollback()
        await _set(ctx.conn, cmd.order_id, "UNAVAILABLE", ctx, short_skus=short)
        ctx.reply(InventoryUnavailable(order_id=cmd.order_id, skus=tuple(short)))
        return
    await savepoint.commit()
    await _set(ctx.conn, cmd.order_id, "RESERVED", ctx)
    ctx.reply(InventoryReserved(order_id=cmd.order_id, reservation_id=cmd.order_id))


async def _set(
    conn: AsyncConnection, order_id: str, status: str, ctx: Context, **values: object
) -> None:
    await conn.execute(
        update(reservations)
        .where(reservations.c.order_id == order_id)
        .values(status=status, updated_at=ctx.now, **values)
    )


async def release(ctx: Context) -> None:
    cmd = ctx.incoming.body
    assert isinstance(cmd, ReleaseInventory)
    row, inserted = await _claim(ctx, cmd.order_id, "RELEASED", [])
    if inserted or row.status != "RESERVED":
        # nothing was reserved (or it was released already): a tombstone or a repeat
        ctx.reply(InventoryReleased(order_id=cmd.order_id, units_released=0))
        return
    units = 0
    for item in sorted(row.items, key=lambda i: i["sku"]):
        await ctx.conn.execute(
            update(stock)
            .where(stock.c.sku == item["sku"])
            .values(available=stock.c.available + item["quantity"], updated_at=ctx.now)
        )
        units += int(item["quantity"])
    await _set(ctx.conn, cmd.order_id, "RELEASED", ctx)
    ctx.reply(InventoryReleased(order_id=cmd.order_id, units_released=units))


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
    }
    return ServiceDefinition("inventory", SCHEMA, metadata, handlers)
