"""PostgreSQL least privilege: every service runs as a login role of its own that may read and
write the rows of its own schema and nothing else (a NOLOGIN owner role, which nobody can become,
owns the schema, so the service cannot plant a trigger, rule, view or function that would run as
the operator); the operator's role reads everything and writes only what the CLI writes.

Each module run gets a database ``sagabus_dbroles_<id>`` and roles with a prefix of its own;
both are removed at the end (roles are shared by the whole server)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
import pytest_asyncio
from click.testing import CliRunner
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from cli.provision import provision as provision_command
from messaging import deadletters, topology
from messaging.db import SchemaNotProvisioned, check_pool_budget, create_schema, make_engine
from messaging.provision import broker as provision
from messaging.provision import database as provision_db
from messaging.service import Runtime, migrate, unreachable
from messaging.settings import Settings
from participants.inventory import service as inventory
from participants.payment import service as payment
from process_manager import bootstrap
from process_manager.erase import erase
from schemas.envelope import HeaderNames
from schemas.payment import AuthorizePayment, PaymentAuthorized
from tests import support
from tests.security.conftest import ADMIN_URL, PG_ADMIN, Provisioned, delete_users
from tests.support import wait_for

pytestmark = pytest.mark.integration

SERVICES = tuple(provision_db.SCHEMAS)


def db_url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"


async def create_database(name: str) -> str:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return db_url(name)


async def drop_roles(prefix: str) -> None:
    """Roles that own nothing any more (their database is gone) drop cleanly."""
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        names = await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)", prefix
        )
        for r in names:
            await conn.execute(f'DROP ROLE IF EXISTS "{r["rolname"]}"')
    finally:
        await conn.close()


async def isolated(prefix: str) -> tuple[str, str]:
    name = f"sagabus_dbroles_{uuid.uuid4().hex[:10]}"
    return name, await create_database(name)


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"sagabus_t{uuid.uuid4().hex[:8]}_"


@pytest_asyncio.fixture(scope="module")
async def admin_dsn(prefix: str) -> AsyncIterator[str]:
    name, url = await isolated(prefix)
    try:
        yield url
    finally:
        await support.drop_database(PG_ADMIN, name)
        await drop_roles(prefix)


@pytest_asyncio.fixture(scope="module")
async def roles(admin_dsn: str, prefix: str) -> dict[str, str]:
    """principal -> its DSN, from ``apply_roles``."""
    return await provision_db.apply_roles(admin_dsn, role_prefix=prefix)


async def connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn)


def engine_for(dsn: str) -> AsyncEngine:
    return create_async_engine(
        "postgresql+asyncpg://" + dsn.removeprefix("postgresql://"), poolclass=NullPool
    )


async def test_dsns_name_each_role_on_the_same_database(
    roles: dict[str, str], admin_dsn: str, prefix: str
) -> None:
    assert set(roles) == set(provision_db.PRINCIPALS)
    for principal in SERVICES:  # the model names the schemas the code uses
        assert provision_db.service_metadata(principal).schema == provision_db.SCHEMAS[principal]
    admin = urllib.parse.urlsplit(admin_dsn)
    for principal, dsn in roles.items():
        url = urllib.parse.urlsplit(dsn)
        assert (url.hostname, url.port, url.path) == (admin.hostname, admin.port, admin.path)
        assert url.username == prefix + principal.replace("-", "_")
        assert url.password and len(url.password) >= 24
        conn = await connect(dsn)
        try:
            assert await conn.fetchval("SELECT current_user") == url.username
            attrs = await conn.fetchrow(
                "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles"
                " WHERE rolname = current_user"
            )
            assert not any(attrs.values())
        finally:
            await conn.close()


async def test_process_manager_cannot_read_payments(roles: dict[str, str]) -> None:
    conn = await connect(roles["process-manager"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetch("SELECT * FROM payment.payments")
        # its own tables it reads and writes
        assert await conn.fetchval("SELECT count(*) FROM process_manager.sagas") == 0
    finally:
        await conn.close()


async def test_notification_cannot_write_the_ledger(roles: dict[str, str]) -> None:
    conn = await connect(roles["notification"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute(
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at)"
                " VALUES ('o-1', gen_random_uuid(), 'refund', 100, now())"
            )
    finally:
        await conn.close()
    admin = await connect(roles["payment"])
    try:
        assert await admin.fetchval("SELECT count(*) FROM payment.ledger") == 0
    finally:
        await admin.close()


async def _migrate_as(principal: str, engine: AsyncEngine) -> None:
    if principal == "dead-letters":
        await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
    else:
        await migrate([bootstrap.FACTORIES[principal](Settings())], engine)


def _capture_statements(engine: AsyncEngine) -> list[str]:
    """Every statement ``engine`` sends through SQLAlchemy (where the migrations run)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    return sent


def _ddl(statements: list[str]) -> list[str]:
    return [
        s
        for s in statements
        if s.lstrip().split(" ", 1)[0].upper()
        in {"CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT", "TRUNCATE"}
    ]


def _passwords(roles: dict[str, str]) -> dict[str, str]:
    return {p: urllib.parse.urlsplit(d).password or "" for p, d in roles.items()}


def _user(dsn: str) -> str:
    name = urllib.parse.urlsplit(dsn).username
    assert name is not None
    return name


@pytest.mark.parametrize("principal", SERVICES)
async def test_each_service_starts_as_its_role_without_ddl_and_uses_only_its_own_schema(
    roles: dict[str, str], prefix: str, principal: str
) -> None:
    schema = provision_db.SCHEMAS[principal]
    metadata = provision_db.service_metadata(principal)
    engine = engine_for(roles[principal])
    sent = _capture_statements(engine)
    try:
        await _migrate_as(principal, engine)  # what a service does at every start
        await _migrate_as(principal, engine)
        assert sent and _ddl(sent) == []
        async with engine.begin() as c:
            for t in metadata.sorted_tables:
                await c.exec_driver_sql(f'SELECT count(*) FROM "{schema}"."{t.name}"')
    finally:
        await engine.dispose()

    admin = await connect(roles["operator"])  # the catalogue is readable by every role
    try:
        owners = await admin.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = $1", schema
        )
        owner = provision_db.owner_role_name(principal, prefix)
        assert [r["tableowner"] for r in owners] == [owner]
        assert (
            await admin.fetchval(
                "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1", schema
            )
            == owner
        )
    finally:
        await admin.close()

    conn = await connect(roles[principal])
    table = f'"{schema}"."{metadata.sorted_tables[0].name}"'
    try:
        # what a role without CREATE on the database may not do, and why create_schema checks
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE SCHEMA sagabus_elsewhere")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.sagabus_elsewhere (n int)")
        # nor change anything of its own schema but rows
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'CREATE TABLE "{schema}".probe (n int)')
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
            await conn.execute(f"DROP TABLE {table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"TRUNCATE {table}")
        for other, other_schema in provision_db.SCHEMAS.items():
            if other == principal:
                continue
            other_table = provision_db.service_metadata(other).sorted_tables[0].name
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f'SELECT * FROM "{other_schema}"."{other_table}" LIMIT 1')
    finally:
        await conn.close()


async def test_the_service_role_cannot_plant_code_that_runs_as_the_operator(
    roles: dict[str, str], prefix: str
) -> None:
    """The attack of the review: a trigger (or rule, policy, view or function) on the service's
    own table, which would run as the operator when the CLI writes or reads it."""
    pay = await connect(roles["payment"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pay.execute(
                "CREATE FUNCTION payment.evil() RETURNS trigger LANGUAGE plpgsql"
                " AS $$ BEGIN RETURN NEW; END $$"
            )
        # a function in pg_temp it may make (TEMPORARY), but not hang it on a table
        await pay.execute(
            "CREATE FUNCTION pg_temp.evil() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RETURN NEW; END $$"
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pay.execute(
                "CREATE TRIGGER evil BEFORE UPDATE ON payment.payments"
                " FOR EACH STATEMENT EXECUTE FUNCTION pg_temp.evil()"
            )
        for statement in (
            "CREATE TABLE payment.sneaky (n int)",
            "CREATE VIEW payment.sneaky AS SELECT 1 AS n",
            "CREATE TYPE payment.sneaky AS (n int)",
            "ALTER TABLE payment.payments ADD COLUMN sneaky int",
            "ALTER TABLE payment.payments RENAME TO payments_old",
            "ALTER TABLE payment.payments ALTER COLUMN reason SET DEFAULT pg_temp.evil()::text",
            "ALTER TABLE payment.payments ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY sneaky ON payment.payments USING (true)",
            "CREATE RULE sneaky AS ON UPDATE TO payment.payments DO ALSO NOTIFY sneaky",
            "CREATE INDEX sneaky ON payment.payments (reason)",
            "ALTER SCHEMA payment RENAME TO payment_old",
            f"SET ROLE {provision_db.owner_role_name('payment', prefix)}",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pay.execute(statement)
        # granting what it does not own is a no-op (a warning, not an error)
        await pay.execute(f"GRANT SELECT ON payment.payments TO {_user(roles['process-manager'])}")
        privileges = await pay.fetch(
            "SELECT privilege_type FROM information_schema.role_table_grants"
            " WHERE table_schema = 'payment' AND table_name = 'payments' AND grantee = current_user"
        )
        assert {r["privilege_type"] for r in privileges} == {"SELECT", "INSERT", "UPDATE", "DELETE"}
    finally:
        await pay.close()
    pm = await connect(roles["process-manager"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pm.fetch("SELECT * FROM payment.payments LIMIT 1")
    finally:
        await pm.close()


async def test_no_login_role_is_a_member_of_an_owner_role(
    roles: dict[str, str], admin_dsn: str, prefix: str
) -> None:
    admin = await connect(admin_dsn)
    try:
        for principal in SERVICES:
            owner = provision_db.owner_role_name(principal, prefix)
            attrs = await admin.fetchrow(
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls"
                " FROM pg_roles WHERE rolname = $1",
                owner,
            )
            assert attrs is not None and not any(attrs.values()), owner
            assert (
                await admin.fetchval(
                    "SELECT count(*) FROM pg_auth_members WHERE roleid = $1::regrole"
                    " OR member = $1::regrole",
                    owner,
                )
                == 0
            ), owner
            for login in roles.values():
                assert not await admin.fetchval(
                    "SELECT pg_has_role($1, $2, 'MEMBER')", _user(login), owner
                )
    finally:
        await admin.close()


async def test_a_table_an_upgrade_adds_needs_provisioning(
    roles: dict[str, str], admin_dsn: str, prefix: str
) -> None:
    """A service does not create a missing table: it stops at start with one line that names
    it and says to provision; the administrator's tables are usable before provisioning (default
    privileges) and owned by the owner role after."""
    principal, schema = "analytics", provision_db.SCHEMAS["analytics"]
    metadata = provision_db.service_metadata(principal)
    victim = metadata.sorted_tables[-1].name
    admin = await connect(admin_dsn)
    try:
        await admin.execute(f'DROP TABLE "{schema}"."{victim}" CASCADE')
    finally:
        await admin.close()
    engine = engine_for(roles[principal])
    sent = _capture_statements(engine)
    try:
        with pytest.raises(SchemaNotProvisioned) as failed:
            await _migrate_as(principal, engine)
        message = str(failed.value)
        assert "\n" not in message
        assert f"{schema}.{victim}" in message and "sagabus provision" in message
        assert _ddl(sent) == []
        # the runtime's start-up does not take it for an outage to wait out
        assert not unreachable(failed.value)

        # `sagabus migrate` of a newer version, as the administrator: the table and another
        admin_engine = engine_for(admin_dsn)
        try:
            await _migrate_as(principal, admin_engine)
            async with admin_engine.begin() as c:
                await c.exec_driver_sql(f'CREATE TABLE "{schema}".added (n int)')
        finally:
            await admin_engine.dispose()
        async with engine.begin() as c:  # usable before provisioning
            await c.exec_driver_sql(f'INSERT INTO "{schema}".added VALUES (7)')
        op = await connect(roles["operator"])
        try:
            assert await op.fetchval(f'SELECT n FROM "{schema}".added') == 7
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await op.execute(f'INSERT INTO "{schema}".added VALUES (8)')
        finally:
            await op.close()

        await provision_db.apply_roles(admin_dsn, role_prefix=prefix, passwords=_passwords(roles))
        sent.clear()
        await _migrate_as(principal, engine)
        assert _ddl(sent) == []

        # an index a newer version adds to a table that is there: the same
        admin = await connect(admin_dsn)
        try:
            index = await admin.fetchval(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1 AND tablename = 'outbox'"
                " AND indexdef LIKE '%brin%'",
                schema,
            )
            await admin.execute(f'DROP INDEX "{schema}"."{index}"')
        finally:
            await admin.close()
        with pytest.raises(SchemaNotProvisioned, match="index") as failed:
            await _migrate_as(principal, engine)
        assert "\n" not in str(failed.value) and "sagabus provision" in str(failed.value)
        await provision_db.apply_roles(admin_dsn, role_prefix=prefix, passwords=_passwords(roles))
        sent.clear()
        await _migrate_as(principal, engine)
        assert _ddl(sent) == []

        # an inbox with the key of before issue 9: provisioning changes it, the service may not
        admin = await connect(admin_dsn)
        try:
            await admin.execute(
                f'ALTER TABLE "{schema}".inbox DROP CONSTRAINT inbox_pkey,'
                " ADD PRIMARY KEY (message_id)"
            )
        finally:
            await admin.close()
        with pytest.raises(SchemaNotProvisioned, match="old primary key"):
            await _migrate_as(principal, engine)
        await provision_db.apply_roles(admin_dsn, role_prefix=prefix, passwords=_passwords(roles))
        sent.clear()
        await _migrate_as(principal, engine)
        assert _ddl(sent) == []
        async with engine.begin() as c:
            owners = await c.exec_driver_sql(
                f"SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = '{schema}'"
            )
            assert [r[0] for r in owners] == [provision_db.owner_role_name(principal, prefix)]
            assert (await c.exec_driver_sql(f'SELECT n FROM "{schema}".added')).scalar() == 7
    finally:
        await engine.dispose()
        admin = await connect(admin_dsn)
        try:
            await admin.execute(f'DROP TABLE IF EXISTS "{schema}".added')
        finally:
            await admin.close()


async def test_operator_reads_every_schema_and_writes_only_the_clis_tables(
    roles: dict[str, str],
) -> None:
    op = await connect(roles["operator"])
    try:
        tables = await op.fetch(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname = ANY($1)",
            list(provision_db.SCHEMAS.values()),
        )
        assert {r["schemaname"] for r in tables} == set(provision_db.SCHEMAS.values())
        for r in tables:
            await op.fetchval(f'SELECT count(*) FROM "{r["schemaname"]}"."{r["tablename"]}"')
        for (schema, table), privileges in provision_db.OPERATOR_WRITES.items():
            for privilege in privileges:
                kind, _, columns = privilege.partition(" ")
                for column in columns.strip("()").split(", ") if columns else [None]:
                    target = "format('%I.%I', $1::text, $2::text)"
                    args: tuple[str, ...]
                    if column is None:
                        query, args = f"SELECT has_table_privilege({target}, $3)", (kind,)
                    else:
                        query = f"SELECT has_column_privilege({target}, $3::text, $4)"
                        args = (column, kind)
                    granted = await op.fetchval(query, schema, table, *args)
                    assert granted, (schema, table, privilege)
        # `erase` may overwrite a customer id, nothing else of the order
        await op.execute("UPDATE orders.orders SET customer_id = 'redacted' WHERE false")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute("UPDATE orders.orders SET amount_minor = 0 WHERE false")
        await op.fetch("SELECT 1 FROM payment.payments WHERE false FOR UPDATE")
        for privilege in ("INSERT", "UPDATE", "DELETE"):
            assert not await op.fetchval(
                "SELECT has_table_privilege('payment.ledger', $1)", privilege
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute("DELETE FROM dead_letters.dead_letters")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute(f'CREATE TABLE "{inventory.SCHEMA}".sneaky (n int)')
    finally:
        await op.close()

    # `sagabus inventory seed`, as the CLI runs it: migrate (a no-op) then upsert the stock
    engine = engine_for(roles["operator"])
    try:
        await migrate([inventory.definition(Settings())], engine)
        await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)  # `dlq ...`
        async with engine.begin() as c:
            await inventory.seed(c, {"SKU-OP-1": 3})
        async with engine.begin() as c:
            await inventory.seed(c, {"SKU-OP-1": 2}, add=True)
        async with engine.connect() as c:
            row = (
                await c.execute(select(inventory.stock).where(inventory.stock.c.sku == "SKU-OP-1"))
            ).one()
        assert row.available == 5
    finally:
        await engine.dispose()


async def test_apply_roles_twice_is_harmless(
    roles: dict[str, str], admin_dsn: str, prefix: str
) -> None:
    payment_engine = engine_for(roles["payment"])
    try:
        async with payment_engine.begin() as c:
            await c.exec_driver_sql(
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at)"
                " VALUES ('o-twice', gen_random_uuid(), 'capture', 100, now())"
            )
    finally:
        await payment_engine.dispose()

    passwords = {p: urllib.parse.urlsplit(d).password or "" for p, d in roles.items()}
    again = await provision_db.apply_roles(admin_dsn, role_prefix=prefix, passwords=passwords)
    assert again == roles
    fresh = await provision_db.apply_roles(admin_dsn, role_prefix=prefix)  # new passwords
    assert {p: urllib.parse.urlsplit(d).username for p, d in fresh.items()} == {
        p: urllib.parse.urlsplit(d).username for p, d in roles.items()
    }
    await provision_db.apply_roles(admin_dsn, role_prefix=prefix, passwords=passwords)

    pm = await connect(roles["process-manager"])
    op = await connect(roles["operator"])
    pay = await connect(roles["payment"])
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await pm.fetch("SELECT * FROM payment.payments")
        assert await op.fetchval("SELECT count(*) FROM payment.ledger WHERE order_id = 'o-twice'")
        assert await pay.fetchval("SELECT count(*) FROM payment.ledger WHERE order_id = 'o-twice'")
    finally:
        for c in (pm, op, pay):
            await c.close()

    # the password stored is the one returned (checked against the server's own verifier)
    admin = await connect(admin_dsn)
    try:
        stored = await admin.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            urllib.parse.urlsplit(roles["order"]).username,
        )
    finally:
        await admin.close()
    assert stored == _same_salt(stored, passwords["order"])


def _same_salt(stored: str, password: str) -> str:
    iterations, rest = stored.removeprefix("SCRAM-SHA-256$").split(":", 1)
    salt = base64.b64decode(rest.split("$", 1)[0])
    return provision_db.scram_verifier(password, salt=salt, iterations=int(iterations))


async def test_scram_verifier_is_what_postgresql_computes(admin_dsn: str, prefix: str) -> None:
    role = f"{prefix}scram"
    admin = await connect(admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role}")
        await admin.execute("SET password_encryption = 'scram-sha-256'")
        await admin.execute(f"ALTER ROLE {role} PASSWORD 'pencil-Ü-ok'")
        await admin.execute(f"ALTER ROLE {role} PASSWORD 'correct horse 42'")
        stored = await admin.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)
    finally:
        await admin.close()
    assert stored == _same_salt(stored, "correct horse 42")
    assert stored != _same_salt(stored, "correct horse 43")


async def test_pool_budget_warns_for_an_oversized_pool(roles: dict[str, str]) -> None:
    defaults = Settings(db_pool_size=Settings.model_fields["db_pool_size"].default)
    for target in (roles["process-manager"], engine_for(roles["process-manager"])):
        try:
            assert await check_pool_budget(target, defaults, deployables=8) is None
            warning = await check_pool_budget(
                target, defaults.model_copy(update={"db_pool_size": 50}), deployables=8
            )
            assert warning is not None and "\n" not in warning
            assert "max_connections" in warning and "SAGABUS_DB_POOL_SIZE=" in warning
        finally:
            if isinstance(target, AsyncEngine):
                await target.dispose()
    # the default budget is tight: one more process than the stack runs does not fit
    assert await check_pool_budget(roles["order"], defaults, deployables=40) is not None


# -- a service as its login role, end to end; the operator's CLI on its tables ------------------


async def test_a_service_runs_as_its_login_role_end_to_end(
    roles: dict[str, str], own_provisioned: Provisioned
) -> None:
    """The payment service, as its own broker user and its own database role (which owns
    nothing), starts without DDL and answers an AuthorizePayment; then the operator's `erase`
    (as the CLI runs it) redacts what it wrote."""
    s = Settings(
        amqp_url=own_provisioned.url("payment"),
        database_url=roles["payment"],
        declare_topology=False,
        timeout_poll_s=0.1,
        outbox_poll_s=0.2,
        db_pool_size=2,
    )
    engine = make_engine(s)
    sent = _capture_statements(engine)
    runtime = Runtime(bootstrap.definitions(s, ["payment"]), s, engine=engine)
    order_id, saga_id = f"dbroles-{uuid.uuid4().hex[:10]}", uuid.uuid4()
    try:
        await runtime.start()
        assert sent and _ddl(sent) == []
        cmd = AuthorizePayment(
            order_id=order_id, amount_minor=1234, currency="EUR", payment_token="tok_visa"
        )
        pm_user = urllib.parse.unquote(
            urllib.parse.urlsplit(own_provisioned.url("process-manager")).username or ""
        )
        message = aio_pika.Message(
            body=cmd.model_dump_json().encode(),
            content_type="application/json",
            message_id=str(uuid.uuid4()),
            correlation_id=str(saga_id),
            type=cmd.TYPE,
            timestamp=datetime.now(UTC),
            user_id=pm_user,
            headers={
                HeaderNames.SAGA_ID: str(saga_id),
                HeaderNames.IDEMPOTENCY_KEY: f"{saga_id}:authorization",
                HeaderNames.STEP: "authorization",
                HeaderNames.FENCE: 1,
                HeaderNames.REPLY_TOKEN: uuid.uuid4().hex,
            },
        )
        # sent as the process manager sends it, and its reply read from the process manager's
        # queue (nobody consumes it in this vhost)
        connection = await aio_pika.connect(own_provisioned.url("process-manager"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
            await exchange.publish(message, routing_key="payment.AuthorizePayment", mandatory=True)
            queue = await channel.get_queue(topology.QUEUES["process-manager"].name, ensure=False)

            async def reply() -> Any:
                return await queue.get(no_ack=True, fail=False)

            got = await wait_for(reply, what="the payment service's reply")
        assert got.type == PaymentAuthorized.TYPE
        assert got.user_id == urllib.parse.unquote(
            urllib.parse.urlsplit(own_provisioned.url("payment")).username or ""
        )
        assert got.headers[HeaderNames.SAGA_ID] == str(saga_id)
        assert _ddl(sent) == []
    finally:
        await runtime.stop()
        await engine.dispose()

    op = engine_for(roles["operator"])
    try:
        async with op.connect() as c:
            payment_row = (
                await c.execute(
                    select(payment.payments).where(payment.payments.c.order_id == order_id)
                )
            ).one()
            assert payment_row.status == "AUTHORIZED"
            assert payment_row.payment_token == "tok_visa"
            outbox = payment.definition(Settings()).outbox
            unsent = await c.execute(
                select(outbox.c.id).where(outbox.c.saga_id == saga_id, outbox.c.sent_at.is_(None))
            )
            assert unsent.all() == []
        # `sagabus erase --order`, as the operator
        report = await erase(op, bootstrap.definitions(Settings()), order=order_id)
        assert report.orders == [order_id] and report.touched.get("payment.payments")
        async with op.connect() as c:
            token = (
                await c.execute(
                    select(payment.payments.c.payment_token).where(
                        payment.payments.c.order_id == order_id
                    )
                )
            ).scalar_one()
            assert token != "tok_visa"
        # `dlq purge` and the writes of `resume` / `compensate` (rolled back: the operator may
        # not delete what it wrote)
        assert await deadletters.purge(op, deadletters.Filters(queue="nowhere"), limit=10) == 0
        async with op.connect() as c:
            await c.exec_driver_sql(
                "INSERT INTO process_manager.outbox (message_id, message_type, exchange,"
                " routing_key, headers, body) VALUES (gen_random_uuid(), 'probe', 'x', 'y',"
                " '{}', '\\x00')"
            )
            await c.exec_driver_sql(
                "UPDATE process_manager.sagas SET version = version WHERE false"
            )
            await c.rollback()
    finally:
        await op.dispose()


# -- a database provisioned by the previous version ----------------------------------------------


async def _provision_the_old_way(admin_dsn: str, prefix: str) -> dict[str, str]:
    """What the previous version left: each service's login role owns its schema and tables,
    the operator's default privileges are set for it, and there are no owner roles."""
    roles = await provision_db.apply_roles(admin_dsn, role_prefix=prefix)
    operator = provision_db.role_name(provision_db.OPERATOR, prefix)
    admin = await connect(admin_dsn)
    try:
        for principal, schema in provision_db.SCHEMAS.items():
            login = provision_db.role_name(principal, prefix)
            owner = provision_db.owner_role_name(principal, prefix)
            await admin.execute(f"REASSIGN OWNED BY {owner} TO {login}")
            await admin.execute(f"DROP OWNED BY {owner}")
            await admin.execute(f"DROP ROLE {owner}")
            await admin.execute(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE {login} IN SCHEMA "{schema}"'
                f" GRANT SELECT ON TABLES TO {operator}"
            )
    finally:
        await admin.close()
    return roles


#: what a payment role that owned its tables could plant: a trigger on the table the operator's
#: `erase` updates, and a view whose function runs as whoever reads it; both make the operator
#: write a command into the process manager's outbox, which its relay would publish
PLANTED = (
    "CREATE FUNCTION payment.evil() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO process_manager.outbox (message_id, message_type, exchange, routing_key,"
    " headers, body) VALUES (gen_random_uuid(), 'planted', 'sagabus.commands',"
    " 'payment.RefundPayment', '{}', '\\x00'); RETURN NULL; END $$",
    "CREATE TRIGGER evil BEFORE UPDATE ON payment.payments"
    " FOR EACH STATEMENT EXECUTE FUNCTION payment.evil()",
    "CREATE FUNCTION payment.peek() RETURNS int LANGUAGE plpgsql AS $$ BEGIN"
    " INSERT INTO process_manager.outbox (message_id, message_type, exchange, routing_key,"
    " headers, body) VALUES (gen_random_uuid(), 'planted', 'sagabus.commands',"
    " 'payment.RefundPayment', '{}', '\\x00'); RETURN 1; END $$",
    "CREATE VIEW payment.summary AS SELECT payment.peek() AS n",
    "CREATE RULE sneaky AS ON INSERT TO payment.ledger DO ALSO NOTIFY sneaky",
)


async def test_provisioning_takes_ownership_back_from_the_login_roles() -> None:
    prefix = f"sagabus_o{uuid.uuid4().hex[:8]}_"
    name, admin_dsn = await isolated(prefix)
    try:
        roles = await _provision_the_old_way(admin_dsn, prefix)
        pay, op, admin = (
            await connect(roles["payment"]),
            await connect(roles["operator"]),
            await connect(admin_dsn),
        )
        planted = "SELECT count(*) FROM process_manager.outbox WHERE message_type = 'planted'"
        try:
            for statement in PLANTED:
                await pay.execute(statement)
            # the attack works on the old layout: the operator's write and read run its code
            await op.execute("UPDATE payment.payments SET reason = reason WHERE false")
            await op.fetch("SELECT * FROM payment.summary")
            assert await admin.fetchval(planted) == 2
            await admin.execute("DELETE FROM process_manager.outbox")

            await provision_db.apply_roles(
                admin_dsn, role_prefix=prefix, passwords=_passwords(roles)
            )
            for principal, schema in provision_db.SCHEMAS.items():
                login = provision_db.role_name(principal, prefix)
                owner = provision_db.owner_role_name(principal, prefix)
                owners = await admin.fetch(
                    "SELECT DISTINCT pg_get_userbyid(relowner) AS o FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1"
                    " UNION SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = $1"
                    " UNION SELECT DISTINCT pg_get_userbyid(proowner) FROM pg_proc p"
                    " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
                    schema,
                )
                assert {r["o"] for r in owners} == {owner}, schema
                for catalogue, column in (
                    ("pg_class", "relowner"),
                    ("pg_namespace", "nspowner"),
                    ("pg_proc", "proowner"),
                    ("pg_type", "typowner"),
                    ("pg_default_acl", "defaclrole"),
                ):
                    assert not await admin.fetchval(
                        f"SELECT count(*) FROM {catalogue} WHERE {column} = $1::regrole", login
                    ), (login, catalogue)

            # what was planted no longer runs as the operator, and the CLI's writes work
            assert not await admin.fetchval(
                "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE c.relnamespace = 'payment'::regnamespace AND NOT t.tgisinternal"
            )
            assert not await admin.fetchval(
                "SELECT count(*) FROM pg_rewrite WHERE ev_class = 'payment.ledger'::regclass"
            )
            await op.execute("UPDATE payment.payments SET reason = reason WHERE false")
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="function"):
                await op.fetch("SELECT * FROM payment.summary")
            assert await admin.fetchval(planted) == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pay.execute(
                    "CREATE TRIGGER evil2 BEFORE UPDATE ON payment.payments"
                    " FOR EACH STATEMENT EXECUTE FUNCTION payment.evil()"
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pay.execute("ALTER TABLE payment.payments ADD COLUMN n int")
            # and each service still uses only its own rows
            await pay.execute(
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at)"
                " VALUES ('o-old', gen_random_uuid(), 'capture', 100, now())"
            )
            await _denied(roles["process-manager"], "SELECT * FROM payment.payments")
            await _denied(
                roles["notification"],
                "INSERT INTO payment.ledger (order_id, saga_id, kind, amount_minor, at)"
                " VALUES ('o-1', gen_random_uuid(), 'refund', 100, now())",
            )

            # a membership someone granted is taken back: it would give the owner's rights
            owner = provision_db.owner_role_name("payment", prefix)
            await admin.execute(f"GRANT {owner} TO {_user(roles['payment'])}")
            await provision_db.apply_roles(
                admin_dsn, role_prefix=prefix, passwords=_passwords(roles)
            )
            assert not await admin.fetchval(
                "SELECT pg_has_role($1, $2, 'MEMBER')", _user(roles["payment"]), owner
            )
        finally:
            for c in (pay, op, admin):
                await c.close()
    finally:
        await support.drop_database(PG_ADMIN, name)
        await drop_roles(prefix)


async def _denied(dsn: str, statement: str) -> None:
    conn = await connect(dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute(statement)
    finally:
        await conn.close()


# -- `sagabus provision --database-admin-url` ----------------------------------------------------


@pytest.fixture
def cli_target() -> Iterator[tuple[str, str, str, str]]:
    """(database admin URL, role prefix, vhost, broker user prefix), removed afterwards."""
    oid = uuid.uuid4().hex[:8]
    name = f"sagabus_dbroles_{oid}"
    role_prefix = f"sagabus_c{oid}_"
    vhost, user_prefix = f"sagabus-dbroles-{oid}", f"sagabus-dbroles-{oid}-"
    url = run_private(create_database(name))
    try:
        yield url, role_prefix, vhost, user_prefix
    finally:
        support.delete_vhost(vhost)
        delete_users(user_prefix)
        run_private(support.drop_database(PG_ADMIN, name))
        run_private(drop_roles(role_prefix))


#: the environment must not pick a database (or its passwords) for these runs
CLI_ENV: dict[str, str | None] = {
    k: None
    for k in os.environ
    if k.startswith(provision_db.PASSWORD_ENV_PREFIX) or k == "SAGABUS_DATABASE_ADMIN_URL"
}


def run_private(coro: Any) -> Any:
    """Run ``coro`` to the end in a sync test, leaving the session's event loop alone (unlike
    ``asyncio.run``, which unsets the current loop)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def run_cli(*args: str) -> dict[str, Any]:
    result = CliRunner(env=CLI_ENV).invoke(
        provision_command, [*args, "--json"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    output: dict[str, Any] = json.loads(result.output)
    return output


def database_lines(path: Path) -> dict[str, str]:
    return {
        key.removeprefix(provision_db.ENV_KEY_PREFIX): value
        for key, _, value in (line.partition("=") for line in path.read_text().splitlines())
        if key.startswith(provision_db.ENV_KEY_PREFIX)
    }


async def _whoami(dsn: str, query: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def test_provision_writes_working_database_urls(
    cli_target: tuple[str, str, str, str], tmp_path: Path
) -> None:
    url, role_prefix, vhost, user_prefix = cli_target
    env_file = tmp_path / "sagabus.env"
    broker = ("--vhost", vhost, "--user-prefix", user_prefix, "--admin-url", ADMIN_URL)
    database = ("--database-admin-url", url, "--role-prefix", role_prefix)
    args = (*broker, *database, "--output", str(env_file))
    report = run_cli(*args)
    assert report["database"]["database"] == url.rsplit("/", 1)[1]
    by_principal = {r["principal"]: r for r in report["database"]["roles"]}
    assert set(by_principal) == set(provision_db.PRINCIPALS)
    assert all("database_url" not in r for r in by_principal.values())  # only in the file
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"

    lines = database_lines(env_file)
    assert set(lines) == {provision_db.env_key(p).removeprefix(provision_db.ENV_KEY_PREFIX)
                          for p in provision_db.PRINCIPALS}  # fmt: skip
    assert any(line.startswith(provision.ENV_KEY_PREFIX) for line in env_file.read_text().split())
    pm = lines["PROCESS_MANAGER"]
    assert run_private(_whoami(pm, "SELECT current_user")) == f"{role_prefix}process_manager"
    assert run_private(_whoami(pm, "SELECT count(*) FROM process_manager.sagas")) == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        run_private(_whoami(pm, "SELECT count(*) FROM payment.payments"))
    assert run_private(_whoami(lines["OPERATOR"], "SELECT count(*) FROM payment.payments")) == 0

    # again with the same file: the passwords in it are kept, the roles updated
    again = run_cli(*args)
    assert {r["password"] for r in again["database"]["roles"]} == {"updated"}
    assert {r["password_from"] for r in again["database"]["roles"]} == {"file"}
    assert database_lines(env_file) == lines

    # a run that leaves the database alone keeps the file's database lines
    assert "database" not in run_cli(*broker, "--output", str(env_file))
    assert database_lines(env_file) == lines

    # roles that exist with passwords known nowhere are not silently given new ones
    other = tmp_path / "other.env"
    other.write_text(  # the broker's passwords only
        "".join(
            line + "\n"
            for line in env_file.read_text().splitlines()
            if line.startswith(provision.ENV_KEY_PREFIX)
        )
    )
    result = CliRunner(env=CLI_ENV).invoke(
        provision_command, [*args[:-1], str(other)], catch_exceptions=False
    )
    assert result.exit_code == 1, result.output
    assert "database roles" in result.output and "--rotate" in result.output
    rotated = run_cli(*args[:-1], str(other), "--rotate")
    assert {r["password_from"] for r in rotated["database"]["roles"]} == {"new"}
    assert database_lines(other)["ORDER"] != lines["ORDER"]
