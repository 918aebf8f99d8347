"""Least-privilege broker users: one RabbitMQ user per service, allowed only what it does.

The permission model is data (``GRANTS``): per principal, the queues it consumes, the exchanges
it publishes to, and the routing keys it may use on the topic exchanges. ``apply`` puts it on a
broker through the management HTTP API (and can declare the topology there as the admin);
``definitions`` renders it, with the topology, as a RabbitMQ definitions file to load at boot.
Both are idempotent. ``sagabus provision`` (``cli.provision``) runs them; with
``--database-admin-url`` it also applies the database's model (``messaging.provision.database``:
one PostgreSQL role per service, owning only its own schema, and an operator role).

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
from messaging.management import Management
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
_START_ONLY = TopicGrant(topology.COMMANDS_EXCHANGE, _exactly(sorted(topology.START_ROUTING_KEYS)))
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


__all__ = [
    "GRANTS",
    "PARTICIPANTS",
    "Account",
    "DatabaseRole",
    "Grant",
    "Management",
    "TopicGrant",
    "apply",
    "definitions",
    "password_env_key",
    "password_hash",
    "passwords_from_environment",
    "plan",
    "plan_database",
    "read_database_env",
    "topology_definitions",
]
