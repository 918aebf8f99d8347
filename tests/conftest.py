"""Shared fixtures. Every test session gets its own PostgreSQL database and its own RabbitMQ
vhost, and removes both at the end; nothing touches the machine's other data."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import ensure_database, make_engine
from messaging.service import Runtime
from messaging.settings import Settings
from process_manager import bootstrap
from tests import support

PG_ADMIN = os.environ.get("SAGABUS_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_BASE = os.environ.get("SAGABUS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def _isolated_settings(run_id: str) -> Settings:
    db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/sagabus_test_{run_id}"
    return Settings(
        amqp_url=AMQP_BASE.rstrip("/") + f"/sagabus-test-{run_id}",
        database_url=db_url,
        retry_delays_ms=(50, 100, 200, 400),
        retry_jitter=0.1,
        max_attempts=4,
        shipping_max_attempts=3,
        step_timeout_s=30,
        timeout_poll_s=0.1,
        outbox_poll_s=0.2,
        db_pool_size=10,
    )


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def settings(run_id: str) -> Iterator[Settings]:
    """Isolated settings: a fresh vhost and database for this test session."""
    s = _isolated_settings(run_id)
    vhost = f"sagabus-test-{run_id}"
    support.create_vhost(vhost)
    yield s
    support.delete_vhost(vhost)


@pytest_asyncio.fixture(scope="session")
async def database(settings: Settings) -> AsyncIterator[Settings]:
    await ensure_database(settings)
    yield settings
    await support.drop_database(PG_ADMIN, f"sagabus_test_{settings.database_url.rsplit('_', 1)[1]}")


@pytest_asyncio.fixture(scope="session")
async def engine(database: Settings) -> AsyncIterator[AsyncEngine]:
    e = make_engine(database)
    yield e
    await e.dispose()


@pytest_asyncio.fixture(scope="session")
async def services(database: Settings, engine: AsyncEngine) -> AsyncIterator[Runtime]:
    """Every service running in-process against the session's database and vhost."""
    runtime = Runtime(bootstrap.definitions(database), database, engine=engine)
    await runtime.start()
    yield runtime
    await runtime.stop()


@pytest_asyncio.fixture(scope="session")
async def amqp(settings: Settings) -> AsyncIterator[AbstractRobustConnection]:
    """A broker connection of the tests' own (for publishing, inspecting and declaring)."""
    connection = await aio_pika.connect_robust(settings.amqp_url)
    yield connection
    await connection.close()


@pytest_asyncio.fixture(scope="session")
async def dead_letters(amqp: AbstractRobustConnection) -> support.DeadLetters:
    return support.DeadLetters(amqp)


@pytest.fixture
def uid() -> str:
    """A short unique suffix for order ids, SKUs and throwaway broker objects."""
    return uuid.uuid4().hex[:10]
