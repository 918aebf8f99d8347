"""`sagabus erase`: real sagas run, then a customer's payment token, address and customer id are
redacted everywhere the database holds them (every text, JSON and bytea column of every schema is
searched), while amounts, the ledger and running sagas are left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters
from messaging.db import create_schema
from messaging.settings import Settings
from process_manager import bootstrap, ops, store
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.common import LineItem, ShippingAddress
from tests.operations.conftest import Start
from tests.support import env_for, wait_for, wait_terminal

pytestmark = pytest.mark.integration


def _erase(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", "erase", *args],
        env=env_for(s.amqp_url, s.database_url, os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _occurrences(engine: AsyncEngine, needle: str) -> dict[str, int]:
    """Rows per ``schema.table.column`` whose text, JSON or bytes contain ``needle``."""
    found: dict[str, int] = {}
    async with engine.connect() as conn:
        columns = (
            await conn.execute(
                text(
                    "SELECT table_schema, table_name, column_name, data_type"
                    " FROM information_schema.columns c JOIN information_schema.tables t"
                    " USING (table_schema, table_name)"
                    " WHERE t.table_type = 'BASE TABLE'"
                    " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
                    " AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea')"
                )
            )
        ).all()
        assert len(columns) > 20, columns
        for schema, table, column, kind in columns:
            value = f'"{column}"' if kind == "bytea" else f"convert_to(\"{column}\"::text, 'UTF8')"
            n = (
                await conn.execute(
                    text(
                        f'SELECT count(*) FROM "{schema}"."{table}"'
                        f" WHERE position(convert_to(:n, 'UTF8') in {value}) > 0"
                    ),
                    {"n": needle},
                )
            ).scalar_one()
            if n:
                found[f"{schema}.{table}.{column}"] = int(n)
    return found


async def _all_sent(engine: AsyncEngine, saga_ids: list[uuid.UUID]) -> bool:
    async with engine.connect() as conn:
        for d in bootstrap.definitions(Settings()):
            unsent = (
                await conn.execute(
                    text(
                        f'SELECT count(*) FROM "{d.schema}".outbox'
                        " WHERE saga_id = ANY(:s) AND sent_at IS NULL"
                    ),
                    {"s": saga_ids},
                )
            ).scalar_one()
            if unsent:
                return False
    return True


async def _money(engine: AsyncEngine, orders: list[str]) -> dict[str, Any]:
    async with engine.connect() as conn:
        ledger = (
            await conn.execute(
                text(
                    "SELECT order_id, kind, amount_minor FROM payment.ledger"
                    " WHERE order_id = ANY(:o) ORDER BY 1, 2"
                ),
                {"o": orders},
            )
        ).all()
        payments = (
            await conn.execute(
                text(
                    "SELECT order_id, amount_minor, status FROM payment.payments"
                    " WHERE order_id = ANY(:o) ORDER BY 1"
                ),
                {"o": orders},
            )
        ).all()
        sagas = (
            await conn.execute(
                text(
                    "SELECT order_id, status, state->'start'->'items' FROM process_manager.sagas"
                    " WHERE order_id = ANY(:o) ORDER BY 1"
                ),
                {"o": orders},
            )
        ).all()
    return {"ledger": ledger, "payments": payments, "sagas": sagas}


async def test_erase_a_customer_everywhere_but_leave_amounts_and_running_sagas(
    start_services: Start, ops_settings: Settings, ops_engine: AsyncEngine
) -> None:
    from participants.inventory import service as inventory

    uid = uuid.uuid4().hex[:8]
    customer, token = f"cus_erase_{uid}", f"tok_erase_{uid}"
    street, city, postal = f"{uid} Erasure Street", f"Erasecity{uid}", f"E{uid}"
    sku, gone = f"SKU-ERASE-{uid}", f"SKU-GONE-{uid}"
    async with ops_engine.begin() as conn:
        await inventory.seed(conn, {sku: 10, gone: 0})
    await start_services(
        "process-manager",
        "order",
        "risk",
        "payment",
        "inventory",
        "shipping",
        "notification",
        "analytics",
        settings=ops_settings.model_copy(update={"step_timeout_s": 30.0}),
    )

    address = ShippingAddress(line1=street, city=city, postal_code=postal, country="NL")

    def start(
        order: str, who: str, card: str, item: str, where: ShippingAddress = address
    ) -> StartCheckout:
        return StartCheckout(
            order_id=order,
            customer_id=who,
            currency="EUR",
            items=(LineItem(sku=item, quantity=1, unit_price_minor=1234),),
            payment_token=card,
            shipping_address=where,
        )

    mine = [
        start(f"erase-{uid}-a", customer, token, sku),
        start(f"erase-{uid}-b", customer, token, sku),
        start(f"erase-{uid}-c", customer, token, gone),  # out of stock: compensated
    ]
    elsewhere = ShippingAddress(
        line1="2 Other Street", city="Utrecht", postal_code="3511AB", country="NL"
    )
    other = start(f"keep-{uid}", f"cus_keep_{uid}", f"tok_keep_{uid}", sku, elsewhere)
    await ops.publish_starts(ops_settings.amqp_url, [ops.start_message(c) for c in [*mine, other]])
    outcomes = {c.order_id: (await wait_terminal(ops_engine, c.order_id))["state"] for c in mine}
    assert outcomes == {
        f"erase-{uid}-a": "COMPLETED",
        f"erase-{uid}-b": "COMPLETED",
        f"erase-{uid}-c": "COMPENSATED",
    }
    await wait_terminal(ops_engine, other.order_id)
    sagas = [saga_id_for_order(c.order_id) for c in [*mine, other]]
    await wait_for(lambda: _all_sent(ops_engine, sagas), what="every outbox row published")

    async def notified() -> bool:
        async with ops_engine.connect() as conn:
            n = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM notification.notifications WHERE order_id = ANY(:o)"
                    ),
                    {"o": [c.order_id for c in mine]},
                )
            ).scalar_one()
        return int(n) == 3

    await wait_for(notified, what="the customer notified of every order")

    # a dead letter of one of the orders, and a saga of the customer that is still running
    await create_schema(ops_engine, deadletters.SCHEMA, deadletters.metadata)
    live = start(f"erase-{uid}-live", customer, f"tok_live_{uid}", sku)
    async with ops_engine.begin() as conn:
        await conn.execute(
            deadletters.dead_letters.insert().values(
                id=uuid.uuid4(),
                message_id=str(uuid.uuid4()),
                message_type="payment.AuthorizePayment.v1",
                saga_id=str(sagas[0]),
                queue="sagabus.payment",
                error_class="TransientError",
                error_message=f"card {token} timed out",
                failure_kind="retries_exhausted",
                fingerprint="erase",
                retry_count=3,
                headers={"sagabus-saga-id": str(sagas[0])},
                properties={},
                body=json.dumps(
                    {
                        "order_id": mine[0].order_id,
                        "amount_minor": 1234,
                        "currency": "EUR",
                        "payment_token": token,
                    }
                ).encode(),
                failed_at=datetime.now(UTC),
                status="open",
            )
        )
        await conn.execute(
            text(
                "INSERT INTO process_manager.sagas (saga_id, saga_type, business_key, order_id,"
                " status, phase, seq, version, definition_version, state, correlation_id,"
                " started_at, updated_at) VALUES (:s, 'checkout', :o, :o, 'PENDING_PAYMENT',"
                " 'RUNNING', 2, 2, 'checkout.v2', CAST(:st AS jsonb), :s, now(), now())"
            ),
            {
                "s": saga_id_for_order(live.order_id),
                "o": live.order_id,
                "st": json.dumps({"start": live.model_dump(mode="json")}),
            },
        )
    orders = [c.order_id for c in mine]
    money = await _money(ops_engine, orders)
    assert await _occurrences(ops_engine, token)  # stored in several places before

    # usage errors and nothing to erase
    neither, both = _erase(ops_settings), _erase(ops_settings, "--customer", "x", "--order", "y")
    assert neither.returncode == 2 and both.returncode == 2
    assert neither.stderr.count("\n") == 1 and "--customer" in neither.stderr
    nobody = _erase(ops_settings, "--customer", f"cus_nobody_{uid}")
    assert nobody.returncode == 1 and nobody.stderr.count("\n") == 1, nobody.stderr
    assert "nothing stored" in nobody.stderr

    # a dry run reports and changes nothing
    dry = _erase(ops_settings, "--customer", customer, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["touched"]["process_manager.sagas"] == 3
    assert await _occurrences(ops_engine, token)

    done = _erase(ops_settings, "--customer", customer, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["orders"]) == sorted(orders)
    assert report["skipped"] == [
        {"order_id": live.order_id, "status": "PENDING_PAYMENT", "why": "saga still running"}
    ]
    touched = report["touched"]
    assert touched["process_manager.sagas"] == 3
    assert touched["orders.orders"] == 3
    assert touched["notification.notifications"] == 3
    assert touched["payment.payments"] >= 2
    assert touched["dead_letters.dead_letters"] == 1
    assert touched["process_manager.outbox"] >= 3  # the commands that carried the token
    assert touched["orders.outbox"] >= 3  # the facts that carried the customer id

    for secret in (token, street, city, postal, customer):
        assert await _occurrences(ops_engine, secret) == {
            **(
                {"process_manager.sagas.state": 1}  # the running saga keeps what it needs
                if secret != token
                else {}
            )
        }, secret
    assert await _occurrences(ops_engine, f"tok_live_{uid}") == {"process_manager.sagas.state": 1}
    assert await _occurrences(ops_engine, f"tok_keep_{uid}")  # another customer: untouched
    assert await _money(ops_engine, orders) == money

    # the redacted sagas still load, as the process manager would load them
    async with ops_engine.connect() as conn:
        loaded = await store.load(conn, sagas[0])
    assert loaded is not None and isinstance(loaded.state.start, StartCheckout)
    assert loaded.state.start.payment_token == "redacted"

    # again: the finished orders are done; only the running one is left, and says so
    again = _erase(ops_settings, "--customer", customer)
    assert again.returncode == 1
    assert f"skipped order {live.order_id}" in again.stdout
    once_more = _erase(ops_settings, "--order", orders[0], "--json")
    assert once_more.returncode == 0, once_more.stderr
    assert json.loads(once_more.stdout)["touched"] == {}
    text_out = _erase(ops_settings, "--order", orders[1])
    assert text_out.returncode == 0 and "redacted 0 row(s) for order" in text_out.stdout
