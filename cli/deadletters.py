"""``sagabus dlq``: inspect, group, replay and purge dead letters (collected into PostgreSQL)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from cli.base import (
    Duration,
    Failed,
    emit_json,
    settings,
    with_engine,
)

T = TypeVar("T")


@click.group()
def dlq() -> None:
    """Inspect, group, replay and purge dead letters (collected into PostgreSQL)."""


def _filters(
    ids: tuple[str, ...] = (),
    queue: str | None = None,
    type_: str | None = None,
    saga: str | None = None,
    error: str | None = None,
    since: timedelta | None = None,
    group: str | None = None,
    status: str | None = "open",
) -> Any:
    from messaging.deadletters import Filters

    parsed = []
    for i in ids:
        try:
            parsed.append(uuid.UUID(i))
        except ValueError:
            raise click.BadParameter(f"{i!r} is not a dead-letter id (a UUID)") from None
    return Filters(
        ids=tuple(parsed),
        queue=queue,
        message_type=type_,
        saga_id=saga,
        error=error,
        since=since,
        group=group,
        status=status,
    )


def _filter_options(fn: Any) -> Any:
    for opt in reversed(
        [
            click.option("--queue", help="Work queue the message failed on, e.g. sagabus.payment."),
            click.option("--type", "type_", help="Message type, e.g. payment.AuthorizePayment.v1."),
            click.option("--saga", help="Saga id."),
            click.option("--error", help="Text in the error class or message."),
            click.option("--since", type=Duration(), help="Failed within this long, e.g. 1h."),
        ]
    ):
        fn = opt(fn)
    return fn


def _dlq_engine_call(fn: Callable[[Any], Awaitable[T]]) -> T:
    async def go(engine: Any) -> T:
        from messaging import deadletters
        from messaging.db import create_schema

        await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
        return await fn(engine)

    return with_engine(go)


@dlq.command("list")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option(
    "--status",
    type=click.Choice(["open", "replayed", "purged", "any"]),
    default="open",
    show_default=True,
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    status: str,
    limit: int,
    as_json: bool,
) -> None:
    """List dead letters, newest first."""
    from messaging import deadletters

    f = _filters(ids, queue, type_, saga, error, since, None, None if status == "any" else status)
    rows = _dlq_engine_call(lambda e: deadletters.list_dead_letters(e, f, limit))
    if as_json:
        emit_json(rows)
        return
    table = Table("id", "failed", "queue", "type", "error", "group", "status")
    for r in rows:
        table.add_row(
            r["id"],
            r["failed_at"][:19],
            r["queue"],
            r["message_type"] or "-",
            f"{r['error_class']}: {r['error_message']}"[:70],
            r["group"],
            r["status"],
        )
    Console().print(table)


@dlq.command("show")
@click.argument("dead_letter_id")
@click.option("--json", "as_json", is_flag=True)
def dlq_show(dead_letter_id: str, as_json: bool) -> None:
    """Body, headers, reason and trace id of one dead letter."""
    from messaging import deadletters

    f = _filters((dead_letter_id,))
    row = _dlq_engine_call(lambda e: deadletters.show(e, f.ids[0]))
    if row is None:
        raise Failed(f"no dead letter {dead_letter_id}")
    emit_json(row) if as_json else Console().print_json(json.dumps(row, default=str))


@dlq.command("groups")
@_filter_options
@click.option("--json", "as_json", is_flag=True)
def dlq_groups(
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    as_json: bool,
) -> None:
    """Open dead letters grouped by failure fingerprint (error class, normalised message, queue,
    type)."""
    from messaging import deadletters

    f = _filters((), queue, type_, saga, error, since)
    rows = _dlq_engine_call(lambda e: deadletters.groups(e, f))
    if as_json:
        emit_json(rows)
        return
    table = Table("group", "count", "queue", "type", "error", "last failed")
    for r in rows:
        table.add_row(
            r["group"],
            str(r["count"]),
            r["queue"],
            r["message_type"] or "-",
            f"{r['error_class']}: {r['example']}"[:70],
            r["last_failed_at"][:19],
        )
    Console().print(table)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--group", help="Failure group (see `sagabus dlq groups`).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option(
    "--rate", type=click.FloatRange(min=0.01), default=None, help="At most this many per second."
)
@click.option(
    "--force",
    is_flag=True,
    help="Also replay dead letters older than the shortest retention window (inbox, "
    "participants, sagas), whose late copy nothing may absorb any more.",
)
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    group: str | None,
    dry_run: bool,
    limit: int,
    rate: float | None,
    force: bool,
    as_json: bool,
) -> None:
    """Republish dead letters to the queue that failed them, with their original message id.

    Dead letters older than the shortest retention window are left alone unless --force: the
    ids and tombstones that would make their late copy harmless may have been pruned."""
    from messaging import deadletters, telemetry
    from messaging.publisher import Publisher

    f = _filters(ids, queue, type_, saga, error, since, group)
    if not f.any():
        raise click.UsageError("name dead-letter ids, a --group, or at least one filter")
    s = settings()
    window = None if force else deadletters.replay_window(s)
    if window is not None:
        f = dataclasses.replace(f, failed_within=window)
    too_old = 0

    async def go(engine: Any) -> list[dict[str, Any]]:
        import aio_pika

        nonlocal too_old
        if window is not None:
            too_old = await deadletters.count_too_old(
                engine, dataclasses.replace(f, failed_within=None), window
            )

        if dry_run:
            return await deadletters.replay(engine, None, f, limit=limit, dry_run=True)  # type: ignore[arg-type]
        connection = await aio_pika.connect_robust(s.amqp_url)
        async with connection:
            publisher = await Publisher.open(connection)
            try:
                return await deadletters.replay(engine, publisher, f, limit=limit, rate=rate)
            finally:
                telemetry.shutdown_tracing()

    rows = _dlq_engine_call(go)
    if as_json:
        emit_json(
            {"dry_run": dry_run, "count": len(rows), "too_old": too_old, "dead_letters": rows}
        )
    else:
        verb = "would replay" if dry_run else "replayed"
        click.echo(f"{verb} {len(rows)} dead letter(s)")
        for r in rows:
            click.echo(f"  {r['id']}  {r['queue']}  {r['message_type']}")
    if too_old:
        click.echo(
            f"left {too_old} dead letter(s) that failed more than {window} ago: nothing may "
            "absorb their late copy any more (--force replays them anyway)",
            err=True,
        )


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@_filter_options
@click.option("--group", help="Failure group.")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100_000, show_default=True)
@click.option("--yes", is_flag=True, help="Confirm: archive the matching open dead letters.")
def dlq_purge(
    ids: tuple[str, ...],
    queue: str | None,
    type_: str | None,
    saga: str | None,
    error: str | None,
    since: timedelta | None,
    group: str | None,
    limit: int,
    yes: bool,
) -> None:
    """Archive dead letters (status purged; rows are kept, never destroyed)."""
    from messaging import deadletters

    f = _filters(ids, queue, type_, saga, error, since, group)
    if not f.any():
        raise click.UsageError("name dead-letter ids, a --group, or at least one filter")
    if not yes:
        raise click.UsageError("purge needs --yes")
    n = _dlq_engine_call(lambda e: deadletters.purge(e, f, limit=limit))
    click.echo(f"archived {n} dead letter(s)")
