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
from datetime import UTC, datetime
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
from tests.support import checkout, wait_for

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
        [sys.executable, "-m", "process_manager.cli", "dlq", "show", row["id"], "--json"],
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
            "process_manager.cli",
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
        [sys.executable, "-m", "process_manager.cli", "dlq", "replay", "--group", group, "--json"],
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


async def test_purge_archives_and_the_cli_filters_and_refuses_without_yes(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    await start_services("process-manager", dead_letters=True)
    marker = uuid.uuid4().hex[:8]
    connection = await aio_pika.connect(ops_settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange("sagabus.commands")
        for _ in range(2):
            await ex.publish(
                aio_pika.Message(b"{}", message_id=str(uuid.uuid4()), type=f"x.Unknown{marker}.v1"),
                routing_key="checkout.start",
            )
    env = _env(ops_settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "process_manager.cli", "dlq", *args],
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
        [sys.executable, "-m", "process_manager.cli", "dlq", *args],
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
