"""Dead letters: collected into PostgreSQL with their reason, grouped, replayed after the cause is
fixed with each effect applied once, and a replay killed midway loses and doubles nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters
from messaging.deadletters import Filters
from messaging.publisher import Publisher
from messaging.settings import Settings
from participants.notification import service as notification
from process_manager import ops
from tests.operations.conftest import Start
from tests.support import checkout, wait_for, wait_until

pytestmark = pytest.mark.integration


def _env(s: Settings) -> dict[str, str]:
    return {**os.environ, "SAGABUS_AMQP_URL": s.amqp_url, "SAGABUS_DATABASE_URL": s.database_url}


async def _open(engine: AsyncEngine, **kw: Any) -> list[dict[str, Any]]:
    return await deadletters.list_dead_letters(engine, Filters(**kw), 10_000)


async def test_permanent_error_is_stored_with_its_reason(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services("process-manager", dead_letters=True)
    mid = str(uuid.uuid4())
    connection = await aio_pika.connect(ops_settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange("sagabus.commands")
        await ex.publish(
            aio_pika.Message(
                b'{"order_id": 42',
                message_id=mid,
                type="checkout.StartCheckout.v1",
                content_type="application/json",
                headers={"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"},
            ),
            routing_key="checkout.start",
        )
    rows = await wait_for(
        lambda: _open(ops_engine, ids=(), status="open", queue="sagabus.process-manager"),
        what="dead letter collected",
    )
    row = next(r for r in rows if r["message_id"] == mid)
    full = await deadletters.show(ops_engine, uuid.UUID(row["id"]))
    assert full is not None
    assert full["error_class"] == "PermanentError"
    assert "not JSON" in full["error_message"]
    assert full["failure_kind"] == "permanent" and full["retry_count"] == 0
    assert full["original_exchange"] == "sagabus.commands"
    assert full["original_routing_key"] == "checkout.start"
    assert full["body"] == '{"order_id": 42'
    assert full["trace_id"] == "ab" * 16
    assert full["headers"]["sagabus-failed-at"]
    # The CLI shows the same record as JSON.
    out = subprocess.run(
        [sys.executable, "-m", "cli", "dlq", "show", row["id"], "--json"],
        env=_env(ops_settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert mid in out.stdout


async def _break_notifications(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "ALTER TABLE notification.notifications ADD CONSTRAINT "
                "outage CHECK (false) NOT VALID"
            )
        )


async def _fix_notifications(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("ALTER TABLE notification.notifications DROP CONSTRAINT outage"))


async def _notifications(engine: AsyncEngine, order_ids: list[str]) -> dict[str, int]:
    t = notification.notifications
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(t.c.order_id, func.count())
                .where(t.c.order_id.in_(order_ids))
                .group_by(t.c.order_id)
            )
        ).all()
    return {o: n for o, n in rows}


async def test_group_replayed_after_fix_applies_each_effect_once_even_if_killed_midway(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    sku = f"SKU-DLQ-{uuid.uuid4().hex[:6]}"
    async with ops_engine.begin() as conn:
        from participants.inventory import service as inventory

        await inventory.seed(conn, {sku: 100})
    await start_services(
        "process-manager",
        "order",
        "risk",
        "payment",
        "inventory",
        "shipping",
        "notification",
        "analytics",
        dead_letters=True,
    )
    await _break_notifications(ops_engine)
    try:
        cmds = [checkout(sku=sku) for _ in range(6)]
        order_ids = [c.order_id for c in cmds]
        await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(c) for c in cmds])

        async def all_dead() -> list[dict[str, Any]] | None:
            rows = await _open(ops_engine, queue="sagabus.notification", status="open")
            mine = [r for r in rows if r["saga_id"] in {str(ops_saga(o)) for o in order_ids}]
            return mine if len(mine) == len(order_ids) else None

        dead = await wait_for(all_dead, timeout=60, what="notification failures dead-lettered")
        assert {r["failure_kind"] for r in dead} == {"retries_exhausted"}
        assert all(r["retry_count"] == ops_settings.max_attempts - 1 for r in dead)
        group_list = await deadletters.groups(ops_engine, Filters(queue="sagabus.notification"))
        assert len(group_list) == 1, group_list  # same cause, same group, whatever the ids
        group = group_list[0]["group"]
        assert group_list[0]["count"] >= len(order_ids)
    finally:
        await _fix_notifications(ops_engine)

    # Replay slowly in a separate process and kill it after two replays.
    env = _env(ops_settings)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "dlq",
            "replay",
            "--group",
            group,
            "--rate",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    async def two_replayed() -> bool:
        rows = await _open(ops_engine, group=group, status="replayed")
        return len(rows) >= 2

    await wait_for(two_replayed, timeout=60, what="replay under way")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = await _open(ops_engine, group=group, status="open")
    assert partial, "the kill should leave some dead letters still open"

    # Run it again to completion; then replay one message a second time on purpose.
    out = subprocess.run(
        [sys.executable, "-m", "cli", "dlq", "replay", "--group", group, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert await _open(ops_engine, group=group, status="open") == []
    async with ops_engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE dead_letters.dead_letters SET status = 'open' WHERE id = "
                "(SELECT id FROM dead_letters.dead_letters WHERE fingerprint = :g LIMIT 1)"
            ),
            {"g": group},
        )
    connection = await aio_pika.connect_robust(ops_settings.amqp_url)
    async with connection:
        await deadletters.replay(
            ops_engine, await Publisher.open(connection), Filters(group=group), limit=10
        )

    async def delivered_once() -> dict[str, int] | None:
        got = await _notifications(ops_engine, order_ids)
        return got if len(got) == len(order_ids) else None

    got = await wait_for(delivered_once, timeout=60, what="every notification stored")
    assert set(got.values()) == {1}, got
    await asyncio.sleep(0)  # let nothing else sneak in: counts are checked once more below
    rows = await _open(ops_engine, group=group, status="replayed")
    assert all(r["replay_count"] >= 1 and r["last_replayed_by"] for r in rows)
    assert set((await _notifications(ops_engine, order_ids)).values()) == {1}


def ops_saga(order_id: str) -> uuid.UUID:
    from schemas.checkout import saga_id_for_order

    return saga_id_for_order(order_id)


async def test_crash_loop_is_bounded_by_the_delivery_limit_and_stored(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """A consumer that keeps dying on a message (here: one that always rejects with requeue, as a
    crashing process would leave it) cannot loop forever: the quorum queue's x-delivery-limit
    dead-letters it, and the collector stores it with the broker's reason."""
    await start_services(dead_letters=True)
    mid = str(uuid.uuid4())
    connection = await aio_pika.connect(ops_settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # publish straight to the shipping work queue, with no shipping service running
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id=mid, type="shipping.CancelShipment.v1"),
            routing_key="sagabus.shipping",
        )
        queue = await channel.get_queue("sagabus.shipping", ensure=False)
        rejected = 0

        async def crash_looped() -> bool:
            nonlocal rejected
            m = await queue.get(no_ack=False, fail=False)
            if m is not None and m.message_id == mid:
                rejected += 1
                await m.reject(requeue=True)
            elif m is not None:
                await m.reject(requeue=True)
            rows = await _open(ops_engine, queue="sagabus.shipping", status="open")
            return any(r["message_id"] == mid for r in rows)

        await wait_for(crash_looped, timeout=60, interval=0.01, what="delivery limit reached")
    row = next(
        r
        for r in await _open(ops_engine, queue="sagabus.shipping", status="open")
        if r["message_id"] == mid
    )
    assert row["error_class"] == "broker:delivery_limit"
    assert row["failure_kind"] == "broker"
    assert rejected >= ops_settings.delivery_limit  # redelivered up to the limit, then stopped


async def _publish_unknown_starts(s: Settings, type_name: str, n: int) -> None:
    """``n`` messages of an unknown type on the start route: each dead-lettered at once."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange("sagabus.commands")
        for _ in range(n):
            await ex.publish(
                aio_pika.Message(b"{}", message_id=str(uuid.uuid4()), type=type_name),
                routing_key="checkout.start",
            )


async def test_purge_archives_and_the_cli_filters_and_refuses_without_yes(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services("process-manager", dead_letters=True)
    marker = uuid.uuid4().hex[:8]
    await _publish_unknown_starts(ops_settings, f"x.Unknown{marker}.v1", 2)
    env = _env(ops_settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", "dlq", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async def listed() -> list[dict[str, Any]] | None:
        out = cli("list", "--error", marker, "--json")
        rows = json.loads(out.stdout) if out.returncode == 0 else []
        return rows if len(rows) == 2 else None

    rows = await wait_for(listed, timeout=60, what="two dead letters listed by --error")
    assert {r["error_class"] for r in rows} == {"PermanentError"}
    assert all(r["queue"] == "sagabus.process-manager" for r in rows)
    groups = json.loads(cli("groups", "--error", marker, "--json").stdout)
    assert [g["count"] for g in groups] == [2]

    refused = cli("purge", "--error", marker)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--yes" in refused.stderr
    bad = cli("list", "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.startswith("sagabus: error:")

    done = cli("purge", "--error", marker, "--yes")
    assert done.returncode == 0, done.stderr
    assert "archived 2" in done.stdout
    assert json.loads(cli("list", "--error", marker, "--json").stdout) == []
    archived = json.loads(cli("list", "--error", marker, "--status", "purged", "--json").stdout)
    assert len(archived) == 2  # archived, not destroyed
    shown = json.loads(cli("show", archived[0]["id"], "--json").stdout)
    assert shown["status"] == "purged" and shown["purged_by"]


# -- personal data: masked on display, original on replay -------------------------------------


def _dlq_cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "dlq", *args],
        env=_env(s),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_show_and_list_mask_personal_fields_of_a_stored_dead_letter(
    ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    from messaging.db import create_schema

    uid = uuid.uuid4().hex[:8]
    token, street, postal = f"tok_private_{uid}", f"{uid} Hidden Road", f"P{uid}"
    body = checkout(f"pii-{uid}", token=token, postal_code=postal).model_dump(mode="json")
    body["shipping_address"]["line1"] = street
    await create_schema(ops_engine, deadletters.SCHEMA, deadletters.metadata)
    dl_id = uuid.uuid4()
    async with ops_engine.begin() as conn:
        await conn.execute(
            deadletters.dead_letters.insert().values(
                id=dl_id,
                message_id=str(uuid.uuid4()),
                message_type="checkout.StartCheckout.v1",
                saga_id=None,
                queue="sagabus.process-manager",
                error_class="PermanentError",
                error_message=f"rejected: Failing row contains (pii-{uid}, {token}, {street})",
                failure_kind="permanent",
                fingerprint=f"pii{uid}",
                retry_count=0,
                headers={"sagabus-error-message": f"token {token} refused"},
                properties={"message_id": None, "type": "checkout.StartCheckout.v1"},
                body=json.dumps(body).encode(),
                failed_at=datetime.now(UTC),
                status="open",
            )
        )
    outputs = [
        _dlq_cli(ops_settings, "show", str(dl_id), "--json"),
        _dlq_cli(ops_settings, "show", str(dl_id)),
        _dlq_cli(ops_settings, "list", str(dl_id), "--json"),
        _dlq_cli(ops_settings, "list", str(dl_id)),
    ]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        for secret in (token, street, postal):
            assert secret not in out.stdout, (secret, out.stdout)
    shown = json.loads(outputs[0].stdout)
    masked = json.loads(shown["body"])
    assert masked["payment_token"] == "***"
    assert set(masked["shipping_address"].values()) == {"***"}
    assert masked["order_id"] == f"pii-{uid}" and masked["customer_id"] == "cus_test"
    assert masked["items"] == body["items"]  # everything else as stored
    listed = json.loads(outputs[2].stdout)
    assert [r["id"] for r in listed] == [str(dl_id)]
    # the stored row itself is untouched: replay must send what arrived
    async with ops_engine.connect() as conn:
        stored = (
            await conn.execute(
                select(deadletters.dead_letters.c.body).where(
                    deadletters.dead_letters.c.id == dl_id
                )
            )
        ).scalar_one()
    assert json.loads(stored) == body


async def test_a_masked_dead_letter_is_replayed_with_its_original_token(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """The payment service fails an AuthorizePayment until it is fixed; `dlq show` masks the
    token, and `dlq replay` sends the real one: the payment is authorized with it."""
    from participants.inventory import service as inventory
    from participants.payment import service as payment
    from tests.support import wait_terminal

    uid = uuid.uuid4().hex[:8]
    sku, token = f"SKU-PII-{uid}", f"tok_replayed_{uid}"
    async with ops_engine.begin() as conn:
        await inventory.seed(conn, {sku: 5})
    patient = ops_settings.model_copy(update={"step_timeout_s": 120.0})
    await start_services(
        "process-manager",
        "order",
        "risk",
        "payment",
        "inventory",
        "shipping",
        dead_letters=True,
        settings=patient,
    )
    async with ops_engine.begin() as conn:
        await conn.execute(
            text("ALTER TABLE payment.payments ADD CONSTRAINT outage CHECK (false) NOT VALID")
        )
    try:
        cmd = checkout(sku=sku, token=token)
        await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(cmd)])
        saga = str(ops_saga(cmd.order_id))

        async def dead() -> list[dict[str, Any]]:
            return await _open(ops_engine, queue="sagabus.payment", saga_id=saga)

        row = (await wait_for(dead, timeout=60, what="AuthorizePayment dead-lettered"))[0]
    finally:
        async with ops_engine.begin() as conn:
            await conn.execute(text("ALTER TABLE payment.payments DROP CONSTRAINT outage"))

    shown = _dlq_cli(ops_settings, "show", row["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert token not in shown.stdout
    assert json.loads(json.loads(shown.stdout)["body"])["payment_token"] == "***"

    replayed = _dlq_cli(ops_settings, "replay", row["id"], "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert token not in replayed.stdout
    status = await wait_terminal(ops_engine, cmd.order_id, timeout=60)
    assert status["state"] == "COMPLETED", status
    async with ops_engine.connect() as conn:
        stored = (
            await conn.execute(
                select(payment.payments.c.payment_token).where(
                    payment.payments.c.order_id == cmd.order_id
                )
            )
        ).scalar_one()
    assert stored == token


# -- a collector that never loops and never loses (issue 10) ------------------------------------

SHIPPING = "sagabus.shipping"


class _InvalidUtf8(str):
    """A header value pamqp sends as a long string ('S') of bytes that are not UTF-8, as a
    client in another language can: the broker passes it through, pamqp hands the collector
    bytes."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _InvalidUtf8:
        value = super().__new__(cls, raw.decode("latin-1"))
        value.raw = raw
        return value

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def _own_collector(
    s: Settings, engine: AsyncEngine, cls: type[deadletters.Collector] = deadletters.Collector
) -> tuple[deadletters.Collector, aio_pika.abc.AbstractRobustConnection]:
    from messaging import telemetry, topology
    from messaging.db import create_schema

    await create_schema(engine, deadletters.SCHEMA, deadletters.metadata)
    connection = await aio_pika.connect_robust(s.amqp_url)
    collector = cls(engine, telemetry.tracer(deadletters.SERVICE))
    await collector.start(connection, topology.SERVICES)
    return collector, connection


async def _stop(
    collector: deadletters.Collector, connection: aio_pika.abc.AbstractConnection
) -> None:
    await collector.stop()
    await connection.close()


async def _broker_dead_letter(
    s: Settings, message: aio_pika.Message, queue: str = SHIPPING
) -> None:
    """Publish straight to a work queue nobody consumes, then reject it without requeue: the
    broker dead-letters it to ``<queue>.dlq`` (reason ``rejected``), headers as the client set
    them and no ``sagabus-failed-at`` of ours."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(message, routing_key=queue)
    assert message.correlation_id is not None
    await _reject_on(s, message.correlation_id, queue)


async def _reject_on(s: Settings, marker: str, queue: str = SHIPPING) -> None:
    """Take the message with correlation id ``marker`` off ``queue`` and reject it."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        work = await channel.get_queue(queue, ensure=False)

        async def got() -> aio_pika.abc.AbstractIncomingMessage | None:
            m = await work.get(no_ack=False, fail=False)
            if m is not None and m.correlation_id != marker:
                await m.reject(requeue=True)
                return None
            return m

        m = await wait_for(got, timeout=20, what="the message on its work queue")
        assert m is not None
        await m.reject(requeue=False)


async def _rows_of(engine: AsyncEngine, marker: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    select(deadletters.dead_letters)
                    .where(deadletters.dead_letters.c.properties["correlation_id"].astext == marker)
                    .order_by(deadletters.dead_letters.c.collected_at)
                )
            ).all()
        )


async def _stored(engine: AsyncEngine, marker: str, n: int, timeout: float = 20) -> list[Any]:
    async def probe() -> list[Any] | None:
        rows = await _rows_of(engine, marker)
        return rows if len(rows) >= n else None

    return await wait_for(probe, timeout=timeout, what=f"{n} dead letter(s) {marker} stored")


async def _dlq_depth(s: Settings, dlq: str) -> int:
    """The messages ready on ``dlq`` (with no collector running: every message on it)."""
    connection = await aio_pika.connect(s.amqp_url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(dlq, passive=True)
        return int(q.declaration_result.message_count or 0)


async def _dlq_empty(s: Settings, dlq: str) -> None:
    assert await _dlq_depth(s, dlq) == 0, f"{dlq} still holds messages"


def _msg(marker: str, body: bytes = b"{}", **kw: Any) -> aio_pika.Message:
    return aio_pika.Message(body, correlation_id=marker, **kw)


async def test_nul_and_invalid_utf8_headers_are_stored_and_acked_and_collection_goes_on(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services("process-manager")
    marker = uuid.uuid4().hex
    collector, connection = await _own_collector(ops_settings, ops_engine)
    try:
        # 1. a NUL in a header, dead-lettered by a consumer (the process manager: not JSON)
        conn = await aio_pika.connect(ops_settings.amqp_url)
        async with conn:
            channel = await conn.channel(publisher_confirms=True)
            ex = await channel.get_exchange("sagabus.commands")
            await ex.publish(
                _msg(
                    marker,
                    b"not json",
                    message_id=str(uuid.uuid4()),
                    type="checkout.StartCheckout.v1",
                    headers={"x-client-note": "before\x00after"},
                ),
                routing_key="checkout.start",
            )
        # 2. invalid UTF-8 in a long-string header and in a byte-array header, dead-lettered
        # by the broker
        await _broker_dead_letter(
            ops_settings,
            _msg(
                marker,
                b"\xff\xfe raw body",
                message_id=str(uuid.uuid4()),
                headers={
                    "x-latin": _InvalidUtf8(b"caf\xe9 \xff"),
                    "x-bytes": bytearray(b"\xc3\x28\x00"),
                    "x-nested": {"deep": [{"nul": "a\x00"}, 2**40, 1.5]},
                },
            ),
        )
        rows = await _stored(ops_engine, marker, 2)
        by_queue = {r.queue: r for r in rows}
        nul = by_queue["sagabus.process-manager"]
        assert nul.error_class == "PermanentError" and "not JSON" in nul.error_message
        assert "\x00" not in nul.headers["x-client-note"]
        assert nul.headers["x-client-note"].startswith("before")
        assert "NUL" in nul.storage_note and "\\x00" in nul.headers_raw
        bad = by_queue[SHIPPING]
        assert bad.error_class == "broker:rejected"
        assert bad.headers["x-latin"].startswith("caf")
        assert bad.headers["x-nested"]["deep"][1:] == [2**40, 1.5]
        assert "invalid UTF-8" in bad.storage_note
        assert bad.body == b"\xff\xfe raw body"  # the body is never touched
        shown = await deadletters.show(ops_engine, bad.id)
        assert shown is not None and shown["headers_faithful"] is False
        assert "replay sends" in shown["headers_note"] and "x-latin" in shown["headers_raw"]

        # the collector goes on collecting
        after = uuid.uuid4().hex
        await _broker_dead_letter(ops_settings, _msg(after, message_id=str(uuid.uuid4())))
        [ok] = await _stored(ops_engine, after, 1)
        assert ok.storage_note is None and ok.headers_raw is None
        assert collector.stored_raw == 0
    finally:
        await _stop(collector, connection)
    # acked, not merely held: with the collector gone, nothing went back to the DLQs
    await _dlq_empty(ops_settings, "sagabus.process-manager.dlq")
    await _dlq_empty(ops_settings, f"{SHIPPING}.dlq")
    assert len(await _rows_of(ops_engine, marker)) == 2


async def test_bad_failed_at_and_retry_count_are_kept_as_text(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services()
    marker = uuid.uuid4().hex
    values: list[tuple[Any, Any]] = [
        ("yesterday at noon", "many"),
        ("2024-13-45T99:00:00", str(10**40)),
        (" ", -70_000),
        ("2024-05-01T10:00:00", "12"),  # naive: taken as UTC
    ]
    for failed_at, retries in values:
        await _broker_dead_letter(
            ops_settings,
            _msg(
                marker,
                message_id=str(uuid.uuid4()),
                headers={"sagabus-failed-at": failed_at, "sagabus-retry-count": retries},
            ),
        )
    collector, connection = await _own_collector(ops_settings, ops_engine)
    try:
        rows = await _stored(ops_engine, marker, len(values))
    finally:
        await _stop(collector, connection)
    got = {r.headers["sagabus-failed-at"]: r for r in rows}
    assert got["yesterday at noon"].retry_count == 0
    assert got["yesterday at noon"].headers["sagabus-retry-count"] == "many"
    assert "sagabus-failed-at is not a time" in got["yesterday at noon"].storage_note
    assert got["2024-13-45T99:00:00"].retry_count == 0  # 10**40 is not a count the column holds
    assert got[" "].retry_count == 0
    naive = got["2024-05-01T10:00:00"]
    assert naive.failed_at == datetime(2024, 5, 1, 10, tzinfo=UTC) and naive.retry_count == 12
    await _dlq_empty(ops_settings, f"{SHIPPING}.dlq")


async def test_dead_letters_without_failed_at_keep_distinct_ids_across_collector_restarts(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """A message the broker dead-letters (no ``sagabus-failed-at``) is replayed and dead-lettered
    by the broker again: the same message id and queue, each the first delivery of a fresh
    collector (delivery tag 1 both times). Both dead-letterings are stored."""
    await start_services()
    marker, mid = uuid.uuid4().hex, str(uuid.uuid4())
    await _broker_dead_letter(ops_settings, _msg(marker, b'{"n": 1}', message_id=mid))
    collector, connection = await _own_collector(ops_settings, ops_engine)
    try:
        [first] = await _stored(ops_engine, marker, 1)
    finally:
        await _stop(collector, connection)
    publishing = await aio_pika.connect_robust(ops_settings.amqp_url)
    async with publishing:
        done = await deadletters.replay(
            ops_engine, await Publisher.open(publishing), Filters(ids=(first.id,)), limit=1
        )
    assert [r["id"] for r in done] == [str(first.id)]
    await _reject_on(ops_settings, marker)  # it fails again
    collector, connection = await _own_collector(ops_settings, ops_engine)
    try:
        rows = await _stored(ops_engine, marker, 2)
    finally:
        await _stop(collector, connection)
    assert len({r.id for r in rows}) == 2
    assert {r.message_id for r in rows} == {mid}
    assert rows[1].headers["sagabus-replayed-from"] == str(first.id)
    await _dlq_empty(ops_settings, f"{SHIPPING}.dlq")


class _CrashAfterInsert(deadletters.Collector):
    """Stops dead between the insert and the ack of the dead letters of one correlation id,
    until the test has dropped its connection (a crash, as the broker sees it)."""

    target = ""
    crashed = False
    release = asyncio.Event()

    async def insert(self, row: dict[str, Any]) -> None:
        await super().insert(row)
        if row["properties"]["correlation_id"] == self.target:
            type(self).crashed = True
            await self.release.wait()  # then its ack finds no channel


async def test_a_dead_letter_redelivered_after_a_crash_between_insert_and_ack_is_stored_once(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services()
    filler, marker = uuid.uuid4().hex, uuid.uuid4().hex
    # the filler first, so the crashing collector sees the target with delivery tag 2, and the
    # next collector sees it again with tag 1 (and an x-delivery-count)
    await _broker_dead_letter(ops_settings, _msg(filler))
    await _broker_dead_letter(ops_settings, _msg(marker, b'{"crash": true}'))
    _CrashAfterInsert.target = marker
    _CrashAfterInsert.release = asyncio.Event()
    _CrashAfterInsert.crashed = False
    _, connection = await _own_collector(ops_settings, ops_engine, _CrashAfterInsert)
    try:
        await _stored(ops_engine, marker, 1)
        await wait_until(lambda: _CrashAfterInsert.crashed, what="the crash after the insert")
    finally:
        await connection.close()
        _CrashAfterInsert.release.set()
    left = await wait_for(
        lambda: _dlq_depth(ops_settings, f"{SHIPPING}.dlq"), what="the dead letter requeued"
    )
    collector, connection = await _own_collector(ops_settings, ops_engine)
    try:
        await wait_until(lambda: collector.collected >= left, what="the redelivery collected")
    finally:
        await _stop(collector, connection)
    assert len(await _rows_of(ops_engine, marker)) == 1
    assert len(await _rows_of(ops_engine, filler)) == 1
    await _dlq_empty(ops_settings, f"{SHIPPING}.dlq")


async def test_a_dead_letter_the_database_refuses_is_stored_raw_and_replays_its_bytes(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """The database refuses the usual row (a check constraint stands in for whatever a value
    could still break): after a few attempts the raw row is stored and the DLQ message acked;
    ``dlq show`` says the headers are not as they arrived; ``dlq replay`` sends the body's
    bytes and the properties."""
    await start_services()
    marker, mid = uuid.uuid4().hex, str(uuid.uuid4())
    type_ = f"test.Unstorable{marker[:8]}.v1"
    body = b"\x00\xff raw \xfe"
    async with ops_engine.begin() as conn:
        from messaging.db import create_schema

        await create_schema(ops_engine, deadletters.SCHEMA, deadletters.metadata)
        await conn.execute(
            text(
                f"ALTER TABLE dead_letters.dead_letters ADD CONSTRAINT refuse_{marker[:8]} "
                f"CHECK (failure_kind = 'unstorable' OR message_type IS DISTINCT FROM '{type_}')"
                " NOT VALID"
            )
        )
    try:
        await _broker_dead_letter(
            ops_settings,
            _msg(
                marker,
                body,
                message_id=mid,
                type=type_,
                content_type="application/octet-stream",
                headers={"x-kept": "yes", "x-table": {"a": 1}, "x-nul": "a\x00b"},
            ),
        )
        collector, connection = await _own_collector(ops_settings, ops_engine)
        try:
            [row] = await _stored(ops_engine, marker, 1)
            await wait_until(lambda: collector.stored_raw == 1, what="acked")
            assert collector.failures == {}
            after = uuid.uuid4().hex
            await _broker_dead_letter(ops_settings, _msg(after, message_id=str(uuid.uuid4())))
            await _stored(ops_engine, after, 1)
        finally:
            await _stop(collector, connection)
    finally:
        async with ops_engine.begin() as conn:
            await conn.execute(
                text(f"ALTER TABLE dead_letters.dead_letters DROP CONSTRAINT refuse_{marker[:8]}")
            )
    await _dlq_empty(ops_settings, f"{SHIPPING}.dlq")
    assert row.failure_kind == "unstorable" and row.error_class == "collector:unstorable"
    assert f"refuse_{marker[:8]}" in row.error_message  # the storage error is the reason
    assert row.body == body and row.message_id == mid and row.message_type == type_
    # the scalar headers, sanitised
    assert row.headers["x-kept"] == "yes" and row.headers["x-nul"] == "a\ufffdb"
    assert "x-table" not in row.headers and "x-death" not in row.headers
    assert "'x-table': {'a': 1}" in row.headers_raw

    listed = _dlq_cli(ops_settings, "list", str(row.id), "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["failure_kind"] == "unstorable"
    shown = _dlq_cli(ops_settings, "show", str(row.id), "--json")
    assert shown.returncode == 0, shown.stderr
    full = json.loads(shown.stdout)
    assert full["headers_faithful"] is False and "stored raw" in full["headers_note"]
    assert full["body_hex"] == body.hex()

    replayed = _dlq_cli(ops_settings, "replay", str(row.id), "--json")
    assert replayed.returncode == 0, replayed.stderr
    broker = await aio_pika.connect(ops_settings.amqp_url)
    async with broker:
        channel = await broker.channel()
        work = await channel.get_queue(SHIPPING, ensure=False)

        async def arrived() -> aio_pika.abc.AbstractIncomingMessage | None:
            got = await work.get(no_ack=False, fail=False)
            if got is not None and got.correlation_id != marker:
                await got.reject(requeue=True)
                return None
            return got

        m = await wait_for(arrived, timeout=20, what="the replayed message")
        assert m is not None
        await m.ack()
    assert m.body == body and m.message_id == mid and m.type == type_
    assert m.content_type == "application/octet-stream"
    assert (m.headers or {})["x-kept"] == "yes"
    assert (m.headers or {})["sagabus-replayed-from"] == str(row.id)


# -- replaying is refused past the retention windows (review finding 4) ------------------------


async def test_replay_leaves_dead_letters_older_than_the_retention_windows_unless_forced(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    """A dead letter older than the shortest window that keeps ids and tombstones could re-apply
    an effect nothing would undo (an authorization for a saga compensated long ago): `dlq
    replay` leaves it, says so, and replays it only with --force."""
    await start_services("process-manager", dead_letters=True)
    marker = uuid.uuid4().hex[:8]
    await _publish_unknown_starts(ops_settings, f"x.Old{marker}.v1", 2)

    async def stored() -> list[dict[str, Any]] | None:
        out = _dlq_cli(ops_settings, "list", "--error", marker, "--json")
        rows = json.loads(out.stdout) if out.returncode == 0 else []
        return rows if len(rows) == 2 else None

    old, young = await wait_for(stored, timeout=60, what="two dead letters stored")
    window = deadletters.replay_window(ops_settings)
    assert window is not None
    async with ops_engine.begin() as conn:
        await conn.execute(
            text("UPDATE dead_letters.dead_letters SET failed_at = :at WHERE id = :i"),
            {"at": datetime.now(UTC) - window - timedelta(days=1), "i": uuid.UUID(old["id"])},
        )

    out = _dlq_cli(ops_settings, "replay", "--error", marker, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [r["id"] for r in result["dead_letters"]] == [young["id"]]
    assert result["too_old"] == 1
    assert "--force" in out.stderr and out.stderr.count("\n") == 1

    forced = _dlq_cli(ops_settings, "replay", "--error", marker, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert [r["id"] for r in json.loads(forced.stdout)["dead_letters"]] == [old["id"]]
