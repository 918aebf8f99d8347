"""Chaos runs get their own RabbitMQ vhost and PostgreSQL database (created, migrated and
declared here, removed afterwards), always leave RabbitMQ and PostgreSQL running, and print
their numbers in pytest's terminal summary."""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from messaging import deadletters, topology
from messaging.db import create_schema, ensure_database, make_engine
from messaging.service import migrate
from messaging.settings import Settings
from process_manager import bootstrap
from tests import support
from tests.chaos.harness import restore_infrastructure
from tests.conftest import PG_ADMIN, _isolated_settings

#: the seed of a run that is not given one (CHAOS_SEED=... reruns any other)
DEFAULT_SEED = 20240605

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


@pytest_asyncio.fixture(scope="module")
async def chaos_settings(chaos_lock: None) -> AsyncIterator[Settings]:
    run = "chaos" + uuid.uuid4().hex[:8]
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
        await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
        support.delete_vhost(vhost)
