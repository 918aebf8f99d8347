"""Least-privilege broker users: one RabbitMQ user per service, allowed only what it does.

The permission model is data (``GRANTS``): per principal, the queues it consumes, the exchanges
it publishes to, and the routing keys it may use on the topic exchanges. ``apply`` puts it on a
broker through the management HTTP API (and can declare the topology there as the admin);
``definitions`` renders it, with the topology, as a RabbitMQ definitions file to load at boot.
Both are idempotent. ``command`` is ``sagabus provision``; with ``--database-admin-url`` it also
applies the database's model (``messaging.provision.database``: one PostgreSQL role per service,
owning only its own schema, and an operator role).

How RabbitMQ checks access (observed on 3.10, and the reason for each grant):

- ``basic.consume`` and ``basic.get`` need *read* on the queue. A *passive* ``queue.declare`` or
  ``exchange.declare`` needs no permission at all, so it proves nothing about access.
- ``basic.publish`` needs *write* on the exchange; the default exchange is the resource
  ``amq.default``.
- Declaring, binding or deleting needs *configure*. No service gets any: an admin declares the
  topology (``sagabus migrate``, this command, or the definitions file), and services run with
  ``SAGABUS_DECLARE_TOPOLOGY=false``.
- Topic permissions limit the routing keys a user may publish with, but only on *topic*
  exchanges; a user with no topic permission for an exchange may use every key there.

Failed messages are confined to their own queue's routes. A consumer schedules a retry on the
topic exchange ``sagabus.retry`` with key ``<queue>.retry.<n>`` and dead-letters on the topic
exchange ``sagabus.dlx`` with key ``<queue>``; its topic permissions there match only its own
queue's keys. ``dlq replay`` republishes on the topic exchange ``sagabus.replay`` with key
``<queue>``, which only the operator may write to, and only with work queue names. Nobody may
write to the default exchange (it routes to any queue by name, whatever the topic permissions)
nor to ``sagabus.dead-letter`` (direct, so not limited by routing key: only the broker
dead-letters through it, and broker-internal dead-lettering needs no permission).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from aio_pika.abc import ExchangeType

from messaging import topology
from messaging.management import Management, ManagementError, ManagementUnreachable, redact
from messaging.management import quote as _q
from messaging.settings import Settings

#: the permission regex that matches no resource (RabbitMQ treats ``^$`` as "nothing")
NOTHING = "^$"
#: the default exchange as a permission resource
DEFAULT_EXCHANGE = "amq.default"
DEFAULT_USER_PREFIX = "sagabus-"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: env file keys: SAGABUS_AMQP_URL_<PRINCIPAL>, e.g. SAGABUS_AMQP_URL_PROCESS_MANAGER
ENV_KEY_PREFIX = "SAGABUS_AMQP_URL_"
#: passwords given in the environment: SAGABUS_AMQP_PASSWORD_<PRINCIPAL>, e.g.
#: SAGABUS_AMQP_PASSWORD_PROCESS_MANAGER (like SAGABUS_DATABASE_PASSWORD_<PRINCIPAL>)
PASSWORD_ENV_PREFIX = "SAGABUS_AMQP_PASSWORD_"

EXIT_FAILED = 1
EXIT_UNREACHABLE = 3


class ProvisionError(click.ClickException):
    exit_code = EXIT_FAILED


class Unreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


# -- the permission model ----------------------------------------------------------------------


@dataclass(frozen=True)
class TopicGrant:
    """Routing keys a principal may publish with (``write``) on one topic exchange."""

    exchange: str
    write: str
    read: str = NOTHING


@dataclass(frozen=True)
class Grant:
    principal: str
    purpose: str
    #: queues it consumes (read)
    consumes: tuple[str, ...] = ()
    #: exchanges it publishes to (write); "" is the default exchange
    publishes: tuple[str, ...] = ()
    topics: tuple[TopicGrant, ...] = ()

    @property
    def configure(self) -> str:
        return NOTHING

    @property
    def write(self) -> str:
        return _exactly(DEFAULT_EXCHANGE if e == "" else e for e in self.publishes)

    @property
    def read(self) -> str:
        return _exactly(self.consumes)

    def permissions(self) -> dict[str, str]:
        return {"configure": self.configure, "write": self.write, "read": self.read}


def _escape(name: str) -> str:
    """Escape regex metacharacters (not ``-``, which ``re.escape`` escapes needlessly)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\1", name)


def _either(names: Iterable[str]) -> str:
    unique = sorted({_escape(n) for n in names})
    return unique[0] if len(unique) == 1 else "(" + "|".join(unique) + ")"


def _exactly(names: Iterable[str]) -> str:
    """A permission regex matching exactly these resource names (``^$`` for none)."""
    unique = set(names)
    return f"^{_either(unique)}$" if unique else NOTHING


def _keys_starting_with(prefixes: Iterable[str]) -> str:
    """Routing keys whose first word is one of ``prefixes``."""
    return f"^{_either(prefixes)}\\."


#: participants: services whose queue takes ``<service>.#`` from the commands exchange
PARTICIPANTS: tuple[str, ...] = tuple(
    s for s, q in topology.QUEUES.items() if (topology.COMMANDS_EXCHANGE, f"{s}.#") in q.bindings
)
_DLQS = tuple(q.dlq for q in topology.QUEUES.values())
_START_ONLY = TopicGrant(
    topology.COMMANDS_EXCHANGE, _exactly(sorted(topology.START_ROUTING_KEYS))
)
#: ``dlq replay``: back into any work queue, and only into work queues
_REPLAY_INTO_WORK_QUEUES = TopicGrant(
    topology.REPLAY_EXCHANGE,
    _exactly(topology.replay_route(q.name)[1] for q in topology.QUEUES.values()),
)


def _failure_routes(service: str) -> tuple[TopicGrant, TopicGrant]:
    """Retries into its own delay queues, dead letters into its own DLQ: nothing else."""
    spec = topology.QUEUES[service]
    retry_keys = (topology.retry_route(spec, t)[1] for t in range(1, topology.RETRY_TIERS + 1))
    return (
        TopicGrant(topology.RETRY_EXCHANGE, _exactly(retry_keys)),
        TopicGrant(
            topology.DEAD_LETTER_EXCHANGE, _exactly([topology.dead_letter_route(spec.name)[1]])
        ),
    )


def _worker(service: str, *publishes: str, topics: tuple[TopicGrant, ...] = ()) -> Grant:
    """A consumer of its own work queue. Every consumer schedules retries into its own delay
    queues and dead-letters into its own DLQ, each through a topic exchange with keys that start
    with its queue's name."""
    failures = _failure_routes(service)
    return Grant(
        principal=service,
        purpose=f"runs the {service} service",
        consumes=(topology.QUEUES[service].name,),
        publishes=(*publishes, *(t.exchange for t in failures)),
        topics=(*topics, *failures),
    )


def _service(service: str) -> Grant:
    """A service may publish exactly on the routes the topology's table of accepted messages
    names it the sender of (``topology.ACCEPTED``): the process manager each participant's
    command keys, a participant its own reply types' keys (and order its facts). The consumers
    check the same table, so the broker and the code cannot disagree."""
    routes = topology.publishes(service)
    exchanges = sorted({r.exchange for r in routes})
    topics = tuple(
        TopicGrant(e, _exactly(r.routing_key for r in routes if r.exchange == e))
        for e in exchanges
        if topology.EXCHANGES[e] is ExchangeType.TOPIC
    )
    return _worker(service, *exchanges, topics=topics)


GRANTS: dict[str, Grant] = {
    g.principal: g
    for g in (
        *(_service(s) for s in topology.SERVICES),
        Grant(
            principal="dead-letters",
            purpose="runs the dead-letter collector (consumes every DLQ, publishes nothing)",
            consumes=_DLQS,
        ),
        Grant(
            principal="client",
            purpose="starts sagas: publishes each saga's start (StartCheckout, StartReturn) with"
            " routing key <saga>.start (checkout.start, returns.start)",
            publishes=(topology.COMMANDS_EXCHANGE,),
            topics=(_START_ONLY,),
        ),
        Grant(
            principal="operator",
            purpose="the CLI: `sagabus start`, and `sagabus dlq replay` into work queues",
            publishes=(topology.COMMANDS_EXCHANGE, _REPLAY_INTO_WORK_QUEUES.exchange),
            topics=(_START_ONLY, _REPLAY_INTO_WORK_QUEUES),
        ),
    )
}


# -- accounts ----------------------------------------------------------------------------------


@dataclass
class Account:
    grant: Grant
    user: str
    #: None: the user exists and keeps a password not known here
    password: str | None
    #: "created", "updated" (password set again, same or new), "kept" or "not applied"
    action: str = "created"
    #: where the password comes from: "environment", "demo", "file", "new", or "" (kept)
    source: str = ""

    @property
    def env_key(self) -> str:
        return ENV_KEY_PREFIX + _env_suffix(self.grant.principal)

    @property
    def password_env_key(self) -> str:
        return password_env_key(self.grant.principal)

    def amqp_url(self, amqp_host: str, vhost: str) -> str:
        if self.password is None:
            raise ProvisionError(f"the password of {self.user} is not known here")
        user = urllib.parse.quote(self.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        path = "" if vhost == "/" else urllib.parse.quote(vhost, safe="")
        return f"amqp://{user}:{password}@{amqp_host}/{path}"


def _env_suffix(principal: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", principal.upper())


def password_env_key(principal: str) -> str:
    """``SAGABUS_AMQP_PASSWORD_PROCESS_MANAGER`` for ``process-manager``."""
    return PASSWORD_ENV_PREFIX + _env_suffix(principal)


def passwords_from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """principal -> password from SAGABUS_AMQP_PASSWORD_<PRINCIPAL> (an empty value is unset).
    A key naming no principal is refused: a misspelt one would silently leave a user with a
    password nobody knows."""
    by_key = {password_env_key(p): p for p in GRANTS}
    found: dict[str, str] = {}
    stray: list[str] = []
    for key, value in environ.items():
        if not key.startswith(PASSWORD_ENV_PREFIX):
            continue
        if key not in by_key:
            stray.append(key)
        elif value:
            found[by_key[key]] = value
    if stray:
        raise click.UsageError(
            f"{', '.join(sorted(stray))} name no broker user; expected "
            f"{PASSWORD_ENV_PREFIX}<SERVICE> for one of {', '.join(GRANTS)}"
        )
    return found


def demo_password(principal: str) -> str:
    """Fixed, guessable passwords (`--demo-passwords`), for local experiments only."""
    return f"{principal}-secret"


def new_password() -> str:
    return secrets.token_urlsafe(24)


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))
    with a 4-byte salt."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("the salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def read_env_file(path: Path) -> dict[str, str]:
    """user -> password from an env file this command wrote before (missing file: nothing)."""
    found: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return found
    except OSError as e:
        raise ProvisionError(f"cannot read {path}: {e.strerror}") from None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key.startswith(ENV_KEY_PREFIX):
            continue
        url = urllib.parse.urlsplit(value.strip().strip("'\""))
        if url.username and url.password:
            found[urllib.parse.unquote(url.username)] = urllib.parse.unquote(url.password)
    return found


def plan(
    *,
    user_prefix: str = DEFAULT_USER_PREFIX,
    known: Mapping[str, str] | None = None,
    existing: Iterable[str] = (),
    rotate: bool = False,
    principals: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    demo: bool = False,
) -> list[Account]:
    """Choose each user's password, first match wins:

    1. ``environ`` (principal -> password, from SAGABUS_AMQP_PASSWORD_<PRINCIPAL>): set on the
       broker, also for an existing user, whatever ``rotate`` says;
    2. ``demo``: the fixed demo password;
    3. a known one (user -> password, from an earlier env file) is set again, unless ``rotate``;
    4. an existing user whose password is not known here keeps it, unless ``rotate``;
    5. a new random one.
    """
    known = known or {}
    environ = environ or {}
    existing = set(existing)
    accounts = []
    for name in principals or GRANTS:
        user = f"{user_prefix}{name}"
        action = "updated" if user in existing else "created"
        password: str | None
        if environ.get(name):
            password, source = environ[name], "environment"
        elif demo:
            password, source = demo_password(name), "demo"
        elif known.get(user) is not None and not rotate:
            password, source = known[user], "file"
        elif user in existing and not rotate:
            password, source, action = None, "", "kept"
        else:
            password, source = new_password(), "new"
        accounts.append(Account(GRANTS[name], user, password, action, source))
    return accounts


# -- the topology as data ----------------------------------------------------------------------


def topology_definitions(settings: Settings, vhost: str) -> dict[str, list[dict[str, Any]]]:
    """Exchanges, queues and bindings exactly as ``topology.declare`` declares them."""
    exchanges: list[dict[str, Any]] = [
        {
            "name": name,
            "vhost": vhost,
            "type": kind.value,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }
        for name, kind in topology.EXCHANGES.items()
    ]
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []

    def queue(name: str, arguments: dict[str, Any]) -> None:
        queues.append(
            {
                "name": name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": arguments,
            }
        )

    def bind(exchange: str, queue_name: str, key: str) -> None:
        bindings.append(
            {
                "source": exchange,
                "vhost": vhost,
                "destination": queue_name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
        )

    for spec in topology.QUEUES.values():
        queue(spec.name, topology.work_queue_arguments(spec, settings))
        queue(spec.dlq, dict(topology.DLQ_ARGUMENTS))
        for name in spec.retry_queues:
            queue(name, topology.retry_queue_arguments(spec))
        for exchange, queue_name, key in spec.all_bindings():
            bind(exchange, queue_name, key)
    return {"exchanges": exchanges, "queues": queues, "bindings": bindings}


def definitions(
    accounts: Sequence[Account],
    settings: Settings,
    *,
    vhost: str = "/",
    admin: tuple[str, str] | None = None,
    fixed_salts: bool = False,
) -> dict[str, Any]:
    """A RabbitMQ definitions document: the vhost, the users (password hashes), their
    permissions and topic permissions, and the topology. ``admin`` adds an administrator with
    every permission: a node that loads definitions at boot creates no default user.
    ``fixed_salts`` derives each salt from the user name, so regenerating a file with fixed
    (demo) passwords reproduces it byte for byte."""

    def salt(user: str) -> bytes | None:
        return hashlib.sha256(f"sagabus:{user}".encode()).digest()[:4] if fixed_salts else None

    users: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []
    topic_permissions: list[dict[str, Any]] = []
    if admin is not None:
        name, password = admin
        users.append(_user(name, password_hash(password, salt(name)), ["administrator"]))
        permissions.append(
            {"user": name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
        )
    for a in accounts:
        if a.password is None:
            raise ProvisionError(f"the password of {a.user} is not known here; pass --rotate")
        users.append(_user(a.user, password_hash(a.password, salt(a.user)), []))
        permissions.append({"user": a.user, "vhost": vhost, **a.grant.permissions()})
        for t in a.grant.topics:
            topic_permissions.append(
                {
                    "user": a.user,
                    "vhost": vhost,
                    "exchange": t.exchange,
                    "write": t.write,
                    "read": t.read,
                }
            )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        **topology_definitions(settings, vhost),
    }


def _user(name: str, hashed: str, tags: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "password_hash": hashed,
        "hashing_algorithm": HASHING_ALGORITHM,
        "tags": tags,
        "limits": {},
    }


# -- applying the model ------------------------------------------------------------------------


def apply(
    mgmt: Management,
    accounts: Sequence[Account],
    settings: Settings,
    *,
    vhost: str = "/",
    create_vhost: bool = False,
    declare_topology: bool = True,
) -> None:
    """Make the broker match the model; running it again changes nothing (a user whose password
    is not known here keeps it)."""
    v = _q(vhost)
    admin = f"permissions/{v}/{_q(mgmt.user)}"
    if create_vhost:
        mgmt.call("PUT", f"vhosts/{v}", {})
        if mgmt.call("GET", admin, missing_ok=True) is None:
            # a vhost is created without permissions: the admin needs them for the topology
            mgmt.call("PUT", admin, {"configure": ".*", "write": ".*", "read": ".*"})
    elif not mgmt.vhost_exists(vhost):
        raise ProvisionError(f"vhost {vhost!r} does not exist (pass --vhost to create it)")
    if declare_topology:
        topo = topology_definitions(settings, vhost)
        for e in topo["exchanges"]:
            body = {k: e[k] for k in ("type", "durable", "auto_delete", "internal", "arguments")}
            mgmt.call("PUT", f"exchanges/{v}/{_q(e['name'])}", body)
        for q in topo["queues"]:
            body = {k: q[k] for k in ("durable", "auto_delete", "arguments")}
            mgmt.call("PUT", f"queues/{v}/{_q(q['name'])}", body)
        for b in topo["bindings"]:
            mgmt.call(
                "POST",
                f"bindings/{v}/e/{_q(b['source'])}/q/{_q(b['destination'])}",
                {"routing_key": b["routing_key"], "arguments": {}},
            )
    for a in accounts:
        u = _q(a.user)
        if a.password is not None:
            mgmt.call("PUT", f"users/{u}", {"password": a.password, "tags": ""})
        mgmt.call("PUT", f"permissions/{v}/{u}", a.grant.permissions())
        wanted = {t.exchange: t for t in a.grant.topics}
        current = mgmt.call("GET", f"users/{u}/topic-permissions", missing_ok=True) or []
        stale = [
            c
            for c in current
            if c.get("vhost") == vhost
            and (
                c.get("exchange") not in wanted
                or (c.get("write"), c.get("read"))
                != (wanted[c["exchange"]].write, wanted[c["exchange"]].read)
            )
        ]
        if stale:  # the API deletes a user's topic permissions in a vhost all at once
            mgmt.call("DELETE", f"topic-permissions/{v}/{u}", missing_ok=True)
        for t in wanted.values():
            mgmt.call(
                "PUT",
                f"topic-permissions/{v}/{u}",
                {"exchange": t.exchange, "write": t.write, "read": t.read},
            )


# -- files -------------------------------------------------------------------------------------


def write_secret_file(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (mode 0600) from the first byte."""
    path = path.expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ProvisionError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ProvisionError(f"cannot write {path}: {e.strerror}") from None


def env_file_text(accounts: Sequence[Account], amqp_host: str, vhost: str) -> str:
    lines = [
        f"# RabbitMQ credentials written by `sagabus provision` for vhost {vhost!r}. SECRET.",
        "# Give each service its line as SAGABUS_AMQP_URL, with SAGABUS_DECLARE_TOPOLOGY=false:",
        "# e.g. SAGABUS_AMQP_URL=$SAGABUS_AMQP_URL_PAYMENT for the payment service.",
    ]
    lines += [f"{a.env_key}={a.amqp_url(amqp_host, vhost)}" for a in accounts]
    return "\n".join(lines) + "\n"


def read_database_env(path: Path) -> tuple[dict[str, str], list[str]]:
    """The database lines of an env file this command wrote before: role -> password, and the
    lines themselves (kept as they are when this run does not provision the database)."""
    from messaging.provision.database import ENV_KEY_PREFIX as DB_KEY_PREFIX

    found: dict[str, str] = {}
    lines: list[str] = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return found, lines
    except OSError as e:
        raise ProvisionError(f"cannot read {path}: {e.strerror}") from None
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or not key.startswith(DB_KEY_PREFIX):
            continue
        lines.append(line.strip())
        url = urllib.parse.urlsplit(value.strip().strip("'\""))
        if url.username and url.password:
            found[urllib.parse.unquote(url.username)] = urllib.parse.unquote(url.password)
    return found, lines


def database_env_text(lines: Sequence[str]) -> str:
    if not lines:
        return ""
    header = [
        "# PostgreSQL roles written by `sagabus provision --database-admin-url`. SECRET.",
        "# Give each service its line as SAGABUS_DATABASE_URL, and the CLI the OPERATOR one:",
        "# e.g. SAGABUS_DATABASE_URL=$SAGABUS_DATABASE_URL_PAYMENT for the payment service.",
    ]
    return "\n".join([*header, *lines]) + "\n"


@dataclass
class DatabaseRole:
    principal: str
    role: str
    schema: str | None
    password: str
    #: "file", "environment", "demo" or "new"
    source: str
    #: "created" or "updated" (the role existed; its password is set again, same or new)
    action: str = "created"
    url: str = ""

    @property
    def env_key(self) -> str:
        from messaging.provision.database import env_key

        return env_key(self.principal)


def plan_database(
    existing: Iterable[str],
    *,
    role_prefix: str,
    known: Mapping[str, str],
    environ: Mapping[str, str],
    demo_passwords: bool = False,
    rotate: bool = False,
) -> list[DatabaseRole]:
    """Each role's password: from SAGABUS_DATABASE_PASSWORD_<PRINCIPAL>, else the demo one, else
    the one in the env file (role -> password in ``known``) unless ``rotate``, else a new one.
    A role that exists keeps working only with the password set here, so one whose password is
    not known needs ``rotate``."""
    from messaging.provision import database as pdb

    existing = set(existing)
    roles: list[DatabaseRole] = []
    unknown: list[str] = []
    for p in pdb.PRINCIPALS:
        role = pdb.role_name(p, role_prefix)
        schema = pdb.SCHEMAS.get(p)
        from_env = environ.get(pdb.password_env_key(p))
        if from_env:
            password, source = from_env, "environment"
        elif demo_passwords:
            password, source = demo_password(p), "demo"
        elif role in known and not rotate:
            password, source = known[role], "file"
        else:
            if p in existing and not rotate:
                unknown.append(role)
            password, source = pdb.new_password(), "new"
        action = "updated" if p in existing else "created"
        roles.append(DatabaseRole(p, role, schema, password, source, action))
    if unknown:
        raise ProvisionError(
            f"database roles {', '.join(unknown)} exist and their passwords are not known here "
            "(not in --output, nor in SAGABUS_DATABASE_PASSWORD_<SERVICE>): pass --rotate to "
            "set new ones"
        )
    return roles


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


# -- the command -------------------------------------------------------------------------------


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
def command(
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


__all__ = [
    "GRANTS",
    "PARTICIPANTS",
    "Account",
    "DatabaseRole",
    "Grant",
    "Management",
    "TopicGrant",
    "apply",
    "command",
    "definitions",
    "password_env_key",
    "password_hash",
    "passwords_from_environment",
    "plan",
    "plan_database",
    "read_database_env",
    "topology_definitions",
]
