"""PostgreSQL plumbing shared by every service: engine, database creation, outbox and inbox
tables. Each service owns one schema and keeps its outbox and inbox inside it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    event,
    exc,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from messaging.errors import StartRefused
from messaging.settings import Settings

OUTBOX_CHANNEL = "sagabus_outbox"


def make_engine(settings: Settings) -> AsyncEngine:
    # No pool_pre_ping: with asyncpg it is BEGIN, a query and ROLLBACK, three round trips on
    # every checkout. A connection that died meanwhile fails its first statement instead; that
    # error invalidates it and is transient, so the message is retried on a fresh one.
    engine = create_async_engine(
        settings.sqlalchemy_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_recycle=1800,
        # an error's text never carries the statement's parameters (payment tokens, addresses)
        # into logs, dead-letter headers or the CLI's messages
        hide_parameters=True,
    )
    event.listen(engine.sync_engine, "checkout", _drop_closed)
    return engine


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection whose server went away (a restart) is replaced at checkout.

    asyncpg notices the closed socket while the connection sits in the pool, so this costs no
    round trip; SQLAlchemy then opens a fresh connection in its place."""
    raw = getattr(dbapi_connection, "driver_connection", None)
    if raw is not None and raw.is_closed():
        raise exc.DisconnectionError("pooled connection was closed by the server")


async def driver(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under ``conn``, inside ``conn``'s transaction.

    For the statements run on every message: asyncpg runs a prepared statement for about a
    third of the Python time SQLAlchemy spends building, keying and executing one. SQLAlchemy
    sends BEGIN lazily, with its first statement; if it has not yet, a trivial statement makes
    it, so that nothing run here can escape the transaction.
    """
    raw = await conn.get_raw_connection()
    pg = raw.driver_connection
    assert pg is not None
    if conn.in_transaction() and not pg.is_in_transaction():
        adapted = raw.dbapi_connection
        start = getattr(adapted, "_start_transaction", None)
        if start is not None and getattr(adapted, "_started", None) is False:
            # what SQLAlchemy's asyncpg adapter does before its first statement: BEGIN, with
            # the connection's isolation settings, and no extra round trip for a dummy query
            await start()
        if not pg.is_in_transaction():
            await conn.exec_driver_sql("SELECT 1")
    return pg


def qualified(table: Table) -> str:
    """``"schema"."name"`` of ``table``, for the plain SQL of the hot paths: built once from the
    ``Table`` objects (which stay the source of the DDL) and run on asyncpg, which prepares each
    statement once per connection (SQLAlchemy 2.0 compiles PostgreSQL's ``INSERT .. ON
    CONFLICT`` anew on every call; see docs/benchmarks.md)."""
    return ".".join(f'"{part}"' for part in (table.schema, table.name) if part)


def affected(status: str) -> int:
    """Rows affected, from a command status such as ``INSERT 0 1`` or ``UPDATE 3``."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("message_id", Uuid, nullable=False, unique=True),
        Column("message_type", Text, nullable=False),
        Column("saga_id", Uuid, nullable=True),
        Column("exchange", Text, nullable=False),
        Column("routing_key", Text, nullable=False),
        Column("correlation_id", Uuid, nullable=True),
        Column("headers", JSONB, nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Index(None, "id", postgresql_where=text("sent_at IS NULL")),
        # retention finds old rows by age; a BRIN index costs next to nothing on insert
        Index(None, "created_at", postgresql_using="brin"),
    )


def inbox_table(metadata: MetaData) -> Table:
    return Table(
        "inbox",
        metadata,
        # keyed by id *and* type: an id chosen by an outside client (a start's) can never
        # collide with the id of another type of message, internal or not
        Column("message_id", Uuid, primary_key=True),
        Column("message_type", Text, primary_key=True),
        Column("saga_id", Uuid, nullable=True),
        Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Index(None, "received_at", postgresql_using="brin"),
    )


class SchemaNotProvisioned(StartRefused):
    """A table (or index, column, key) this version needs is missing, and the database role the
    service runs as may not create it: since ``sagabus provision`` a service's role uses its
    tables and owns nothing, so an upgrade that adds one is applied by the administrator. Raised
    at start, in one line, instead of a permission error on every delivery."""


#: what to do about it, at the end of every such message
PROVISION_ADVICE = (
    "run `sagabus provision --database-admin-url ...` (or `sagabus migrate`, then"
    " `sagabus provision`) as the database administrator"
)


async def missing_tables(conn: AsyncConnection, schema: str, metadata: MetaData) -> list[str]:
    """``schema.table`` of each table of ``metadata`` that does not exist, from the catalogue
    (readable by every role, unlike ``to_regclass`` of a schema the role may not use)."""
    wanted = [(t.schema or schema, t.name) for t in metadata.sorted_tables]
    if not wanted:
        return []
    present = {
        (r[0], r[1])
        for r in await conn.execute(
            text(
                "SELECT n.nspname, c.relname FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = ANY(:schemas)"
            ),
            {"schemas": sorted({s for s, _ in wanted})},
        )
    }
    return [f"{s}.{t}" for s, t in wanted if (s, t) not in present]


async def _may_create(conn: AsyncConnection, schema: str, schema_exists: bool) -> bool:
    query = (
        "SELECT has_schema_privilege(:schema, 'CREATE')"
        if schema_exists
        else "SELECT has_database_privilege(current_database(), 'CREATE')"
    )
    return bool(await conn.scalar(text(query), {"schema": schema}))


def _not_provisioned(
    what: str, error: BaseException | None = None, *, verb: str = "create"
) -> SchemaNotProvisioned:
    """The one-line error; ``error`` is the permission error of a statement that tried anyway."""
    cause = ""
    if error is not None:
        first = str(getattr(error, "orig", None) or error).strip().splitlines()
        cause = f" ({first[0][:160]})" if first else ""
    return SchemaNotProvisioned(
        f"{what}, and this database role may not {verb} it{cause}: " + PROVISION_ADVICE
    )


def _insufficient_privilege(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, asyncpg.InsufficientPrivilegeError):
            return True
        if getattr(seen, "sqlstate", None) == "42501":
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


async def create_schema(engine: AsyncEngine, schema: str, metadata: MetaData) -> None:
    """Create what is missing of ``schema`` and ``metadata``'s tables and indexes; when nothing
    is, no DDL is sent. A role that may not create them (a service's, since ``sagabus
    provision``) gets ``SchemaNotProvisioned`` naming what is missing."""
    async with engine.begin() as conn:
        # Concurrent start-ups race on CREATE SCHEMA/TABLE IF NOT EXISTS; serialise them.
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('sagabus-migrate'))"))
        # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the schema exists,
        # and a service running as its own role (``sagabus provision``) may not create schemas:
        # it is created only when it is missing
        exists = await conn.scalar(
            text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"), {"schema": schema}
        )
        missing = (
            [f"schema {schema}"] if not exists else await missing_tables(conn, schema, metadata)
        )
        if missing and not await _may_create(conn, schema, bool(exists)):
            raise _not_provisioned(f"{', '.join(missing)} missing")
        try:
            if not exists:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))
            # create_all skips the tables that exist; an index added since (the retention's BRIN
            # indexes) is created on them here
            await conn.run_sync(lambda sync: _create_missing_indexes(sync, metadata))
        except exc.DBAPIError as e:
            # an index or column a newer version added, on a table that is there
            if not _insufficient_privilege(e):
                raise
            raise _not_provisioned(f"an index or column of schema {schema} is missing", e) from None


def _create_missing_indexes(sync: Any, metadata: MetaData) -> None:
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(sync, checkfirst=True)


async def ensure_database(settings: Settings) -> bool:
    """Create the configured database if it does not exist. Returns True if it was created."""
    parts = urlsplit(settings.asyncpg_url)
    name = parts.path.lstrip("/")
    if not name:
        raise ValueError("SAGABUS_DATABASE_URL names no database")
    admin = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()


async def upgrade_inbox_key(engine: AsyncEngine, schema: str) -> bool:
    """An inbox made before the key included the message type gets the new key. True if it
    changed. Idempotent; serialised like ``create_schema``."""
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('sagabus-migrate'))"))
        columns = (
            await conn.execute(
                text(
                    "SELECT array_agg(a.attname::text ORDER BY a.attname)"
                    " FROM pg_index i JOIN pg_attribute a"
                    " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                    " WHERE i.indrelid = to_regclass(:t) AND i.indisprimary"
                ),
                {"t": f'"{schema}"."inbox"'},
            )
        ).scalar()
        if columns != ["message_id"]:
            return False
        try:
            await conn.execute(
                text(
                    f'ALTER TABLE "{schema}"."inbox" DROP CONSTRAINT inbox_pkey,'
                    " ADD PRIMARY KEY (message_id, message_type)"
                )
            )
        except exc.DBAPIError as e:
            if not _insufficient_privilege(e):
                raise
            raise _not_provisioned(
                f"{schema}.inbox has the old primary key (message_id)", e, verb="change"
            ) from None
        return True


#: connections a deployable holds besides its pool: the outbox relay's LISTEN connection
CONNECTIONS_OUTSIDE_POOL = 1
#: headroom for the CLI and the containers' health checks
CLI_CONNECTIONS = 5


async def check_pool_budget(
    engine_or_dsn: AsyncEngine | str, settings: Settings, *, deployables: int
) -> str | None:
    """A one-line warning when ``deployables`` processes with these settings can open more
    connections than the server accepts from ordinary roles, else None.

    Each process may open ``db_pool_size`` pooled connections plus as many overflow ones, and
    keeps one more for the outbox relay's LISTEN; the CLI and health checks get a small margin.
    The server keeps ``superuser_reserved_connections`` (and, from PostgreSQL 16,
    ``reserved_connections``) of its ``max_connections`` for administrators."""
    query = (
        "SELECT current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int,"
        " coalesce(current_setting('reserved_connections', true), '0')::int"
    )
    if isinstance(engine_or_dsn, str):
        conn = await asyncpg.connect(Settings(database_url=engine_or_dsn).asyncpg_url, timeout=10)
        try:
            row = await conn.fetchrow(query)
        finally:
            await conn.close()
        assert row is not None
        limit, su_reserved, reserved = row[0], row[1], row[2]
    else:
        async with engine_or_dsn.connect() as c:
            limit, su_reserved, reserved = (await c.execute(text(query))).one()
    available = limit - su_reserved - reserved
    per_process = 2 * settings.db_pool_size + CONNECTIONS_OUTSIDE_POOL
    needed = deployables * per_process + CLI_CONNECTIONS
    if needed <= available:
        return None
    fitting = ((available - CLI_CONNECTIONS) // max(deployables, 1) - CONNECTIONS_OUTSIDE_POOL) // 2
    advice = (
        f"set SAGABUS_DB_POOL_SIZE={fitting} or lower, or raise max_connections"
        if fitting >= 1
        else "raise max_connections or run fewer processes"
    )
    return (
        f"{deployables} processes x (2 x db_pool_size {settings.db_pool_size}"
        f" + {CONNECTIONS_OUTSIDE_POOL}) + {CLI_CONNECTIONS} for the CLI = {needed} connections,"
        f" but max_connections {limit} leaves {available} after {su_reserved + reserved}"
        f" reserved: {advice}"
    )
