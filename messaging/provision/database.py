"""Least-privilege PostgreSQL roles: per service, a login role that may only read and write the
rows of its own schema, and a NOLOGIN owner role that owns that schema; plus an operator role
for the CLI.

The model is data: ``SCHEMAS`` (principal -> its one schema) and ``OPERATOR_WRITES`` (the writes
the CLI makes; it reads everything). ``apply_roles`` puts it on a database as an administrator (a
superuser) and is idempotent; ``sagabus provision --database-admin-url`` calls it.

Why the service's login role owns nothing: PostgreSQL runs a trigger function, a rule's or a
policy's or a column default's functions, and the functions a view calls as the user whose
statement fired them. An owner may add those to its tables; so a service role that owned its
tables could run code as the operator whenever the CLI wrote them (``erase``, ``dlq``,
``inventory seed``, ``resume``), or read a view of them. So, per service ``<svc>``:

- ``sagabus_<svc>_owner`` (NOLOGIN, a member of nothing, with no members: the administrator, a
  superuser, acts for it) owns the schema and everything in it;
- ``sagabus_<svc>`` (LOGIN) has USAGE on the schema, SELECT, INSERT, UPDATE and DELETE on its
  tables and USAGE on its sequences: no CREATE, no TRIGGER, no TRUNCATE, no REFERENCES, no
  ownership. It cannot alter a table, add a trigger, or make a function, table or view.

How PostgreSQL checks access (observed on 15, and the reason for each step):

- Only the owner of a schema may create objects in it (or anyone granted CREATE on it, and
  nobody is); only a table's owner may alter it, or add a rule or a policy to it; a trigger
  needs the TRIGGER privilege, which nobody is granted.
- ``CREATE SCHEMA IF NOT EXISTS`` needs CREATE on the database *even when the schema exists*
  (the privilege is checked first): ``messaging.db.create_schema`` skips it when the schema is
  there, and with every table and index in place sends no DDL at all, so a service starts as
  its login role. When something is missing it fails at once with ``SchemaNotProvisioned``.
- PUBLIC has CONNECT and TEMPORARY on a new database, and (before PostgreSQL 15, or in a database
  upgraded from one) CREATE on schema ``public``: CREATE is revoked from PUBLIC on both.
- Inserting into an identity column needs no privilege on its sequence; the sequence belongs to
  the table and changes owner with it. USAGE on the schema's sequences is granted anyway, for a
  ``serial`` a later version might use.
- Default privileges apply to objects created later *by the role named in* ``FOR ROLE``: for the
  owner role and for the administrator running this (who creates the tables of an upgrade with
  ``sagabus migrate``), the login role gets its four privileges and the operator SELECT on every
  table created later in the schema.

Migrations run as the administrator: ``apply_roles`` creates the schemas, tables, indexes and
keys first (``create_schema``, ``upgrade_inbox_key``, a service's own ``upgrade``), then hands
everything in each schema to its owner role. An upgrade that adds a table, an index or a column
therefore needs ``sagabus provision`` again (or ``sagabus migrate`` then ``provision``; compose
runs both on every ``up``); until then the service refuses to start with a one-line error that
says so. A write the CLI gains needs ``OPERATOR_WRITES`` and another ``apply_roles``.

On a database provisioned by an earlier version, where the login role owned its schema and
tables, the same call moves all of it (``REASSIGN OWNED``) to the owner role, and removes what a
login role could have planted as an owner and the model never has: triggers, rules, row
security policies, and EXECUTE for PUBLIC on functions in the schema.
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

from messaging import deadletters, topology
from messaging.db import create_schema, ensure_database, upgrade_inbox_key
from messaging.service import DEAD_LETTERS
from messaging.settings import Settings
from process_manager import bootstrap, store

DEFAULT_ROLE_PREFIX = "sagabus_"
OPERATOR = "operator"
#: env file keys: SAGABUS_DATABASE_URL_<PRINCIPAL>, e.g. SAGABUS_DATABASE_URL_PROCESS_MANAGER
ENV_KEY_PREFIX = "SAGABUS_DATABASE_URL_"
#: a password given in the environment: SAGABUS_DATABASE_PASSWORD_<PRINCIPAL>
PASSWORD_ENV_PREFIX = "SAGABUS_DATABASE_PASSWORD_"
#: the owner role of a service's schema is its login role's name with this suffix
OWNER_SUFFIX = "_owner"
#: what a service's login role may do with the tables of its schema, and no more
SERVICE_TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"

# -- the model ---------------------------------------------------------------------------------

#: principal -> the one schema its role owns (the names the services' code uses): every service
#: of the topology, found by name (``process_manager.bootstrap``), and the dead-letter collector
SCHEMAS: dict[str, str] = {
    **{service: bootstrap.schema(service) for service in topology.SERVICES},
    DEAD_LETTERS: deadletters.SCHEMA,
}
#: the participants' schemas (every service's but the process manager's)
_PARTICIPANT_SCHEMAS = tuple(
    schema for p, schema in SCHEMAS.items() if p not in (bootstrap.PROCESS_MANAGER, DEAD_LETTERS)
)


def service_metadata(principal: str, settings: Settings | None = None) -> MetaData:
    """Every table the principal's code creates in its schema (a service's definition adds its
    outbox and inbox to its tables)."""
    if principal == DEAD_LETTERS:
        return deadletters.metadata
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
    (SCHEMAS["inventory"], "stock"): ("INSERT", "UPDATE"),
    # `erase` (process_manager/erase.py): the personal columns, free-text reasons, and the
    # bodies of the services' outboxes
    (SCHEMAS["order"], "orders"): ("UPDATE (customer_id, reason)",),
    (SCHEMAS["payment"], "payments"): ("UPDATE (payment_token, reason)",),
    (SCHEMAS["notification"], "notifications"): ("UPDATE (customer_token)",),
    (SCHEMAS["shipping"], "shipments"): ("UPDATE (reason)",),
    (SCHEMAS["shipping"], "shipment_addresses"): ("UPDATE (address)",),
    # every participant's outbox, a new participant's too
    **{(schema, "outbox"): ("UPDATE (body, headers)",) for schema in _PARTICIPANT_SCHEMAS},
}

PRINCIPALS: tuple[str, ...] = (*SCHEMAS, OPERATOR)


def role_name(principal: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    """``sagabus_process_manager`` for ``process-manager``."""
    return prefix + principal.replace("-", "_")


def owner_role_name(principal: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    """``sagabus_payment_owner`` for ``payment``: the NOLOGIN role that owns its schema."""
    return role_name(principal, prefix) + OWNER_SUFFIX


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
    # the migrations, as the administrator: the schemas, their tables, indexes and keys (the
    # grants below need the tables, and the services' roles may not create them)
    engine = create_async_engine(
        "postgresql+asyncpg://" + asyncpg_dsn(admin_dsn).removeprefix("postgresql://"),
        poolclass=NullPool,
    )
    try:
        for p in services:
            await create_schema(engine, SCHEMAS[p], service_metadata(p))
            await upgrade_inbox_key(engine, SCHEMAS[p])
            upgrade = None if p == DEAD_LETTERS else bootstrap.FACTORIES[p](Settings()).upgrade
            if upgrade is not None:
                # a table's own upgrade (the process manager's saga keys and phase column)
                await upgrade(engine)
    finally:
        await engine.dispose()

    db = database_name(admin_dsn)
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn), timeout=10)
    try:
        async with conn.transaction():
            # the same lock as create_schema: no table appears half-way through the hand-over
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sagabus-migrate'))")
            admin = await conn.fetchval("SELECT current_user")
            for p in chosen:
                await _role(conn, role_name(p, role_prefix), secret[p])
            for p in services:
                await _owner_role(conn, owner_role_name(p, role_prefix))
            await conn.execute(f"REVOKE CREATE ON DATABASE {_ident(db)} FROM PUBLIC")
            await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            for p in chosen:
                await conn.execute(
                    f"GRANT CONNECT ON DATABASE {_ident(db)} TO {role_name(p, role_prefix)}"
                )
            for p in services:
                await _own(
                    conn,
                    SCHEMAS[p],
                    owner=owner_role_name(p, role_prefix),
                    login=role_name(p, role_prefix),
                    admin=admin,
                )
            if OPERATOR in chosen:
                await _operator(conn, role_name(OPERATOR, role_prefix), role_prefix, admin)
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


async def _owner_role(conn: asyncpg.Connection, role: str) -> None:
    """A role that owns a schema and can do nothing else: it cannot log in, and nobody may
    become it (a member could ``SET ROLE`` to it, and a login role that did would own its
    tables again); the administrator, a superuser, acts for it."""
    attributes = "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    await conn.execute(f"{'ALTER' if exists else 'CREATE'} ROLE {role} {attributes}")
    await conn.execute(f"ALTER ROLE {role} PASSWORD NULL")
    members = await conn.fetch(
        "SELECT m.rolname AS member, r.rolname AS role FROM pg_auth_members a"
        " JOIN pg_roles m ON m.oid = a.member JOIN pg_roles r ON r.oid = a.roleid"
        " WHERE a.roleid = $1::regrole OR a.member = $1::regrole",
        role,
    )
    for r in members:
        await conn.execute(f"REVOKE {_ident(r['role'])} FROM {_ident(r['member'])} CASCADE")


#: relkind -> the word ALTER needs
_KINDS = {
    "r": "TABLE",
    "p": "TABLE",
    "f": "FOREIGN TABLE",
    "v": "VIEW",
    "m": "MATERIALIZED VIEW",
    "S": "SEQUENCE",
}


async def _own(
    conn: asyncpg.Connection, schema: str, *, owner: str, login: str, admin: str
) -> None:
    """``owner`` owns ``schema`` and everything in it; ``login`` may use the rows of its tables
    and nothing more; nobody else gets anything there (the operator: ``_operator``)."""
    s = _ident(schema)
    # an earlier version made the login role the owner: all it owns (the schema, the tables,
    # and whatever it made there) goes to the owner role
    await conn.execute(f"REASSIGN OWNED BY {login} TO {owner}")
    await _clear_default_privileges(conn, login)
    await conn.execute(f"ALTER SCHEMA {s} OWNER TO {owner}")
    # what the administrator created (the migrations just now, or `sagabus migrate` since)
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
        owner,
    )
    for r in rows:
        await conn.execute(
            f"ALTER {_KINDS[r['relkind']]} {s}.{_ident(r['relname'])} OWNER TO {owner}"
        )
    await _remove_planted_code(conn, schema)

    await conn.execute(f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC, {login}")
    await conn.execute(f"GRANT USAGE ON SCHEMA {s} TO {login}")
    await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC, {login}")
    await conn.execute(f"GRANT {SERVICE_TABLE_PRIVILEGES} ON ALL TABLES IN SCHEMA {s} TO {login}")
    await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM PUBLIC, {login}")
    await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {s} TO {login}")
    # the model has no functions; one an earlier login role made may be called by nobody else
    await conn.execute(f"REVOKE ALL ON ALL ROUTINES IN SCHEMA {s} FROM PUBLIC, {login}")
    # what the owner, or the administrator running a migration, creates here later
    for creator in (owner, _ident(admin)):
        await conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {creator} IN SCHEMA {s}"
            f" GRANT {SERVICE_TABLE_PRIVILEGES} ON TABLES TO {login}"
        )
        await conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {creator} IN SCHEMA {s}"
            f" GRANT USAGE ON SEQUENCES TO {login}"
        )


async def _remove_planted_code(conn: asyncpg.Connection, schema: str) -> None:
    """Triggers, rules and row security policies on the schema's tables: the model defines
    none, and each runs code (or a function) as whoever writes or reads the table."""
    s = _ident(schema)
    for r in await conn.fetch(
        "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND NOT t.tgisinternal",
        schema,
    ):
        await conn.execute(f"DROP TRIGGER {_ident(r['tgname'])} ON {s}.{_ident(r['relname'])}")
    for r in await conn.fetch(
        "SELECT c.relname, w.rulename FROM pg_rewrite w JOIN pg_class c ON c.oid = w.ev_class"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND w.rulename <> '_RETURN'",
        schema,
    ):
        await conn.execute(f"DROP RULE {_ident(r['rulename'])} ON {s}.{_ident(r['relname'])}")
    for r in await conn.fetch(
        "SELECT c.relname, p.polname FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
        schema,
    ):
        await conn.execute(f"DROP POLICY {_ident(r['polname'])} ON {s}.{_ident(r['relname'])}")
    for r in await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')"
        " AND (c.relrowsecurity OR c.relforcerowsecurity)",
        schema,
    ):
        await conn.execute(
            f"ALTER TABLE {s}.{_ident(r['relname'])}"
            " NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"
        )


#: pg_default_acl.defaclobjtype -> the word ALTER DEFAULT PRIVILEGES needs
_DEFAULT_KINDS = {"r": "TABLES", "S": "SEQUENCES", "f": "FUNCTIONS", "T": "TYPES", "n": "SCHEMAS"}


async def _clear_default_privileges(conn: asyncpg.Connection, role: str) -> None:
    """Take back the per-schema default privileges ``FOR ROLE role`` (an earlier version set
    them for the login role, which creates nothing any more)."""
    rows = await conn.fetch(
        """
        SELECT n.nspname, d.defaclobjtype::text AS kind,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee))
               END AS grantee
        FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace,
             LATERAL aclexplode(d.defaclacl) a
        WHERE d.defaclrole = $1::regrole
        """,
        role,
    )
    for r in {(r["nspname"], r["kind"], r["grantee"]) for r in rows}:
        nspname, kind, grantee = r
        await conn.execute(
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {role} IN SCHEMA {_ident(nspname)}"
            f" REVOKE ALL ON {_DEFAULT_KINDS[kind]} FROM {grantee}"
        )


async def _operator(conn: asyncpg.Connection, operator: str, prefix: str, admin: str) -> None:
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
            [owner_role_name(p, prefix) for p in SCHEMAS],
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
        owner = owner_role_name(principal, prefix)
        for creator in ([owner] if owner in roles else []) + [_ident(admin)]:
            await conn.execute(
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {creator} IN SCHEMA {s} "
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
    "OWNER_SUFFIX",
    "PASSWORD_ENV_PREFIX",
    "PRINCIPALS",
    "SCHEMAS",
    "apply_roles",
    "dsn_for",
    "env_key",
    "existing_roles",
    "owner_role_name",
    "password_env_key",
    "role_name",
    "scram_verifier",
    "service_metadata",
]
