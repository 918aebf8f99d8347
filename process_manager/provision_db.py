"""Least-privilege PostgreSQL roles: one role per service, owning its own schema and nothing else,
plus an operator role for the CLI.

The model is data: ``SCHEMAS`` (principal -> the one schema it owns) and ``OPERATOR_WRITES`` (the
writes the CLI makes; it reads everything). ``apply_roles`` puts it on a database as an
administrator (a superuser: it alters default privileges *for* the service roles) and is
idempotent; ``sagabus provision --database-admin-url`` calls it.

How PostgreSQL checks access (observed on 15, and the reason for each step):

- The owner of a schema may create, alter and drop objects in it and use every table it owns;
  nobody else may even look up a name in it without USAGE, nor read a row without SELECT.
- ``CREATE SCHEMA IF NOT EXISTS`` needs CREATE on the database *even when the schema exists*
  (the privilege is checked first), so a service role, which has no such privilege, cannot run
  it: ``messaging.db.create_schema`` skips it when the schema is there.
- PUBLIC has CONNECT and TEMPORARY on a new database, and (before PostgreSQL 15, or in a database
  upgraded from one) CREATE on schema ``public``: CREATE is revoked from PUBLIC on both, so a
  service can create tables only in its own schema.
- Inserting into an identity column needs no privilege on its sequence; the sequence belongs to
  the table and changes owner with it.
- Default privileges apply to objects created later *by the role named in* ``FOR ROLE``: the
  operator keeps reading the tables a newer version of a service creates in its own schema.

The tables are created here too (as the administrator, then handed to their owners), so the
operator's grants on them land whatever order services start in. A table a later version adds is
readable by the operator at once (default privileges); a write the CLI gains needs
``OPERATOR_WRITES`` and another ``apply_roles``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import urllib.parse
from collections.abc import Iterable, Mapping

import asyncpg
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from messaging import deadletters
from messaging.db import create_schema, ensure_database
from messaging.settings import Settings
from participants.analytics import service as analytics
from participants.inventory import service as inventory
from participants.notification import service as notification
from participants.order import service as order
from participants.payment import service as payment
from participants.shipping import service as shipping
from process_manager import store

DEFAULT_ROLE_PREFIX = "sagabus_"
OPERATOR = "operator"
#: env file keys: SAGABUS_DATABASE_URL_<PRINCIPAL>, e.g. SAGABUS_DATABASE_URL_PROCESS_MANAGER
ENV_KEY_PREFIX = "SAGABUS_DATABASE_URL_"
#: a password given in the environment: SAGABUS_DATABASE_PASSWORD_<PRINCIPAL>
PASSWORD_ENV_PREFIX = "SAGABUS_DATABASE_PASSWORD_"

# -- the model ---------------------------------------------------------------------------------

#: principal -> the one schema its role owns (the names the services' code uses)
SCHEMAS: dict[str, str] = {
    "process-manager": store.SCHEMA,
    "order": order.SCHEMA,
    "payment": payment.SCHEMA,
    "inventory": inventory.SCHEMA,
    "shipping": shipping.SCHEMA,
    "notification": notification.SCHEMA,
    "analytics": analytics.SCHEMA,
    "dead-letters": deadletters.SCHEMA,
}


def service_metadata(principal: str, settings: Settings | None = None) -> MetaData:
    """Every table the principal's code creates in its schema (a service's definition adds its
    outbox and inbox to its tables)."""
    if principal == "dead-letters":
        return deadletters.metadata
    from process_manager import bootstrap

    return bootstrap.FACTORIES[principal](settings or Settings()).metadata


#: the CLI's writes, on top of SELECT on every table: (schema, table) -> privileges, each a
#: privilege on the table or on some of its columns (``UPDATE (a, b)``). ``SELECT .. FOR UPDATE``
#: needs UPDATE on at least one column, so a column grant also lets the CLI lock the row.
OPERATOR_WRITES: dict[tuple[str, str], tuple[str, ...]] = {
    # `resume` / `compensate` (process_manager.service.operator_action): the saga row is locked
    # FOR UPDATE and saved, the transition recorded, a manual case opened or resolved (an
    # upsert), and the commands written to the process manager's outbox for its relay; `erase`
    # scrubs personal data from the same rows
    (store.SCHEMA, "sagas"): ("UPDATE",),
    (store.SCHEMA, "history"): ("INSERT", "UPDATE (note)"),
    (store.SCHEMA, "manual_cases"): ("INSERT", "UPDATE"),
    (store.SCHEMA, "outbox"): ("INSERT", "UPDATE (body, headers)"),
    # `dlq replay` / `dlq purge`: rows are claimed FOR UPDATE and marked replayed or purged;
    # `erase` rewrites bodies and headers
    (deadletters.SCHEMA, "dead_letters"): ("UPDATE",),
    # `inventory seed` (an upsert)
    (inventory.SCHEMA, "stock"): ("INSERT", "UPDATE"),
    # `erase` (process_manager/erase.py): the personal columns, free-text reasons, and the
    # bodies of the services' outboxes
    (order.SCHEMA, "orders"): ("UPDATE (customer_id, reason)",),
    (payment.SCHEMA, "payments"): ("UPDATE (payment_token, reason)",),
    (notification.SCHEMA, "notifications"): ("UPDATE (customer_token)",),
    (shipping.SCHEMA, "shipments"): ("UPDATE (reason)",),
    **{
        (schema, "outbox"): ("UPDATE (body, headers)",)
        for schema in (
            order.SCHEMA,
            payment.SCHEMA,
            inventory.SCHEMA,
            shipping.SCHEMA,
            notification.SCHEMA,
            analytics.SCHEMA,
        )
    },
}

PRINCIPALS: tuple[str, ...] = (*SCHEMAS, OPERATOR)


def role_name(principal: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    """``sagabus_process_manager`` for ``process-manager``."""
    return prefix + principal.replace("-", "_")


def env_key(principal: str) -> str:
    return ENV_KEY_PREFIX + re.sub(r"[^A-Z0-9]", "_", principal.upper())


def password_env_key(principal: str) -> str:
    return PASSWORD_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", principal.upper())


def valid_prefix(prefix: str) -> bool:
    """Lower-case letters, digits and ``_``: names PostgreSQL does not fold, that need no quoting
    anywhere, and leave room within the 63-byte identifier limit."""
    return re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", prefix) is not None


# -- passwords and DSNs ------------------------------------------------------------------------


def new_password() -> str:
    return secrets.token_urlsafe(24)


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier of ``password`` (what ``pg_authid`` stores).

    Sent instead of the password, so the password never appears in a statement the server might
    log. Only for ASCII passwords: PostgreSQL SASLpreps others first."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def asyncpg_dsn(url: str) -> str:
    """``postgresql://...`` from any of the spellings ``Settings`` accepts."""
    return Settings(database_url=url).asyncpg_url


def dsn_for(admin_dsn: str, role: str, password: str) -> str:
    """``postgresql://role:password@host:port/db``: the admin DSN's server and database."""
    parts = urllib.parse.urlsplit(asyncpg_dsn(admin_dsn))
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = (
        f"{urllib.parse.quote(role, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
        + (f":{parts.port}" if parts.port else "")
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def database_name(dsn: str) -> str:
    name = urllib.parse.urlsplit(asyncpg_dsn(dsn)).path.lstrip("/")
    if not name:
        raise ValueError("the database admin URL names no database")
    return urllib.parse.unquote(name)


# -- applying the model ------------------------------------------------------------------------


def _chosen(principals: Iterable[str] | None) -> list[str]:
    chosen = list(PRINCIPALS if principals is None else principals)
    unknown = [p for p in chosen if p not in PRINCIPALS]
    if unknown:
        raise KeyError(", ".join(unknown))
    return chosen


async def existing_roles(
    admin_dsn: str,
    *,
    role_prefix: str = DEFAULT_ROLE_PREFIX,
    principals: Iterable[str] | None = None,
) -> set[str]:
    """The principals whose role exists already."""
    chosen = _chosen(principals)
    names = {role_name(p, role_prefix): p for p in chosen}
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn), timeout=10)
    try:
        rows = await conn.fetch("SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", list(names))
    finally:
        await conn.close()
    return {names[r["rolname"]] for r in rows}


async def apply_roles(
    admin_dsn: str,
    *,
    role_prefix: str = DEFAULT_ROLE_PREFIX,
    passwords: Mapping[str, str] | None = None,
    principals: Iterable[str] | None = None,
) -> dict[str, str]:
    """Make the database match the model; running it again changes nothing but the passwords.

    ``admin_dsn`` is a superuser's URL of the database to provision (created if missing).
    ``passwords`` maps principals to the password to set; every other principal gets a new
    random one. ``principals`` limits the work to some of ``PRINCIPALS`` (default: all).
    Returns principal -> ``postgresql://role:password@host:port/db``.
    """
    if not valid_prefix(role_prefix):
        raise ValueError(f"role prefix {role_prefix!r}: lower-case letters, digits and '_' only")
    chosen = _chosen(principals)
    passwords = dict(passwords or {})
    secret = {p: passwords.get(p) or new_password() for p in chosen}
    services = [p for p in chosen if p != OPERATOR]

    await ensure_database(Settings(database_url=admin_dsn))
    # the schemas and their tables, as the administrator: the grants below need the tables
    engine = create_async_engine(
        "postgresql+asyncpg://" + asyncpg_dsn(admin_dsn).removeprefix("postgresql://"),
        poolclass=NullPool,
    )
    try:
        for p in services:
            await create_schema(engine, SCHEMAS[p], service_metadata(p))
    finally:
        await engine.dispose()

    db = database_name(admin_dsn)
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn), timeout=10)
    try:
        async with conn.transaction():
            # the same lock as create_schema: no table appears half-way through the hand-over
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sagabus-migrate'))")
            for p in chosen:
                await _role(conn, role_name(p, role_prefix), secret[p])
            await conn.execute(f"REVOKE CREATE ON DATABASE {_ident(db)} FROM PUBLIC")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            for p in chosen:
                await conn.execute(
                    f"GRANT CONNECT ON DATABASE {_ident(db)} TO {role_name(p, role_prefix)}"
                )
            for p in services:
                await _own(conn, SCHEMAS[p], role_name(p, role_prefix))
            if OPERATOR in chosen:
                await _operator(conn, role_name(OPERATOR, role_prefix), role_prefix)
    finally:
        await conn.close()
    return {p: dsn_for(admin_dsn, role_name(p, role_prefix), secret[p]) for p in chosen}


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _role(conn: asyncpg.Connection, role: str, password: str) -> None:
    attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    await conn.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {role} {attributes}")
    secret = scram_verifier(password) if password.isascii() else password
    statement = await conn.fetchval(
        "SELECT format('ALTER ROLE %I PASSWORD %L', $1::text, $2::text)", role, secret
    )
    await conn.execute(statement)


async def _own(conn: asyncpg.Connection, schema: str, role: str) -> None:
    """``role`` owns ``schema`` and everything in it; nobody else gets anything there."""
    s = _ident(schema)
    await conn.execute(f"ALTER SCHEMA {s} OWNER TO {role}")
    rows = await conn.fetch(
        """
        SELECT c.relname, c.relkind::text AS relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
          AND pg_get_userbyid(c.relowner) <> $2
          -- a sequence that belongs to a column (identity, serial) follows its table
          AND NOT (c.relkind = 'S' AND EXISTS (
                SELECT 1 FROM pg_depend d WHERE d.objid = c.oid
                AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
        ORDER BY c.relkind <> 'S', c.relname
        """,
        schema,
        role,
    )
    kinds = {
        "r": "TABLE",
        "p": "TABLE",
        "f": "FOREIGN TABLE",
        "v": "VIEW",
        "m": "MATERIALIZED VIEW",
        "S": "SEQUENCE",
    }
    for r in rows:
        await conn.execute(
            f"ALTER {kinds[r['relkind']]} {s}.{_ident(r['relname'])} OWNER TO {role}"
        )
    await conn.execute(f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC")
    await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC")
    await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM PUBLIC")


async def _operator(conn: asyncpg.Connection, operator: str, prefix: str) -> None:
    """USAGE on every schema, SELECT on every table (now and later), ``OPERATOR_WRITES``."""
    present = {
        r["nspname"]
        for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname = ANY($1)", list(SCHEMAS.values())
        )
    }
    roles = {
        r["rolname"]
        for r in await conn.fetch(
            "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)",
            [role_name(p, prefix) for p in SCHEMAS],
        )
    }
    for principal, schema in SCHEMAS.items():
        if schema not in present:
            continue
        s = _ident(schema)
        # exactly the model: what an earlier model granted and this one does not is taken back
        await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {operator}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {s} TO {operator}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {operator}")
        owner = role_name(principal, prefix)
        if owner in roles:
            await conn.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {s} "
                f"GRANT SELECT ON TABLES TO {operator}"
            )
    tables = {
        (r["nspname"], r["relname"])
        for r in await conn.fetch(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p')",
            list(SCHEMAS.values()),
        )
    }
    for (schema, table), privileges in OPERATOR_WRITES.items():
        if (schema, table) in tables:
            await conn.execute(
                f"GRANT {', '.join(privileges)} ON {_ident(schema)}.{_ident(table)} TO {operator}"
            )


__all__ = [
    "DEFAULT_ROLE_PREFIX",
    "ENV_KEY_PREFIX",
    "OPERATOR",
    "OPERATOR_WRITES",
    "PASSWORD_ENV_PREFIX",
    "PRINCIPALS",
    "SCHEMAS",
    "apply_roles",
    "dsn_for",
    "env_key",
    "existing_roles",
    "password_env_key",
    "role_name",
    "scram_verifier",
    "service_metadata",
]
