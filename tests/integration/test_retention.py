"""Retention against the real database: expired inbox rows and old *sent* outbox rows go, in
batches; unsent outbox rows stay whatever their age, and so do young rows. Business rows
(``RetentionRule``s) go only when their work is finished and their window has passed, and rows
that absorb late duplicates outlive every window a copy could come back in."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters
from messaging.db import create_schema, inbox_table, outbox_table
from messaging.retention import RetentionRule, prune, prune_loop, prune_rules
from messaging.service import migrate
from messaging.settings import Settings
from process_manager import bootstrap
from schemas.checkout import saga_id_for_order
from tests.support import wait_for

pytestmark = pytest.mark.integration


async def test_prune_deletes_only_expired_inbox_rows_and_old_sent_outbox_rows(
    engine: AsyncEngine, uid: str
) -> None:
    schema = f"it_retention_{uid}"
    metadata = MetaData(schema=schema)
    inbox, outbox = inbox_table(metadata), outbox_table(metadata)
    await create_schema(engine, schema, metadata)
    ages = {"old": "now() - interval '3 days'", "young": "now() - interval '1 minute'"}
    try:
        async with engine.begin() as conn:
            for age, at in ages.items():
                for _ in range(7):  # more than one batch of 5 below
                    await conn.execute(
                        text(
                            f'INSERT INTO "{schema}".inbox (message_id, message_type, received_at)'
                            f" VALUES (:m, :t, {at})"
                        ),
                        {"m": uuid.uuid4(), "t": f"in-{age}"},
                    )
                for sent in ("sent", "unsent"):
                    for _ in range(7):
                        await conn.execute(
                            text(
                                f'INSERT INTO "{schema}".outbox (message_id, message_type,'
                                " exchange, routing_key, headers, body, created_at, sent_at)"
                                f" VALUES (:m, :t, 'x', 'k', '{{}}', '', {at},"
                                f" {at if sent == 'sent' else 'NULL'})"
                            ),
                            {"m": uuid.uuid4(), "t": f"out-{age}-{sent}"},
                        )

        removed = await prune(
            engine,
            inbox=inbox,
            outbox=outbox,
            inbox_keep=timedelta(days=2),
            outbox_keep=timedelta(days=1),
            batch=5,
        )

        assert removed == (7, 7)
        async with engine.connect() as conn:
            left_in = (
                await conn.execute(
                    text(f'SELECT message_type, count(*) FROM "{schema}".inbox GROUP BY 1')
                )
            ).all()
            left_out = (
                await conn.execute(
                    text(f'SELECT message_type, count(*) FROM "{schema}".outbox GROUP BY 1')
                )
            ).all()
        assert dict(left_in) == {"in-young": 7}
        assert dict(left_out) == {"out-old-unsent": 7, "out-young-sent": 7, "out-young-unsent": 7}

        # nothing expired is left: a second pass deletes nothing; keeping for ever deletes nothing
        assert await prune(
            engine,
            inbox=inbox,
            outbox=outbox,
            inbox_keep=timedelta(days=2),
            outbox_keep=timedelta(days=1),
            batch=5,
        ) == (0, 0)
        assert await prune(
            engine, inbox=inbox, outbox=outbox, inbox_keep=None, outbox_keep=None
        ) == (0, 0)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


async def test_migrating_an_existing_schema_adds_indexes_it_lacks(
    engine: AsyncEngine, uid: str
) -> None:
    """A schema created before an index was added to its tables gets the index on migrate."""
    schema = f"it_indexes_{uid}"
    metadata = MetaData(schema=schema)
    inbox_table(metadata)
    await create_schema(engine, schema, metadata)
    try:
        async with engine.begin() as conn:
            names = (
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                        {"s": schema},
                    )
                )
                .scalars()
                .all()
            )
            brin = [n for n in names if "received_at" in n]
            assert brin, names
            for name in brin:
                await conn.execute(text(f'DROP INDEX "{schema}"."{name}"'))
        await create_schema(engine, schema, metadata)  # as a service start-up does
        async with engine.connect() as conn:
            again = (
                (
                    await conn.execute(
                        text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                        {"s": schema},
                    )
                )
                .scalars()
                .all()
            )
        assert sorted(again) == sorted(names)
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


# -- business rows: finished sagas, participants' rows, dead letters ---------------------------

DAY = 86_400


def _business_settings(settings: Settings, **windows: float) -> Settings:
    base = {
        "saga_retention_s": 5 * DAY,
        "participant_retention_s": 5 * DAY,
        "dead_letter_retention_s": 3 * DAY,
        "inbox_retention_s": 2 * DAY,
    }
    return settings.model_copy(update={**base, **windows})


def _rules(settings: Settings) -> list[RetentionRule]:
    rules = [r for d in bootstrap.definitions(settings) for r in d.retained]
    return [*rules, *deadletters.RETAINED]


async def _backdated(engine: AsyncEngine, uid: str) -> None:
    """Rows of orders ``<uid>-<name>``: ``old`` ones 10 days old, ``young`` ones 1 hour."""
    old, young = "now() - interval '10 days'", "now() - interval '1 hour'"
    sagas = {
        "done-old": ("COMPLETED", old),
        "comp-old": ("COMPENSATED", old),
        "live-old": ("PENDING_PAYMENT", old),
        "done-young": ("COMPLETED", young),
        "manual-open": ("FAILED_NEEDS_MANUAL", old),
        "manual-closed": ("FAILED_NEEDS_MANUAL", old),
    }
    async with engine.begin() as conn:
        for name, (status, at) in sagas.items():
            order = f"{uid}-{name}"
            saga = saga_id_for_order(order)
            running = status == "PENDING_PAYMENT"
            finished = "NULL" if running else at
            await conn.execute(
                text(
                    "INSERT INTO process_manager.sagas (saga_id, saga_type, business_key,"
                    " order_id, status, phase, seq, version, definition_version, state,"
                    " correlation_id, started_at, updated_at, finished_at) VALUES (:s,"
                    " 'checkout', :o, :o, :st, :ph, 1, 1, 'checkout.v1', '{}', :s,"
                    f" {at}, {at}, {finished})"
                ),
                {"s": saga, "o": order, "st": status, "ph": "RUNNING" if running else status},
            )
            for _ in range(3):
                await conn.execute(
                    text(
                        "INSERT INTO process_manager.history (saga_id, at, seq, message_type,"
                        f" outcome, note) VALUES (:s, {at}, 1, 't', 'applied', 'n')"
                    ),
                    {"s": saga},
                )
            if name.startswith("manual"):
                resolved = old if name == "manual-closed" else "NULL"
                await conn.execute(
                    text(
                        "INSERT INTO process_manager.manual_cases (saga_id, order_id, reason,"
                        f" opened_at, resolved_at) VALUES (:s, :o, 'r', {old}, {resolved})"
                    ),
                    {"s": saga, "o": order},
                )
        participants = {
            "orders.orders": [("done-old", "COMPLETED", old), ("pending-old", "PENDING", old)],
            "payment.payments": [("done-old", "CAPTURED", old), ("auth-old", "AUTHORIZED", old)],
            "inventory.reservations": [
                ("done-old", "RESERVED", old),
                ("rel-young", "RELEASED", young),
            ],
            "shipping.shipments": [("done-old", "CREATED", old), ("done-young", "CREATED", young)],
        }
        for table, entries in participants.items():
            for name, status, at in entries:
                order = f"{uid}-{name}"
                columns, values = {
                    "orders.orders": ("created_at", f"{at}"),
                    "payment.payments": ("amount_minor", "100"),
                    "inventory.reservations": ("items", "'[]'"),
                    "shipping.shipments": ("tracking_number", "'trk'"),
                }[table]
                await conn.execute(
                    text(
                        f"INSERT INTO {table} (order_id, saga_id, status, updated_at, {columns})"
                        f" VALUES (:o, :s, :st, {at}, {values})"
                    ),
                    {"o": order, "s": saga_id_for_order(order), "st": status},
                )
        for name, at in (("done-old", old), ("done-young", young)):
            order = f"{uid}-{name}"
            await conn.execute(
                text(
                    "INSERT INTO notification.notifications (fact_id, saga_id, order_id,"
                    f" customer_token, template, channel, sent_at) VALUES (:f, :s, :o, 'cus',"
                    f" 't', 'email', {at})"
                ),
                {"f": uuid.uuid4(), "s": saga_id_for_order(order), "o": order},
            )
            await conn.execute(
                text(
                    "INSERT INTO shipping.carrier_bookings (idempotency_key, order_id,"
                    f" tracking_number, status, created_at) VALUES (:k, :o, 't', 'BOOKED', {at})"
                ),
                {"k": f"{uid}-{name}", "o": order},
            )
        for name, status, at in (
            ("dl-old-open", "open", old),
            ("dl-old-purged", "purged", old),
            ("dl-young", "open", young),
        ):
            await conn.execute(
                text(
                    "INSERT INTO dead_letters.dead_letters (id, message_id, queue, error_class,"
                    " error_message, failure_kind, fingerprint, retry_count, headers, properties,"
                    f" body, failed_at, collected_at, status) VALUES (:i, :m, 'q', 'E', 'e',"
                    f" 'permanent', 'f', 0, '{{}}', '{{}}', '', {at}, {at}, :st)"
                ),
                {"i": uuid.uuid4(), "m": f"{uid}-{name}", "st": status},
            )


async def _left(engine: AsyncEngine, uid: str) -> dict[str, set[str]]:
    like = {"u": f"{uid}-%"}
    queries = {
        "sagas": "SELECT order_id FROM process_manager.sagas WHERE order_id LIKE :u",
        "history": "SELECT DISTINCT s.order_id FROM process_manager.history h JOIN"
        " (SELECT saga_id, order_id FROM process_manager.sagas UNION ALL SELECT saga_id, order_id"
        " FROM process_manager.manual_cases) s USING (saga_id) WHERE s.order_id LIKE :u",
        "cases": "SELECT order_id FROM process_manager.manual_cases WHERE order_id LIKE :u",
        "orders": "SELECT order_id FROM orders.orders WHERE order_id LIKE :u",
        "payments": "SELECT order_id FROM payment.payments WHERE order_id LIKE :u",
        "reservations": "SELECT order_id FROM inventory.reservations WHERE order_id LIKE :u",
        "shipments": "SELECT order_id FROM shipping.shipments WHERE order_id LIKE :u",
        "bookings": "SELECT order_id FROM shipping.carrier_bookings WHERE order_id LIKE :u",
        "notifications": "SELECT order_id FROM notification.notifications WHERE order_id LIKE :u",
        "dead_letters": "SELECT message_id FROM dead_letters.dead_letters WHERE message_id LIKE :u",
    }
    async with engine.connect() as conn:
        return {
            k: {v.removeprefix(f"{uid}-") for v in (await conn.execute(text(q), like)).scalars()}
            for k, q in queries.items()
        }


async def _history_rows(engine: AsyncEngine, uid: str, name: str) -> int:
    async with engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text("SELECT count(*) FROM process_manager.history WHERE saga_id = :s"),
                    {"s": saga_id_for_order(f"{uid}-{name}")},
                )
            ).scalar_one()
        )


async def test_business_rows_of_finished_work_expire_in_batches_and_the_rest_stays(
    engine: AsyncEngine, database: Settings, uid: str
) -> None:
    await migrate(bootstrap.definitions(database), engine)
    await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
    await _backdated(engine, uid)
    settings = _business_settings(database)

    removed = await prune_rules(engine, _rules(settings), settings, batch=2)

    assert removed["process_manager.sagas"] >= 3
    assert removed["process_manager.history"] >= 9  # three sagas' rows, two per batch
    left = await _left(engine, uid)
    # finished and old: gone; running, young, or with an open manual case: kept
    assert left["sagas"] == {"live-old", "done-young", "manual-open"}
    assert left["cases"] == {"manual-open"}
    assert await _history_rows(engine, uid, "done-old") == 0
    assert await _history_rows(engine, uid, "manual-closed") == 0
    assert await _history_rows(engine, uid, "live-old") == 3  # its saga is still there
    assert await _history_rows(engine, uid, "manual-open") == 3
    # participants: settled and old rows go, a pending order and a held authorization stay
    assert left["orders"] == {"pending-old"}
    assert left["payments"] == {"auth-old"}
    assert left["reservations"] == {"rel-young"}
    assert left["shipments"] == {"done-young"}
    assert left["bookings"] == {"done-young"}
    assert left["notifications"] == {"done-young"}
    # dead letters: replayed or purged ones, once old; an open one is work still to do
    assert left["dead_letters"] == {"dl-young", "dl-old-open"}

    # a second pass deletes nothing of ours; 0 keeps everything for ever
    again = await prune_rules(engine, _rules(settings), settings, batch=2)
    assert not any(again.values()), again
    forever = _business_settings(
        database, saga_retention_s=0, participant_retention_s=0, dead_letter_retention_s=0
    )
    assert await prune_rules(engine, _rules(forever), forever) == {}


async def test_rows_that_absorb_late_duplicates_outlive_the_inbox_and_dead_letter_windows(
    engine: AsyncEngine, database: Settings, uid: str
) -> None:
    """A payment row is what makes a replayed AuthorizePayment harmless: even with a one-day
    window it stays while a copy could still come back (inbox 14 days, dead letters 20)."""
    settings = _business_settings(
        database,
        participant_retention_s=DAY,
        inbox_retention_s=14 * DAY,
        dead_letter_retention_s=20 * DAY,
    )
    payment_rule = next(r for r in _rules(settings) if r.name == "payment.payments")
    assert payment_rule.keep(settings) == timedelta(days=20)
    dead_letter_rule = deadletters.RETAINED[0]
    assert dead_letter_rule.keep(settings) == timedelta(days=20)  # its own window, no floor
    history = next(r for r in _rules(settings) if r.name == "process_manager.history")
    assert history.keep(settings) == timedelta(days=5)  # not a guard: the saga row is

    await migrate(bootstrap.definitions(database), engine)
    await _backdated(engine, uid)  # ten days old
    await prune_rules(engine, [payment_rule], settings)
    assert (await _left(engine, uid))["payments"] == {"done-old", "auth-old"}


async def test_prune_loop_prunes_a_services_rules_and_stops(
    engine: AsyncEngine, database: Settings, uid: str
) -> None:
    await migrate(bootstrap.definitions(database), engine)
    await _backdated(engine, uid)
    settings = _business_settings(database)
    stop = asyncio.Event()
    order = next(d for d in bootstrap.definitions(settings) if d.name == "order")
    task = asyncio.create_task(
        prune_loop(
            "order",
            engine,
            order.inbox,
            order.outbox,
            inbox_retention_s=settings.inbox_retention_s,
            outbox_retention_s=settings.outbox_retention_s,
            interval_s=0.05,
            stop=stop,
            rules=order.retained,
            settings=settings,
        )
    )

    async def pruned() -> bool:
        return (await _left(engine, uid))["orders"] == {"pending-old"}

    await wait_for(pruned, what="the order service's loop pruned its old orders")
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_the_dead_letter_store_prunes_with_no_inbox_or_outbox(
    engine: AsyncEngine, database: Settings, uid: str
) -> None:
    """What the dead-letter collector's process runs: only the store's rule."""
    await migrate(bootstrap.definitions(database), engine)
    await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
    await _backdated(engine, uid)
    settings = _business_settings(database)
    stop = asyncio.Event()
    task = asyncio.create_task(
        prune_loop(
            deadletters.SERVICE,
            engine,
            None,
            None,
            inbox_retention_s=0,
            outbox_retention_s=0,
            interval_s=0.05,
            stop=stop,
            rules=deadletters.RETAINED,
            settings=settings,
        )
    )

    async def pruned() -> bool:
        return (await _left(engine, uid))["dead_letters"] == {"dl-young", "dl-old-open"}

    await wait_for(pruned, what="old dead letters pruned")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert (await _left(engine, uid))["sagas"] != set()  # nothing but the store was touched
