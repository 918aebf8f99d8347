"""A provisioned broker for the security tests: a vhost of their own, the topology declared by
the admin, and one restricted user per service made by ``sagabus provision`` itself.

``restricted`` runs every service as its own user in that vhost (shared by the security tests).

RabbitMQ users are shared by every vhost, so these get a user prefix unique to the test session;
the vhost, the users and the database are removed afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import AsyncEngine

from cli.provision import provision as provision_command
from messaging.db import ensure_database, make_engine
from messaging.management import Management
from messaging.provision import broker as provision
from messaging.service import Runtime
from messaging.settings import Settings
from process_manager import bootstrap
from tests import support

PG_ADMIN = os.environ.get("SAGABUS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("SAGABUS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
ADMIN_URL = os.environ.get("SAGABUS_TEST_RABBITMQ_ADMIN", "http://guest:guest@127.0.0.1:15672")


@dataclass(frozen=True)
class Provisioned:
    vhost: str
    user_prefix: str
    #: principal -> its AMQP URL (its own user and password, in ``vhost``)
    urls: dict[str, str]
    #: the admin's AMQP URL in ``vhost``
    admin_url: str
    env_file: Path

    def url(self, principal: str) -> str:
        return self.urls[principal]


def run_provision(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(provision_command, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    output: dict[str, Any] = json.loads(result.output)
    return output


def delete_users(prefix: str) -> None:
    mgmt = Management(ADMIN_URL)
    for user in mgmt.call("GET", "users") or []:
        if user["name"].startswith(prefix):
            mgmt.call(
                "DELETE", f"users/{urllib.parse.quote(user['name'], safe='')}", missing_ok=True
            )


@pytest.fixture(scope="session")
def sec_id() -> str:
    return uuid.uuid4().hex[:8]


@contextlib.contextmanager
def provisioned_vhost(vhost: str, prefix: str, env_file: Path) -> Iterator[Provisioned]:
    """``sagabus provision`` into a new vhost with users named ``prefix<principal>``; both are
    removed on exit."""
    try:
        run_provision(
            "--vhost", vhost, "--user-prefix", prefix, "--admin-url", ADMIN_URL,
            "--output", str(env_file),
        )  # fmt: skip
        urls = {
            key.removeprefix(provision.ENV_KEY_PREFIX).lower().replace("_", "-"): value
            for key, _, value in (
                line.partition("=")
                for line in env_file.read_text().splitlines()
                if line.startswith(provision.ENV_KEY_PREFIX)
            )
        }
        admin = AMQP_BASE.rstrip("/") + "/" + urllib.parse.quote(vhost, safe="")
        yield Provisioned(vhost, prefix, urls, admin, env_file)
    finally:
        support.delete_vhost(vhost)
        delete_users(prefix)


@pytest.fixture(scope="session")
def provisioned(sec_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provisioned]:
    """Shared by the session's security tests."""
    env_file = tmp_path_factory.mktemp("provision") / "amqp.env"
    with provisioned_vhost(f"sagabus-sec-{sec_id}", f"sagabus-sec-{sec_id}-", env_file) as p:
        yield p


@pytest.fixture
def own_provisioned(tmp_path: Path) -> Iterator[Provisioned]:
    """A provisioned vhost (and users) for one test alone: nothing else consumes its queues."""
    oid = uuid.uuid4().hex[:8]
    with provisioned_vhost(
        f"sagabus-sec-own-{oid}", f"sagabus-sec-own-{oid}-", tmp_path / "amqp.env"
    ) as p:
        yield p


@pytest_asyncio.fixture(scope="session")
async def sec_settings(sec_id: str, provisioned: Provisioned) -> AsyncIterator[Settings]:
    """Settings for services in the provisioned vhost, with a database of their own (services
    sharing a database with another vhost's runtime would relay each other's outboxes)."""
    name = f"sagabus_sec_{sec_id}"
    s = Settings(
        amqp_url=provisioned.admin_url,
        database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{name}",
        declare_topology=False,
        retry_delays_ms=(50, 100, 200, 400),
        retry_jitter=0.1,
        max_attempts=4,
        shipping_max_attempts=3,
        timeout_poll_s=0.1,
        outbox_poll_s=0.2,
        db_pool_size=5,
        max_message_bytes=8 * 1024,
    )
    await ensure_database(s)
    yield s
    await support.drop_database(PG_ADMIN, name)


@pytest_asyncio.fixture(scope="session")
async def sec_engine(sec_settings: Settings) -> AsyncIterator[AsyncEngine]:
    e = make_engine(sec_settings)
    yield e
    await e.dispose()


@pytest_asyncio.fixture(scope="session")
async def restricted(
    provisioned: Provisioned, sec_settings: Settings, sec_engine: AsyncEngine
) -> AsyncIterator[dict[str, Runtime]]:
    """One runtime per service, each connected as its own user, like one container each."""
    runtimes: dict[str, Runtime] = {}
    try:
        for name in bootstrap.FACTORIES:
            s = sec_settings.model_copy(update={"amqp_url": provisioned.url(name)})
            runtimes[name] = Runtime(bootstrap.definitions(s, [name]), s, engine=sec_engine)
            await runtimes[name].start()
        s = sec_settings.model_copy(update={"amqp_url": provisioned.url("dead-letters")})
        runtimes["dead-letters"] = Runtime([], s, engine=sec_engine, dead_letters=True)
        await runtimes["dead-letters"].start()
        yield runtimes
    finally:
        for runtime in runtimes.values():
            await runtime.stop()
