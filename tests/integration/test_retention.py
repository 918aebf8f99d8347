"""Retention against the real database: expired inbox rows and old *sent* outbox rows go, in
batches; unsent outbox rows stay whatever their age, and so do young rows."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import create_schema, inbox_table, outbox_table
from messaging.retention import prune

pytestmark = pytest.mark.integration


async def test_prune_deletes_only_expired_inbox_rows_and_old_sent_outbox_rows(
    engine: AsyncEngine, uid: str
) -> None:
    schema = f"it_retention_{uid}"
    metadata = MetaData(schema=schema)
    inbox, outbox = inbox_table(metadata), outbox_table(metadata)
    await create_schema(engine, schema, metadata)
    ages = {"old": "now() - interval '3 days'", "young": "now() - interval '1 minute'"}
    try:
        async with engine.begin() as conn:
            for age, at in ages.items():
                for _ in range(7):  # more than one batch of 5 below
                    await conn.execute(
                        text(
                            f'INSERT INTO "{schema}".inbox (message_id, message_type, received_at)'
                            f" VALUES (:m, :t, {at})"
                        ),
                        {"m": uuid.uuid4(), "t": f"in-{age}"},
                    )
                for sent in ("sent", "unsent"):
                    for _ in range(7):
                        await conn.execute(
                            text(
                                f'INSERT INTO "{schema}".outbox (message_id, message_type,'
                                " exchange, routing_key, headers, body, created_at, sent_at)"
                                f" VALUES (:m, :t, 'x', 'k', '{{}}', '', {at},"
                                f" {at if sent == 'sent' else 'NULL'})"
                            ),
                            {"m": uuid.uuid4(), "t": f"out-{age}-{sent}"},
                        )

        removed = await prune(
            engine,
            inbox=inbox,
            outbox=outbox,
            inbox_keep=timedelta(days=2),
            outbox_keep=timedelta(days=1),
            batch=5,
        )

        assert removed == (7, 7)
        async with engine.connect() as conn:
            left_in = (
                await conn.execute(
                    text(f'SELECT message_type, count(*) FROM "{schema}".inbox GROUP BY 1')
                )
            ).all()
            left_out = (
                await conn.execute(
                    text(f'SELECT message_type, count(*) FROM "{schema}".outbox GROUP BY 1')
                )
            ).all()
        assert dict(left_in) == {"in-young": 7}
        assert dict(left_out) == {"out-old-unsent": 7, "out-young-sent": 7, "out-young-unsent": 7}

        # nothing expired is left: a second pass deletes nothing; keeping for ever deletes nothing
        assert await prune(
            engine,
            inbox=inbox,
            outbox=outbox,
            inbox_keep=timedelta(days=2),
            outbox_keep=timedelta(days=1),
            batch=5,
        ) == (0, 0)
        assert await prune(
            engine, inbox=inbox, outbox=outbox, inbox_keep=None, outbox_keep=None
        ) == (0, 0)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


async def test_migrating_an_existing_schema_adds_indexes_it_lacks(
    engine: AsyncEngine, uid: str
) -> None:
    """A schema created before an index was added to its tables gets the index on migrate."""
    schema = f"it_indexes_{uid}"
    metadata = MetaData(schema=schema)
    inbox_table(metadata)
    await create_schema(engine, schema, metadata)
    try:
        async with engine.begin() as conn:
            names = (
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                        {"s": schema},
                    )
                )
                .scalars()
                .all()
            )
            brin = [n for n in names if "received_at" in n]
            assert brin, names
            for name in brin:
                await conn.execute(text(f'DROP INDEX "{schema}"."{name}"'))
        await create_schema(engine, schema, metadata)  # as a service start-up does
        async with engine.connect() as conn:
            again = (
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                        {"s": schema},
                    )
                )
                .scalars()
                .all()
            )
        assert sorted(again) == sorted(names)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
