"""``sagabus erase``: redact one customer's (or one order's) personal data wherever it is stored.

Personal data here is the payment token, the shipping address and the customer id. They are
stored in:

* ``process_manager.sagas.state``: the StartCheckout (all three); the redacted values are
  markers the model still accepts (``redacted``, country ``XX``), so a finished saga still loads;
* ``orders.orders.customer_id``, ``payment.payments.payment_token``,
  ``notification.notifications.customer_token``, ``shipping.shipment_addresses.address`` (where
  a returns pickup would collect from);
* every service's ``outbox`` body (the commands and facts it sent): only *sent* rows are
  rewritten, an unsent one is about to be published as it is;
* ``dead_letters.dead_letters``: bodies, headers and error texts;
* free text that could quote them (history notes, failure reasons, manual cases): every
  occurrence of the order's stored values is replaced.

A saga that is still running needs its data (the token to capture, the address to ship to), so
its order is skipped and reported; run the erase again once it has finished. Everything happens
in one transaction (``--dry-run`` rolls it back), and a second run changes nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from messaging.service import ServiceDefinition
from process_manager.engine import saga_id_for
from process_manager.store import LIVE_PHASES, definition_of

REDACTED = "redacted"
REDACTED_COUNTRY = "XX"
#: keys whose string values are replaced by ``REDACTED`` in stored JSON
_ID_KEYS = frozenset({"payment_token", "customer_id", "customer_token"})
_ADDRESS_KEYS = frozenset({"shipping_address", "address"})
_DEAD_LETTERS = "dead_letters.dead_letters"


@dataclass
class Erasure:
    """What an erase found and changed."""

    customer: str | None
    order: str | None
    dry_run: bool
    #: orders whose personal data was redacted (or already was)
    orders: list[str] = field(default_factory=list)
    #: orders left alone, with why (a saga still running)
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: rows changed per ``schema.table``
    touched: dict[str, int] = field(default_factory=dict)
    #: outbox rows of these orders not published yet, left as they are
    unsent_outbox: int = 0
    found: bool = False

    def count(self, table: str, n: int = 1) -> None:
        self.touched[table] = self.touched.get(table, 0) + n

    def as_json(self) -> dict[str, Any]:
        return {
            "customer": self.customer,
            "order": self.order,
            "dry_run": self.dry_run,
            "orders": self.orders,
            "skipped": self.skipped,
            "touched": dict(sorted(self.touched.items())),
            "rows": sum(self.touched.values()),
            "unsent_outbox_rows_left": self.unsent_outbox,
        }


class _Scrubber:
    """Redacts JSON by key, and free text by the personal values known for the order."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def learn(self, *values: Any) -> None:
        for v in values:
            # short values (a country code) are too common to replace in free text
            if isinstance(v, str) and len(v) >= 3 and v not in (REDACTED, "unknown"):
                self.values.add(v)

    def learn_checkout(self, checkout: Any) -> None:
        if not isinstance(checkout, dict):
            return
        address = checkout.get("shipping_address")
        self.learn(checkout.get("payment_token"), checkout.get("customer_id"))
        if isinstance(address, dict):
            self.learn(address.get("line1"), address.get("city"), address.get("postal_code"))

    def text(self, value: str) -> str:
        for v in sorted(self.values, key=len, reverse=True):
            value = value.replace(v, REDACTED)
        return value

    def json(self, value: Any, key: str | None = None) -> Any:
        if key in _ID_KEYS and isinstance(value, str):
            return REDACTED
        if key in _ADDRESS_KEYS and isinstance(value, dict):
            return {
                k: (REDACTED_COUNTRY if k == "country" else REDACTED if v is not None else None)
                for k, v in value.items()
            }
        if isinstance(value, dict):
            return {k: self.json(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value

    def body(self, body: bytes) -> bytes:
        try:
            parsed = json.loads(body)
        except ValueError:
            raw = body
            for v in sorted(self.values, key=len, reverse=True):
                raw = raw.replace(v.encode(), REDACTED.encode())
            return raw
        redacted = self.json(parsed)
        return body if redacted == parsed else json.dumps(redacted).encode()


async def _exists(conn: AsyncConnection, table: str) -> bool:
    return bool(
        (await conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table})).scalar()
    )


async def _order_ids(conn: AsyncConnection, customer: str) -> list[str]:
    sources = [
        ("process_manager.sagas", "coalesce(state->'start', state->'checkout')->>'customer_id'"),
        ("orders.orders", "customer_id"),
        ("notification.notifications", "customer_token"),
    ]
    found: dict[str, None] = {}
    for table, column in sources:
        if await _exists(conn, table):
            rows = await conn.execute(
                text(f"SELECT DISTINCT order_id FROM {table} WHERE {column} = :c ORDER BY 1"),
                {"c": customer},
            )
            found.update(dict.fromkeys(rows.scalars()))
    return list(found)


async def _redact_column(
    conn: AsyncConnection,
    report: Erasure,
    table: str,
    column: str,
    order_id: str,
    scrub: _Scrubber,
) -> int:
    """Replace ``column`` of the order's rows in ``table`` by ``REDACTED``; learns the old
    values first. Returns the rows the order has in ``table``."""
    if not await _exists(conn, table):
        return 0
    rows = (
        await conn.execute(
            text(f"SELECT {column} FROM {table} WHERE order_id = :o FOR UPDATE"), {"o": order_id}
        )
    ).all()
    scrub.learn(*(r[0] for r in rows))
    changed = (
        await conn.execute(
            text(
                f"UPDATE {table} SET {column} = :r WHERE order_id = :o"
                f" AND {column} IS NOT NULL AND {column} <> :r"
            ),
            {"o": order_id, "r": REDACTED},
        )
    ).rowcount
    if changed:
        report.count(table, changed)
    return len(rows)


_SHIPMENT_ADDRESSES = "shipping.shipment_addresses"


async def _redact_shipment_address(
    conn: AsyncConnection, report: Erasure, order_id: str, scrub: _Scrubber
) -> int:
    """Redact the address kept with the order's shipment (for a returns pickup); learns it
    first. Returns the rows the order has there."""
    if not await _exists(conn, _SHIPMENT_ADDRESSES):
        return 0
    rows = (
        await conn.execute(
            text(f"SELECT address FROM {_SHIPMENT_ADDRESSES} WHERE order_id = :o FOR UPDATE"),
            {"o": order_id},
        )
    ).all()
    for (address,) in rows:
        scrub.learn_checkout({"shipping_address": address})
        redacted = scrub.json(address, "address")
        if redacted != address:
            await conn.execute(
                text(
                    f"UPDATE {_SHIPMENT_ADDRESSES} SET address = CAST(:a AS jsonb)"
                    " WHERE order_id = :o"
                ),
                {"a": json.dumps(redacted), "o": order_id},
            )
            report.count(_SHIPMENT_ADDRESSES)
    return len(rows)


async def _scrub_text(
    conn: AsyncConnection,
    report: Erasure,
    table: str,
    key: str,
    column: str,
    where: str,
    params: dict[str, Any],
    scrub: _Scrubber,
) -> None:
    """Replace the known personal values in a free-text ``column``."""
    if not scrub.values or not await _exists(conn, table):
        return
    rows = (
        await conn.execute(
            text(f"SELECT {key} AS k, {column} AS v FROM {table} WHERE {where}"), params
        )
    ).all()
    for r in rows:
        if r.v is None:
            continue
        new = scrub.text(r.v)
        if new != r.v:
            await conn.execute(
                text(f"UPDATE {table} SET {column} = :v WHERE {key} = :k"), {"v": new, "k": r.k}
            )
            report.count(table)


async def _erase_outboxes(
    conn: AsyncConnection,
    report: Erasure,
    definitions: Sequence[ServiceDefinition],
    saga_id: uuid.UUID,
    scrub: _Scrubber,
) -> None:
    for d in definitions:
        table = f'"{d.outbox.schema}"."{d.outbox.name}"'
        name = d.outbox.fullname
        if not await _exists(conn, table):
            continue
        rows = (
            await conn.execute(
                text(f"SELECT id, body, headers, sent_at FROM {table} WHERE saga_id = :s"),
                {"s": saga_id},
            )
        ).all()
        for r in rows:
            if r.sent_at is None:
                report.unsent_outbox += 1
                continue
            body = scrub.body(bytes(r.body))
            headers = scrub.json(r.headers)
            if body != bytes(r.body) or headers != r.headers:
                await conn.execute(
                    text(
                        f"UPDATE {table} SET body = :b, headers = CAST(:h AS jsonb) WHERE id = :i"
                    ),
                    {"b": body, "h": json.dumps(headers), "i": r.id},
                )
                report.count(name)


async def _erase_dead_letters(
    conn: AsyncConnection,
    report: Erasure,
    *,
    saga_ids: Iterable[uuid.UUID],
    needles: Iterable[str],
    owns: Any,
    scrub: _Scrubber,
) -> None:
    """Dead letters of these sagas, or whose body names one of ``needles`` (an order id, the
    customer id) and belongs to the subject by ``owns(parsed_body)``."""
    if not await _exists(conn, _DEAD_LETTERS):
        return
    rows = (
        await conn.execute(
            text(
                f"SELECT id, saga_id, body, headers, error_message FROM {_DEAD_LETTERS}"
                " WHERE saga_id = ANY(:s) OR EXISTS (SELECT 1 FROM unnest(CAST(:n AS text[])) n"
                " WHERE position(convert_to(n, 'UTF8') in body) > 0) FOR UPDATE"
            ),
            {"s": [str(s) for s in saga_ids], "n": list(needles)},
        )
    ).all()
    wanted = {str(s) for s in saga_ids}
    for r in rows:
        body = bytes(r.body)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if r.saga_id not in wanted and not owns(parsed):
            continue
        if isinstance(parsed, dict):
            scrub.learn_checkout(parsed)
        new_body = scrub.body(body)
        new_headers = scrub.json(r.headers)
        new_error = scrub.text(r.error_message)
        if (new_body, new_headers, new_error) != (body, r.headers, r.error_message):
            await conn.execute(
                text(
                    f"UPDATE {_DEAD_LETTERS} SET body = :b, headers = CAST(:h AS jsonb),"
                    " error_message = :e WHERE id = :i"
                ),
                {"b": new_body, "h": json.dumps(new_headers), "e": new_error, "i": r.id},
            )
            report.count(_DEAD_LETTERS)


async def _erase_order(
    conn: AsyncConnection,
    report: Erasure,
    definitions: Sequence[ServiceDefinition],
    order_id: str,
) -> bool:
    """Redact one order; False if it was skipped (its saga is running) or is unknown."""
    scrub = _Scrubber()
    saga = (
        await conn.execute(
            text(
                "SELECT saga_id, status, phase, definition_version, state"
                " FROM process_manager.sagas WHERE order_id = :o ORDER BY started_at FOR UPDATE"
            ),
            {"o": order_id},
        )
        if await _exists(conn, "process_manager.sagas")
        else None
    )
    rows = saga.all() if saga is not None else []
    # every saga about the order (its checkout, its return): none may still need the data
    running = [r for r in rows if r.phase in LIVE_PHASES and r.phase != "FAILED_NEEDS_MANUAL"]
    if running:
        report.skipped.append(
            {"order_id": order_id, "status": running[0].status, "why": "saga still running"}
        )
        report.found = True
        return False
    saga_ids = [r.saga_id for r in rows] or [saga_id_for("checkout", order_id)]
    found = bool(rows)
    for row in rows:
        state = dict(row.state)
        field = "start" if "start" in state else "checkout"
        scrub.learn_checkout(state.get(field))
    for row in rows:
        state = dict(row.state)
        field = "start" if "start" in state else "checkout"
        redacted = scrub.json(state.get(field))
        # the redacted saga still loads
        definition_of(row.definition_version).start.model_validate(redacted)
        if redacted != state.get(field):
            state[field] = redacted
            await conn.execute(
                text(
                    "UPDATE process_manager.sagas SET state = CAST(:s AS jsonb) WHERE saga_id = :i"
                ),
                {"s": json.dumps(state), "i": row.saga_id},
            )
            report.count("process_manager.sagas")
    for table, column in (
        ("orders.orders", "customer_id"),
        ("payment.payments", "payment_token"),
        ("notification.notifications", "customer_token"),
    ):
        found = bool(await _redact_column(conn, report, table, column, order_id, scrub)) or found
    found = bool(await _redact_shipment_address(conn, report, order_id, scrub)) or found
    for table in ("inventory.reservations", "shipping.shipments"):
        if not found and await _exists(conn, table):
            hit = await conn.execute(
                text(f"SELECT 1 FROM {table} WHERE order_id = :o"), {"o": order_id}
            )
            found = hit.first() is not None
    if not found:
        return False
    by_saga = {"s": saga_ids}
    by_order = {"o": order_id}
    for table, key, column, where, params in (
        ("process_manager.sagas", "saga_id", "failure_reason", "saga_id = ANY(:s)", by_saga),
        ("process_manager.history", "id", "note", "saga_id = ANY(:s)", by_saga),
        ("process_manager.manual_cases", "saga_id", "reason", "saga_id = ANY(:s)", by_saga),
        ("payment.payments", "order_id", "reason", "order_id = :o", by_order),
        ("shipping.shipments", "order_id", "reason", "order_id = :o", by_order),
        ("orders.orders", "order_id", "reason", "order_id = :o", by_order),
    ):
        await _scrub_text(conn, report, table, key, column, where, params, scrub)
    for saga_id in saga_ids:
        await _erase_outboxes(conn, report, definitions, saga_id, scrub)
    await _erase_dead_letters(
        conn,
        report,
        saga_ids=saga_ids,
        needles=[order_id],
        owns=lambda body: isinstance(body, dict) and body.get("order_id") == order_id,
        scrub=scrub,
    )
    report.orders.append(order_id)
    return True


async def erase(
    engine: AsyncEngine,
    definitions: Sequence[ServiceDefinition],
    *,
    customer: str | None = None,
    order: str | None = None,
    dry_run: bool = False,
) -> Erasure:
    """Redact the personal data of ``customer`` (all their orders) or of one ``order``."""
    if (customer is None) == (order is None):
        raise ValueError("name a customer or an order, not both")
    report = Erasure(customer=customer, order=order, dry_run=dry_run)
    async with engine.connect() as conn:
        tx = await conn.begin()
        try:
            orders = [order] if order is not None else await _order_ids(conn, customer or "")
            for order_id in orders:
                if await _erase_order(conn, report, definitions, order_id):
                    report.found = True
            if customer is not None:
                # dead letters that name the customer but no saga (a start that never began)
                scrub = _Scrubber()
                scrub.learn(customer)
                before = report.touched.get(_DEAD_LETTERS, 0)
                await _erase_dead_letters(
                    conn,
                    report,
                    saga_ids=(),
                    needles=[customer],
                    owns=lambda body: (
                        isinstance(body, dict) and body.get("customer_id") == customer
                    ),
                    scrub=scrub,
                )
                report.found = report.found or report.touched.get(_DEAD_LETTERS, 0) > before
        except BaseException:
            await tx.rollback()
            raise
        if dry_run:
            await tx.rollback()
        else:
            await tx.commit()
    return report
