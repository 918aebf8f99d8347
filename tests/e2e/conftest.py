"""All services running in-process against the session's own database and vhost."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.service import Runtime
from messaging.settings import Settings
from process_manager import bootstrap


@pytest_asyncio.fixture(scope="session")
async def services(database: Settings, engine: AsyncEngine) -> AsyncIterator[Runtime]:
    runtime = Runtime(bootstrap.definitions(database), database, engine=engine)
    await runtime.start()
    yield runtime
    await runtime.stop()
