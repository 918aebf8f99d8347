"""``sagabus provision``: the broker's users (``messaging.provision.broker``) and, with
``--database-admin-url``, the database's roles (``messaging.provision.database``), applied or
written to files. Idempotent."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from messaging.management import Management, ManagementError, ManagementUnreachable, redact
from messaging.provision.broker import (
    DEFAULT_USER_PREFIX,
    GRANTS,
    Account,
    DatabaseRole,
    ProvisionError,
    Unreachable,
    apply,
    database_env_text,
    definitions,
    env_file_text,
    passwords_from_environment,
    plan,
    plan_database,
    read_database_env,
    read_env_file,
    write_secret_file,
)
from messaging.settings import Settings


def _database_call(admin_url: str, coro: Any) -> Any:
    import asyncio

    import asyncpg

    # a loop of its own, not asyncio.run: that would also unset the caller's current loop
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    except (TimeoutError, OSError, asyncpg.CannotConnectNowError) as e:
        raise Unreachable(f"cannot reach PostgreSQL at {redact(admin_url)} ({e})") from None
    except asyncpg.PostgresError as e:
        raise ProvisionError(f"PostgreSQL refused: {e}") from None
    except ValueError as e:  # a URL without a database, say
        raise click.UsageError(f"--database-admin-url: {e}") from None
    finally:
        loop.close()


def _admin_pair(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    name, sep, password = value.partition(":")
    if not sep or not name or not password:
        raise click.BadParameter("expected USER:PASSWORD", param_hint="--definitions-admin")
    return name, password


@click.command("provision")
@click.option(
    "--vhost",
    default=None,
    help="Create this vhost (if missing) and provision into it [default: the existing '/'].",
)
@click.option(
    "--admin-url",
    default="http://guest:guest@127.0.0.1:15672",
    show_default=True,
    envvar="SAGABUS_RABBITMQ_ADMIN_URL",
    show_envvar=True,
    help="Management API URL with an administrator's credentials (better in the environment "
    "than on a command line other users can see).",
)
@click.option(
    "--amqp-host",
    default=None,
    help="HOST[:PORT] in the services' AMQP URLs [default: the admin URL's host, port 5672].",
)
@click.option(
    "--user-prefix",
    default=DEFAULT_USER_PREFIX,
    show_default=True,
    help="User names are PREFIX + service name (RabbitMQ users are shared by all vhosts).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write SAGABUS_AMQP_URL_<SERVICE>=... lines here (mode 0600) instead of printing "
    "credentials. Passwords already in the file are kept (unless given in the environment).",
)
@click.option(
    "--definitions",
    "definitions_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a RabbitMQ definitions file: vhost, users, permissions and topology.",
)
@click.option(
    "--definitions-admin",
    metavar="USER:PASSWORD",
    help="Also put this administrator in the definitions file (a node that loads definitions "
    "at boot creates no default user).",
)
@click.option(
    "--rotate",
    is_flag=True,
    help="Give existing users new random passwords (except those given in the environment).",
)
@click.option(
    "--demo-passwords",
    is_flag=True,
    help="Use the fixed passwords <service>-secret (except those given in the environment). "
    "For local experiments ONLY.",
)
@click.option(
    "--apply/--no-apply",
    "do_apply",
    default=True,
    show_default=True,
    help="--no-apply only writes --output/--definitions and never contacts the broker.",
)
@click.option(
    "--topology/--no-topology",
    "do_topology",
    default=True,
    show_default=True,
    help="Also declare the exchanges, queues and bindings as the admin.",
)
@click.option(
    "--database-admin-url",
    default=None,
    envvar="SAGABUS_DATABASE_ADMIN_URL",
    show_envvar=True,
    help="Also create one PostgreSQL role per service, owning only its schema, and an operator "
    "role: a superuser's postgresql:// URL of the database to provision [default: none, the "
    "database is left alone]. Passwords come from SAGABUS_DATABASE_PASSWORD_<SERVICE> if set.",
)
@click.option(
    "--role-prefix",
    default="sagabus_",
    show_default=True,
    help="PostgreSQL role names are PREFIX + service name with '-' as '_'.",
)
@click.option("--json", "as_json", is_flag=True)
def provision(
    vhost: str | None,
    admin_url: str,
    amqp_host: str | None,
    user_prefix: str,
    output: Path | None,
    definitions_path: Path | None,
    definitions_admin: str | None,
    rotate: bool,
    demo_passwords: bool,
    do_apply: bool,
    do_topology: bool,
    database_admin_url: str | None,
    role_prefix: str,
    as_json: bool,
) -> None:
    """Create one RabbitMQ user per service, allowed only the queues it consumes and the
    exchanges (and routing keys) it publishes to; with --database-admin-url, also one
    PostgreSQL role per service that owns only its own schema, and an operator role for the
    CLI. Idempotent.

    \b
    Each broker user's password, first match wins:
    1. SAGABUS_AMQP_PASSWORD_<SERVICE> in the environment (e.g.
       SAGABUS_AMQP_PASSWORD_PROCESS_MANAGER, SAGABUS_AMQP_PASSWORD_OPERATOR): set on the
       broker even if the user exists (so changing it and running again rotates it), also
       with --rotate; never printed. A SAGABUS_AMQP_PASSWORD_* key that names no user is an
       error.
    2. --demo-passwords: <service>-secret.
    3. the one in --output's file, unless --rotate;
    4. an existing user keeps its password, unless --rotate;
    5. a new random one.

    Passwords not from the environment are printed as SAGABUS_AMQP_URL_<SERVICE>=... lines, or
    written to --output (mode 0600), which also holds those from the environment. Each database
    role's password likewise comes first from SAGABUS_DATABASE_PASSWORD_<SERVICE>. The admin
    URLs can come from SAGABUS_RABBITMQ_ADMIN_URL and SAGABUS_DATABASE_ADMIN_URL, so no
    password needs to be on a command line."""
    try:
        _provision(
            vhost=vhost,
            admin_url=admin_url,
            amqp_host=amqp_host,
            user_prefix=user_prefix,
            output=output,
            definitions_path=definitions_path,
            definitions_admin=definitions_admin,
            rotate=rotate,
            demo_passwords=demo_passwords,
            do_apply=do_apply,
            do_topology=do_topology,
            database_admin_url=database_admin_url,
            role_prefix=role_prefix,
            as_json=as_json,
        )
    except ManagementUnreachable as e:
        raise Unreachable(str(e)) from None
    except ManagementError as e:
        raise ProvisionError(str(e)) from None


def _provision(
    vhost: str | None,
    admin_url: str,
    amqp_host: str | None,
    user_prefix: str,
    output: Path | None,
    definitions_path: Path | None,
    definitions_admin: str | None,
    rotate: bool,
    demo_passwords: bool,
    do_apply: bool,
    do_topology: bool,
    database_admin_url: str | None,
    role_prefix: str,
    as_json: bool,
) -> None:
    try:
        settings = Settings()
    except Exception as e:  # pydantic validation of SAGABUS_* variables
        raise click.UsageError(f"invalid SAGABUS_* configuration: {e}".splitlines()[0]) from None
    if not re.fullmatch(r"[A-Za-z0-9._-]*", user_prefix):
        raise click.BadParameter(
            "letters, digits, '.', '_' and '-' only", param_hint="--user-prefix"
        )
    if vhost is not None and not vhost.strip():
        raise click.BadParameter("must not be empty", param_hint="--vhost")
    if demo_passwords and rotate:
        raise click.UsageError("--demo-passwords and --rotate contradict each other")
    admin = _admin_pair(definitions_admin)
    if admin is not None and definitions_path is None:
        raise click.UsageError("--definitions-admin needs --definitions")
    from messaging.provision import database as provision_db

    if not provision_db.valid_prefix(role_prefix):
        raise click.BadParameter(
            "lower-case letters, digits and '_' only (at most 40)", param_hint="--role-prefix"
        )
    if database_admin_url is not None and not database_admin_url.startswith(
        ("postgresql://", "postgres://", "postgresql+asyncpg://")
    ):
        raise click.UsageError(
            f"--database-admin-url must be a postgresql:// URL, got {redact(database_admin_url)!r}"
        )
    try:
        mgmt = Management(admin_url)
    except ValueError as e:
        raise click.UsageError(f"--admin-url {e}") from None
    target = vhost or "/"
    host = amqp_host or f"{mgmt.hostname}:5672"

    from_env = passwords_from_environment(os.environ)
    known = read_env_file(output) if output is not None else {}
    users = [f"{user_prefix}{p}" for p in GRANTS]
    existing = [u for u in users if mgmt.user_exists(u)] if do_apply else []
    accounts = plan(
        user_prefix=user_prefix,
        known=known,
        existing=existing,
        rotate=rotate,
        environ=from_env,
        demo=demo_passwords,
    )
    unknown = [a.user for a in accounts if a.password is None]
    if unknown and (output is not None or definitions_path is not None):
        where = f" and {output} does not hold their passwords" if output is not None else ""
        raise ProvisionError(
            f"users {', '.join(unknown)} exist{where}: pass --rotate to set new passwords"
        )
    known_roles, kept_lines = read_database_env(output) if output is not None else ({}, [])
    db_roles: list[DatabaseRole] | None = None
    if database_admin_url is not None and do_apply:
        existing_roles = _database_call(
            database_admin_url,
            provision_db.existing_roles(database_admin_url, role_prefix=role_prefix),
        )
        db_roles = plan_database(
            existing_roles,
            role_prefix=role_prefix,
            known=known_roles,
            environ=os.environ,
            demo_passwords=demo_passwords,
            rotate=rotate,
        )
    if not do_apply:
        for a in accounts:
            a.action = "not applied"
    else:
        apply(
            mgmt,
            accounts,
            settings,
            vhost=target,
            create_vhost=vhost is not None,
            declare_topology=do_topology,
        )
    db_error: click.ClickException | None = None
    if db_roles is not None:
        assert database_admin_url is not None
        try:
            urls = _database_call(
                database_admin_url,
                provision_db.apply_roles(
                    database_admin_url,
                    role_prefix=role_prefix,
                    passwords={r.principal: r.password for r in db_roles},
                ),
            )
        except click.ClickException as e:
            # the broker's new passwords must still reach the file; the roles are unchanged
            # (applied in one transaction), so the file's database lines stay valid
            db_error, db_roles = e, None
        else:
            for r in db_roles:
                r.url = urls[r.principal]
            kept_lines = [f"{r.env_key}={r.url}" for r in db_roles]
    if output is not None:
        write_secret_file(
            output, env_file_text(accounts, host, target) + database_env_text(kept_lines)
        )
    if db_error is not None:
        raise db_error
    if definitions_path is not None:
        # only a file of demo passwords alone is reproducible and public; hashes of any other
        # password get random salts and stay private
        demo_only = all(a.source == "demo" for a in accounts)
        doc = definitions(accounts, settings, vhost=target, admin=admin, fixed_salts=demo_only)
        text = json.dumps(doc, indent=2) + "\n"
        if demo_only:
            try:
                definitions_path.write_text(text)
            except OSError as e:
                raise ProvisionError(f"cannot write {definitions_path}: {e.strerror}") from None
        else:
            write_secret_file(definitions_path, text)
    _report(
        accounts,
        host,
        target,
        show_credentials=output is None,
        as_json=as_json,
        database=db_roles,
        database_url=database_admin_url,
    )


def _report(
    accounts: Sequence[Account],
    host: str,
    vhost: str,
    *,
    show_credentials: bool,
    as_json: bool,
    database: Sequence[DatabaseRole] | None = None,
    database_url: str | None = None,
) -> None:
    def shown(r: DatabaseRole | Account) -> bool:
        # a password given in the environment is known to the caller: never echoed
        return show_credentials and r.source != "environment"

    if as_json:
        rows = []
        for a in accounts:
            row: dict[str, Any] = {
                "principal": a.grant.principal,
                "user": a.user,
                "password": a.action,
                "password_from": a.source or None,
                "permissions": a.grant.permissions(),
                "topic_permissions": [
                    {"exchange": t.exchange, "write": t.write, "read": t.read}
                    for t in a.grant.topics
                ],
            }
            if shown(a) and a.password is not None:
                row["amqp_url"] = a.amqp_url(host, vhost)
            rows.append(row)
        report: dict[str, Any] = {"vhost": vhost, "users": rows}
        if database is not None:
            from messaging.provision.database import database_name

            assert database_url is not None
            db_rows = []
            for r in database:
                db_row: dict[str, Any] = {
                    "principal": r.principal,
                    "role": r.role,
                    "schema": r.schema,
                    "password": r.action,
                    "password_from": r.source,
                    "env_key": r.env_key,
                }
                if shown(r):
                    db_row["database_url"] = r.url
                db_rows.append(db_row)
            report["database"] = {"database": database_name(database_url), "roles": db_rows}
        click.echo(json.dumps(report, indent=2))
        return
    for a in accounts:
        p = a.grant.permissions()
        topics = ", ".join(f"{t.exchange} {t.write}" for t in a.grant.topics) or "-"
        click.echo(
            f"{a.user} ({a.action}): read {p['read']}  write {p['write']}  "
            f"configure {p['configure']}  topics {topics}"
        )
    if show_credentials:
        for a in accounts:
            if a.source == "environment":
                click.echo(f"# {a.user}: password from {a.password_env_key}")
            elif a.password is not None:
                click.echo(f"{a.env_key}={a.amqp_url(host, vhost)}")
            else:
                click.echo(f"# {a.user}: existing password kept (--rotate sets a new one)")
    for r in database or ():
        owns = f"owns schema {r.schema}" if r.schema else "reads every schema (the CLI)"
        click.echo(f"{r.role} ({r.action}): {owns}")
        if show_credentials:
            if shown(r):
                click.echo(f"{r.env_key}={r.url}")
            else:
                click.echo(f"# {r.role}: password from the environment")
