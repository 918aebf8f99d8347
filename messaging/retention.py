"""Retention: a service's inbox and outbox do not grow for ever.

* **Outbox**: a row is deleted once it was *sent* and is older than ``outbox_retention_s``.
  Unsent rows are never deleted, whatever their age.
* **Inbox**: a row is the memory that a message was processed; it is deleted once older than
  ``inbox_retention_s``. A copy of the message arriving after that would be processed again,
  so the window must outlast every way a copy can still arrive: redeliveries, the delay
  queues (seconds to minutes) and an operator replaying dead letters (the default keeps two
  weeks). Participants' effects are idempotent by key as well, so the inbox is not the only
  guard, but it is the cheap one.

* **Business rows** (``RetentionRule``): each service declares which of its own rows expire,
  by an age column, an extra condition (only finished business: a terminal saga, a settled
  payment) and the setting that gives the window (``saga_retention_s``,
  ``participant_retention_s``, ``dead_letter_retention_s``). A rule whose rows remember an
  effect (a tombstone, an idempotent command's result) is a *guard*: its window is never shorter
  than the inbox's or the dead-letter store's, so no late copy (redelivery, replay) can arrive
  after the row that would have absorbed it is gone.

Rows go in small batches, each its own short transaction, so pruning never holds many locks or
one long transaction; several instances may prune at once. 0 keeps rows for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import structlog
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.db import affected, driver, qualified
from messaging.settings import Settings

log = structlog.get_logger("sagabus.retention")


Window = Literal["saga_retention_s", "participant_retention_s", "dead_letter_retention_s"]


@dataclass(frozen=True)
class RetentionRule:
    """Rows of ``table`` older than a window (by ``age_column``) that match ``where`` expire.

    ``where`` is plain SQL over the table's columns (it may name the table to correlate a
    subquery, and ``$1`` is the window as an interval); ``window`` names the setting that gives
    the window; ``guard``: the rows absorb late duplicates (see the module's docstring)."""

    table: Table
    age_column: str
    window: Window
    where: str | None = None
    guard: bool = True

    def __post_init__(self) -> None:
        if self.age_column not in self.table.c:
            raise ValueError(f"{self.table.fullname} has no column {self.age_column!r}")
        if not self.table.primary_key.columns:
            raise ValueError(f"{self.table.fullname} has no primary key to delete by")

    @property
    def name(self) -> str:
        return self.table.fullname

    def keep(self, settings: Settings) -> timedelta | None:
        """How long rows are kept under ``settings``; None: for ever."""
        seconds = float(getattr(settings, self.window))
        if seconds <= 0:
            return None
        if self.guard:
            seconds = max(seconds, settings.inbox_retention_s, settings.dead_letter_retention_s)
        return timedelta(seconds=seconds)

    def delete_sql(self) -> str:
        q = qualified(self.table)
        key = ", ".join(f'"{c.name}"' for c in self.table.primary_key.columns)
        extra = f" AND ({self.where})" if self.where else ""
        return (
            f"DELETE FROM {q} WHERE ({key}) IN (SELECT {key} FROM {q}"
            f' WHERE "{self.age_column}" < now() - $1::interval{extra} LIMIT $2)'
        )


async def prune_rules(
    engine: AsyncEngine,
    rules: Sequence[RetentionRule],
    settings: Settings,
    *,
    batch: int = 1000,
) -> dict[str, int]:
    """Delete the expired rows of every rule, in order; returns rows deleted per table."""
    removed: dict[str, int] = {}
    for rule in rules:
        keep = rule.keep(settings)
        if keep is not None:
            removed[rule.name] = await _delete_in_batches(engine, rule.delete_sql(), keep, batch)
    return removed


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
    inbox: Table | None,
    outbox: Table | None,
    inbox_keep: timedelta | None,
    outbox_keep: timedelta | None,
    batch: int = 5000,
) -> tuple[int, int]:
    """Delete expired inbox rows and sent outbox rows; returns (inbox, outbox) rows deleted."""
    removed_in = removed_out = 0
    if outbox is not None and outbox_keep is not None:
        q = qualified(outbox)
        removed_out = await _delete_in_batches(
            engine,
            f"DELETE FROM {q} WHERE id IN (SELECT id FROM {q}"
            " WHERE created_at < now() - $1::interval AND sent_at IS NOT NULL LIMIT $2)",
            outbox_keep,
            batch,
        )
    if inbox is not None and inbox_keep is not None:
        q = qualified(inbox)
        removed_in = await _delete_in_batches(
            engine,
            # by its whole key (id and type): a young row sharing an old row's id stays
            f"DELETE FROM {q} WHERE (message_id, message_type) IN"
            f" (SELECT message_id, message_type FROM {q}"
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
    inbox: Table | None,
    outbox: Table | None,
    *,
    inbox_retention_s: float,
    outbox_retention_s: float,
    interval_s: float,
    stop: asyncio.Event,
    rules: Sequence[RetentionRule] = (),
    settings: Settings | None = None,
) -> None:
    """Prune every ``interval_s`` until ``stop``: the inbox and outbox (either may be None),
    then the ``rules`` with their windows from ``settings``; a failure is logged and tried next
    time."""
    inbox_keep = _keep(inbox_retention_s) if inbox is not None else None
    outbox_keep = _keep(outbox_retention_s) if outbox is not None else None
    if settings is None or not any(r.keep(settings) for r in rules):
        rules = ()
    if inbox_keep is None and outbox_keep is None and not rules:
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
            removed = await prune_rules(engine, rules, settings) if settings and rules else {}
            if removed_in or removed_out or any(removed.values()):
                log.info(
                    "retention_pruned",
                    service=service,
                    inbox=removed_in,
                    outbox=removed_out,
                    **{k: v for k, v in removed.items() if v},
                )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the database is away: next time
            log.warning("retention_failed", service=service, error=f"{type(e).__name__}: {e}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
