"""PostgreSQL least privilege: every service runs as a role of its own that owns its own schema
and nothing else; the operator's role reads everything and writes only what the CLI writes.

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
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData, Table, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from messaging import deadletters
from messaging.db import check_pool_budget, create_schema
from messaging.service import migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import bootstrap, provision, provision_db
from tests import support
from tests.security.conftest import ADMIN_URL, PG_ADMIN, delete_users

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


@pytest.mark.parametrize("principal", SERVICES)
async def test_each_service_migrates_and_uses_only_its_own_schema(
    roles: dict[str, str], principal: str
) -> None:
    schema = provision_db.SCHEMAS[principal]
    metadata = provision_db.service_metadata(principal)
    engine = engine_for(roles[principal])
    try:
        # a table dropped (or added by a newer version) is created by the service itself; not
        # one the operator writes to: those grants come from provisioning (see provision_db)
        victims = [
            t.name
            for t in metadata.sorted_tables
            if (schema, t.name) not in provision_db.OPERATOR_WRITES
        ]
        async with engine.begin() as c:
            for name in victims[-1:]:
                await c.exec_driver_sql(f'DROP TABLE "{schema}"."{name}" CASCADE')
        await _migrate_as(principal, engine)
        await _migrate_as(principal, engine)  # and again: nothing to do
        probe = Table(
            f"probe_{uuid.uuid4().hex[:6]}", MetaData(schema=schema), Column("n", Integer)
        )
        async with engine.begin() as c:
            await c.run_sync(lambda sync: probe.create(sync))
            await c.execute(probe.insert().values(n=7))
            assert (await c.execute(select(probe.c.n))).scalar_one() == 7
            for t in metadata.sorted_tables:
                await c.exec_driver_sql(f'SELECT count(*) FROM "{schema}"."{t.name}"')
            owners = await c.exec_driver_sql(
                f"SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = '{schema}'"
            )
            assert [r[0] for r in owners] == [urllib.parse.urlsplit(roles[principal]).username]
    finally:
        await engine.dispose()

    conn = await connect(roles[principal])
    try:
        # what a role without CREATE on the database may not do, and why create_schema checks
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE SCHEMA sagabus_elsewhere")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.sagabus_elsewhere (n int)")
        for other, other_schema in provision_db.SCHEMAS.items():
            if other == principal:
                continue
            table = provision_db.service_metadata(other).sorted_tables[0].name
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f'SELECT * FROM "{other_schema}"."{table}" LIMIT 1')
    finally:
        await conn.close()

    # a table the service created after provisioning is readable by the operator at once
    op = await connect(roles["operator"])
    try:
        assert await op.fetchval(f'SELECT n FROM "{schema}"."{probe.name}"') == 7
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute(f'INSERT INTO "{schema}"."{probe.name}" VALUES (8)')
    finally:
        await op.close()


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
        provision.command, [*args, "--json"], catch_exceptions=False
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
        provision.command, [*args[:-1], str(other)], catch_exceptions=False
    )
    assert result.exit_code == 1, result.output
    assert "database roles" in result.output and "--rotate" in result.output
    rotated = run_cli(*args[:-1], str(other), "--rotate")
    assert {r["password_from"] for r in rotated["database"]["roles"]} == {"new"}
    assert database_lines(other)["ORDER"] != lines["ORDER"]
