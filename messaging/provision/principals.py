"""Own users and roles for a process that hosts every service (the demo, the chaos run).

``sagabus provision`` is what a deployment runs once. The demo runs every service in one
process, and still each service must publish as its own broker user (the consumers check it)
and touch only its own schema as its own database role. This provisions both with fresh
passwords on every call (they live only in this process) and returns each service's
``Credentials``; ``client`` is the user that starts sagas.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass

from messaging.management import LOCAL_ADMIN_URL, Management
from messaging.provision import broker as provision
from messaging.provision import database as provision_db
from messaging.service import DEAD_LETTERS, Credentials
from messaging.settings import Settings

DEFAULT_ADMIN_URL = LOCAL_ADMIN_URL


@dataclass(frozen=True)
class Principals:
    #: service (and ``dead-letters``) -> its own broker user and database role
    services: dict[str, Credentials]
    #: the AMQP URL of the user that starts sagas (``client``)
    client_amqp_url: str
    #: the AMQP URL of the operator (``dlq replay``, ``sagabus start``)
    operator_amqp_url: str
    #: the database URL of the operator role (the CLI)
    operator_database_url: str


def _vhost_and_host(amqp_url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(amqp_url)
    vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    host = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"
    return vhost, host


async def provision_all(
    settings: Settings,
    *,
    admin_url: str = DEFAULT_ADMIN_URL,
    user_prefix: str = "sagabus-demo-",
    role_prefix: str = "sagabus_demo_",
) -> Principals:
    """One broker user per principal in the vhost of ``settings.amqp_url`` (through the
    management API at ``admin_url``, topology declared) and one database role per service in
    ``settings.database_url`` (as that URL's superuser); new passwords every time."""
    vhost, host = _vhost_and_host(settings.amqp_url)
    mgmt = Management(admin_url)
    accounts = provision.plan(
        user_prefix=user_prefix,
        existing=[f"{user_prefix}{p}" for p in provision.GRANTS],
        rotate=True,
    )
    await asyncio.to_thread(
        provision.apply, mgmt, accounts, settings, vhost=vhost, declare_topology=True
    )
    amqp = {a.grant.principal: a.amqp_url(host, vhost) for a in accounts}
    databases = await provision_db.apply_roles(settings.database_url, role_prefix=role_prefix)
    services = {
        name: Credentials(amqp_url=amqp[name], database_url=databases.get(name))
        for name in (*provision_db.SCHEMAS,)
        if name in amqp
    }
    assert DEAD_LETTERS in services, "the dead-letter collector has its own user and role"
    return Principals(
        services=services,
        client_amqp_url=amqp["client"],
        operator_amqp_url=amqp["operator"],
        operator_database_url=databases[provision_db.OPERATOR],
    )
