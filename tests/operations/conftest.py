"""Failure-handling tests get their own vhost and database (the dead-letter collector consumes
every DLQ, which must not steal the messages other test modules inspect), and start the services
they need per test, so a test can run with a participant down and bring it up later."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import ensure_database, make_engine
from messaging.service import Runtime, migrate
from messaging.settings import Settings
from process_manager import bootstrap
from tests import support
from tests.conftest import PG_ADMIN, _isolated_settings

Start = Callable[..., Awaitable[Runtime]]


@pytest_asyncio.fixture(scope="module")
async def ops_settings() -> AsyncIterator[Settings]:
    run = "ops" + uuid.uuid4().hex[:8]
    s = _isolated_settings(run).model_copy(
        update={
            "step_timeout_s": 1.0,
            "max_step_attempts": 2,
            "compensation_timeout_s": 1.5,
            "max_compensation_attempts": 3,
            "carrier_lose_response_rate": 1.0,
            "sweeper_interval_s": 3600,
        }
    )
    support.create_vhost(f"sagabus-test-{run}")
    await ensure_database(s)
    yield s
    await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
    support.delete_vhost(f"sagabus-test-{run}")


@pytest_asyncio.fixture(scope="module")
async def ops_engine(ops_settings: Settings) -> AsyncIterator[AsyncEngine]:
    e = make_engine(ops_settings)
    await migrate(bootstrap.definitions(ops_settings), e)
    yield e
    await e.dispose()


@pytest_asyncio.fixture
async def start_services(ops_settings: Settings, ops_engine: AsyncEngine) -> AsyncIterator[Start]:
    """``await start_services("order", "payment", dead_letters=True)``; all stop after the test."""
    runtimes: list[Runtime] = []

    async def start(
        *names: str, dead_letters: bool = False, settings: Settings | None = None
    ) -> Runtime:
        s = settings or ops_settings
        rt = Runtime(
            bootstrap.definitions(s, list(names)) if names else [],
            s,
            engine=ops_engine,
            dead_letters=dead_letters,
        )
        await rt.start()
        runtimes.append(rt)
        return rt

    yield start
    for rt in reversed(runtimes):
        await rt.stop()
