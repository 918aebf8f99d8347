"""``messaging.db.driver``: statements run on the asyncpg connection belong to SQLAlchemy's
transaction, so they commit and roll back with it."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import driver

pytestmark = pytest.mark.integration


class Abort(Exception):
    pass


async def test_raw_statements_commit_and_roll_back_with_the_transaction(
    engine: AsyncEngine, uid: str
) -> None:
    table = f"it_driver_{uid}"
    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (x int)"))
    try:
        with pytest.raises(Abort):
            async with engine.begin() as conn:
                pg = await driver(conn)  # the first statement of the transaction
                assert pg.is_in_transaction()
                await pg.execute(f"INSERT INTO {table} VALUES (1)")
                raise Abort
        async with engine.begin() as conn:
            pg = await driver(conn)
            await pg.execute(f"INSERT INTO {table} VALUES (2)")
            # SQLAlchemy's own statements see the raw one: the same transaction
            assert (await conn.execute(text(f"SELECT array_agg(x) FROM {table}"))).scalar() == [2]
        async with engine.connect() as conn:
            pg = await driver(conn)  # no transaction asked for: none is started
            assert not pg.is_in_transaction()
            assert await pg.fetchval(f"SELECT array_agg(x) FROM {table}") == [2]
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE {table}"))
