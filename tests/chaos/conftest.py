"""Chaos runs get their own RabbitMQ vhost and PostgreSQL database (created, migrated and
declared here, removed afterwards), their own broker users and database roles (one per
principal, provisioned here with a prefix unique to the run, removed afterwards), always leave
RabbitMQ and PostgreSQL running, and print their numbers in pytest's terminal summary."""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from messaging import deadletters, topology
from messaging.db import create_schema, ensure_database, make_engine
from messaging.management import Management
from messaging.provision import principals
from messaging.service import migrate
from messaging.settings import Settings
from process_manager import bootstrap
from tests import support
from tests.chaos.harness import restore_infrastructure
from tests.conftest import PG_ADMIN, _isolated_settings

#: the seed of a run that is not given one (CHAOS_SEED=... reruns any other)
DEFAULT_SEED = 20240605
ADMIN_URL = os.environ.get("SAGABUS_TEST_RABBITMQ_ADMIN", principals.DEFAULT_ADMIN_URL)

SUMMARIES: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for text in SUMMARIES:
        terminalreporter.write_sep("=", "chaos run")
        terminalreporter.write_line(text)


@pytest.fixture(scope="module")
def chaos_seed() -> int:
    raw = os.environ.get("CHAOS_SEED", "").strip()
    return int(raw) if raw else DEFAULT_SEED


@pytest.fixture(scope="module")
def chaos_lock() -> Iterator[None]:
    """One chaos run at a time on a machine: each restarts the RabbitMQ and PostgreSQL that every
    test session on it shares, and two at once would trip over each other's restarts."""
    with open(Path(tempfile.gettempdir()) / "sagabus-chaos.lock", "w") as f:
        deadline = time.monotonic() + 240
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another chaos run held the machine for 240s")
                time.sleep(1)
        yield


def user_prefix(run: str) -> str:
    return f"sagabus-{run}-"


def role_prefix(run: str) -> str:
    return f"sagabus_{run}_"


def delete_users(prefix: str) -> list[str]:
    """Every broker user whose name starts with ``prefix`` (users are not per vhost)."""
    mgmt = Management(ADMIN_URL)
    deleted = []
    for user in mgmt.call("GET", "users") or []:
        if user["name"].startswith(prefix):
            mgmt.call(
                "DELETE", f"users/{urllib.parse.quote(user['name'], safe='')}", missing_ok=True
            )
            deleted.append(user["name"])
    return deleted


async def drop_roles(prefix: str) -> list[str]:
    """Every PostgreSQL role whose name starts with ``prefix``; call it after the database they
    owned is dropped (what they owned and were granted there went with it; ``DROP OWNED`` takes
    what may be left elsewhere, such as grants on shared objects)."""
    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        roles = [
            r["rolname"]
            for r in await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, $1)", prefix
            )
        ]
        for role in roles:
            quoted = '"' + role.replace('"', '""') + '"'
            await conn.execute(f"DROP OWNED BY {quoted}")
            await conn.execute(f"DROP ROLE {quoted}")
    finally:
        await conn.close()
    return roles


@pytest.fixture(scope="module")
def chaos_run() -> str:
    """The run's id: its vhost, database, broker users and database roles are named after it."""
    return "chaos" + uuid.uuid4().hex[:8]


@pytest_asyncio.fixture(scope="module")
async def chaos_principals(
    chaos_settings: Settings, chaos_run: str
) -> AsyncIterator[principals.Principals]:
    """A broker user per principal in the run's vhost (``sagabus-<run>-<principal>``) and a
    database role per service and the operator (``sagabus_<run>_<principal>``), as ``sagabus
    provision`` makes them. Users are deleted here, roles once the database is dropped (by
    ``chaos_settings``, which is torn down after this)."""
    try:
        yield await principals.provision_all(
            chaos_settings,
            admin_url=ADMIN_URL,
            user_prefix=user_prefix(chaos_run),
            role_prefix=role_prefix(chaos_run),
        )
    finally:
        await asyncio.to_thread(restore_infrastructure)  # the management API needs the broker
        await asyncio.to_thread(delete_users, user_prefix(chaos_run))


@pytest_asyncio.fixture(scope="module")
async def chaos_settings(chaos_lock: None, chaos_run: str) -> AsyncIterator[Settings]:
    run = chaos_run
    s = _isolated_settings(run)
    vhost = f"sagabus-test-{run}"
    await asyncio.to_thread(restore_infrastructure)
    support.create_vhost(vhost)
    try:
        await ensure_database(s)
        engine = make_engine(s)
        try:
            await migrate(bootstrap.definitions(s), engine)
            await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
        finally:
            await engine.dispose()
        await topology.declare_all(s)
        yield s
    finally:
        # whatever the test did to them, the broker and the database run again
        await asyncio.to_thread(restore_infrastructure)
        try:
            await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
            await drop_roles(role_prefix(run))
        finally:
            support.delete_vhost(vhost)
