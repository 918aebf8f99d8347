"""Retention: a service's inbox and outbox do not grow for ever.

* **Outbox**: a row is deleted once it was *sent* and is older than ``outbox_retention_s``.
  Unsent rows are never deleted, whatever their age.
* **Inbox**: a row is the memory that a message was processed; it is deleted once older than
  ``inbox_retention_s``. A copy of the message arriving after that would be processed again,
  so the window must outlast every way a copy can still arrive: redeliveries, the delay
  queues (seconds to minutes) and an operator replaying dead letters (the default keeps two
  weeks). Participants' effects are idempotent by key as well, so the inbox is not the only
  guard, but it is the cheap one.

Rows go in small batches, each its own short transaction, so pruning never holds many locks or
one long transaction; several instances may prune at once. 0 keeps rows for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import structlog
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import affected, driver, qualified

log = structlog.get_logger("sagabus.retention")


async def _delete_in_batches(engine: AsyncEngine, sql: str, keep: timedelta, batch: int) -> int:
    total = 0
    while True:
        async with engine.begin() as conn:
            pg = await driver(conn)
            n = affected(await pg.execute(sql, keep, batch))
        total += n
        if n < batch:
            return total


async def prune(
    engine: AsyncEngine,
    *,
    inbox: Table,
    outbox: Table,
    inbox_keep: timedelta | None,
    outbox_keep: timedelta | None,
    batch: int = 5000,
) -> tuple[int, int]:
    """Delete expired inbox rows and sent outbox rows; returns (inbox, outbox) rows deleted."""
    removed_in = removed_out = 0
    if outbox_keep is not None:
        q = qualified(outbox)
        removed_out = await _delete_in_batches(
            engine,
            f"DELETE FROM {q} WHERE id IN (SELECT id FROM {q}"
            " WHERE created_at < now() - $1::interval AND sent_at IS NOT NULL LIMIT $2)",
            outbox_keep,
            batch,
        )
    if inbox_keep is not None:
        q = qualified(inbox)
        removed_in = await _delete_in_batches(
            engine,
            f"DELETE FROM {q} WHERE message_id IN (SELECT message_id FROM {q}"
            " WHERE received_at < now() - $1::interval LIMIT $2)",
            inbox_keep,
            batch,
        )
    return removed_in, removed_out


def _keep(seconds: float) -> timedelta | None:
    return timedelta(seconds=seconds) if seconds > 0 else None


async def prune_loop(
    service: str,
    engine: AsyncEngine,
    inbox: Table,
    outbox: Table,
    *,
    inbox_retention_s: float,
    outbox_retention_s: float,
    interval_s: float,
    stop: asyncio.Event,
) -> None:
    """Prune every ``interval_s`` until ``stop``; a failure is logged and tried next time."""
    inbox_keep, outbox_keep = _keep(inbox_retention_s), _keep(outbox_retention_s)
    if inbox_keep is None and outbox_keep is None:
        return
    while not stop.is_set():
        try:
            removed_in, removed_out = await prune(
                engine,
                inbox=inbox,
                outbox=outbox,
                inbox_keep=inbox_keep,
                outbox_keep=outbox_keep,
            )
            if removed_in or removed_out:
                log.info("retention_pruned", service=service, inbox=removed_in, outbox=removed_out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the database is away: next time
            log.warning("retention_failed", service=service, error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
