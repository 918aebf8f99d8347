"""Business invariants over the database at the end of a chaos run, one function each.

Each takes the engine and an order-id prefix (a run's sagas, or a test's fabricated rows) and
returns its violations as readable lines (empty: it holds), so ``test_chaos.py`` lists them with
the others and ``test_invariants.py`` can feed each one a hand-made violation and see it reported.

An order has up to two sagas: its checkout (``saga_type`` ``checkout``) and, once it completed,
its return (``returns``). The invariants join them by order id and saga type.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

CHECKOUT = "checkout"
RETURNS = "returns"
#: payment.ledger kinds that give money back or release it (participants/payment/service.py)
MONEY_BACK = ("refund", "void", "credit_note")
#: payment.ledger kinds that give captured money back
REFUNDS = ("refund", "credit_note")
#: what a settled checkout's order must show (orders.orders.status) when it has no return that
#: ended RETURNED
ORDER_STATUS_OF = {
    "COMPLETED": "COMPLETED",
    "COMPENSATED": "CANCELLED",
    "BACKORDERED": "BACKORDERED",
}
#: what a completed checkout's order must show after its return: RETURNED, or COMPLETED again
#: when the return was compensated (a failed pickup)
RETURNED_ORDER_STATUS_OF = {"RETURNED": "RETURNED", "COMPENSATED": "COMPLETED"}
#: the one notification a settled checkout's customer gets (participants/notification/service.py)
TEMPLATE_OF = {
    "COMPLETED": "order_confirmed",
    "COMPENSATED": "order_cancelled",
    "BACKORDERED": "order_backordered",
}
#: and the one more a RETURNED return's customer gets
RETURNED_TEMPLATE = "order_returned"
NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"
#: the history note of a step re-sent after its timeout (process_manager/engine/core.py)
RESENT = "{step} timed out: re-sent as attempt %"
#: the history event of an operator's ``sagabus compensate`` (the one way money goes back
#: without a return)
OPERATOR_COMPENSATE = "operator_compensate"
#: what the dead letter of a return of an order that is not completed says
NOT_COMPLETED = "not completed"


async def _fetch(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


@dataclass(frozen=True)
class Sagas:
    """An order's sagas' statuses (None: it has none of that type)."""

    checkout: str | None = None
    returns: str | None = None

    def __str__(self) -> str:
        return f"saga {self.checkout}" + (f", return {self.returns}" if self.returns else "")


async def sagas_by_order(engine: AsyncEngine, prefix: str) -> dict[str, Sagas]:
    """order id -> the status of its checkout and of its return."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for r in await _fetch(
        engine,
        "SELECT order_id, saga_type, status FROM process_manager.sagas "
        "WHERE starts_with(order_id, :p)",
        p=prefix,
    ):
        found[r.order_id][r.saga_type] = r.status
    return {o: Sagas(by_type.get(CHECKOUT), by_type.get(RETURNS)) for o, by_type in found.items()}


async def _operator_compensated(engine: AsyncEngine, prefix: str) -> set[str]:
    """Orders one of whose sagas an operator sent back (``sagabus compensate``)."""
    return {
        r.order_id
        for r in await _fetch(
            engine,
            "SELECT DISTINCT s.order_id FROM process_manager.history h "
            "JOIN process_manager.sagas s USING (saga_id) "
            "WHERE starts_with(s.order_id, :p) AND h.event = :e",
            p=prefix,
            e=OPERATOR_COMPENSATE,
        )
    }


async def money_back_on_completed(engine: AsyncEngine, prefix: str) -> list[str]:
    """No refund, void or credit note in the ledger of an order whose checkout is ``COMPLETED``
    and that was not returned (its return, if any, did not end ``RETURNED``): past the pivot a
    saga only moves forward, and a completed order keeps its money. A returned order may be
    refunded (``returns_refunded_wrong_amount`` checks how much), never voided."""
    sagas = await sagas_by_order(engine, prefix)
    rows = await _fetch(
        engine,
        "SELECT order_id, kind, amount_minor FROM payment.ledger "
        "WHERE starts_with(order_id, :p) AND kind = ANY(:k) ORDER BY order_id, kind",
        p=prefix,
        k=list(MONEY_BACK),
    )
    wrong = []
    for r in rows:
        s = sagas.get(r.order_id, Sagas())
        if s.checkout != "COMPLETED":
            continue
        if s.returns == "RETURNED" and r.kind in REFUNDS:
            continue
        wrong.append(
            f"{r.order_id}: COMPLETED, yet a {r.kind} of {r.amount_minor}"
            + (f" (return {s.returns})" if s.returns else "")
        )
    return wrong


async def refunds_without_a_return(engine: AsyncEngine, prefix: str) -> list[str]:
    """Money given back after a capture (a refund or a credit note) only where the order's
    return ended ``RETURNED``, or where an operator compensated one of its sagas."""
    sagas = await sagas_by_order(engine, prefix)
    operated = await _operator_compensated(engine, prefix)
    rows = await _fetch(
        engine,
        "SELECT order_id, kind, amount_minor FROM payment.ledger "
        "WHERE starts_with(order_id, :p) AND kind = ANY(:k) ORDER BY order_id, kind",
        p=prefix,
        k=list(REFUNDS),
    )
    return [
        f"{r.order_id}: a {r.kind} of {r.amount_minor}, yet {sagas.get(r.order_id, Sagas())}"
        for r in rows
        if sagas.get(r.order_id, Sagas()).returns != "RETURNED" and r.order_id not in operated
    ]


async def returns_refunded_wrong_amount(engine: AsyncEngine, prefix: str) -> list[str]:
    """A ``RETURNED`` return refunded exactly what its order's checkout captured, in one refund,
    and nothing else was given back (no credit note besides it)."""
    rows = await _fetch(
        engine,
        "SELECT s.order_id, "
        "(SELECT array_agg(amount_minor) FROM payment.ledger l WHERE l.order_id = s.order_id "
        " AND l.kind = 'capture') AS captured, "
        "(SELECT array_agg(amount_minor) FROM payment.ledger l WHERE l.order_id = s.order_id "
        " AND l.kind = 'refund') AS refunded, "
        "(SELECT array_agg(amount_minor) FROM payment.ledger l WHERE l.order_id = s.order_id "
        " AND l.kind = 'credit_note') AS credited "
        "FROM process_manager.sagas s WHERE starts_with(s.order_id, :p) "
        "AND s.saga_type = :t AND s.status = 'RETURNED' ORDER BY 1",
        p=prefix,
        t=RETURNS,
    )
    return [
        f"{r.order_id}: RETURNED, captured {r.captured}, refunded {r.refunded}"
        + (f", credited {r.credited}" if r.credited else "")
        for r in rows
        if not r.captured or len(r.captured) != 1 or r.refunded != r.captured or r.credited
    ]


@dataclass(frozen=True)
class OrderAgreement:
    #: settled sagas whose order shows something else, and orders without a saga
    disagree: list[str]
    #: FAILED_NEEDS_MANUAL sagas with their order's status: any status is allowed while a human
    #: decides, so these are reported, not counted as violations
    manual: list[str]


def expected_order_status(s: Sagas) -> str | None:
    """What the order must show for its sagas (None: nothing can: they disagree already)."""
    if s.returns is not None:
        if s.checkout != "COMPLETED":
            return None  # a return of an order that did not complete
        return RETURNED_ORDER_STATUS_OF.get(s.returns)
    return ORDER_STATUS_OF.get(s.checkout or "")


async def order_status_agreement(engine: AsyncEngine, prefix: str) -> OrderAgreement:
    """The order's status agrees with its sagas': ``COMPLETED`` with ``COMPLETED``,
    ``COMPENSATED`` with ``CANCELLED``, ``BACKORDERED`` with ``BACKORDERED``; after a return
    ``RETURNED`` with ``RETURNED`` and, for a return compensated (a failed pickup),
    ``COMPLETED`` again. A saga still running is a disagreement too (a run ends with every saga
    terminal), and so is a return of an order whose checkout did not complete."""
    sagas = await sagas_by_order(engine, prefix)
    orders = {
        r.order_id: r.status
        for r in await _fetch(
            engine,
            "SELECT order_id, status FROM orders.orders WHERE starts_with(order_id, :p)",
            p=prefix,
        )
    }
    disagree: list[str] = []
    manual: list[str] = []
    for o in sorted(set(sagas) | set(orders)):
        s, status = sagas.get(o, Sagas()), orders.get(o)
        if NEEDS_MANUAL in (s.checkout, s.returns):
            manual.append(f"{o}: {s}, order {status}")
        elif expected_order_status(s) != status or status is None:
            disagree.append(f"{o}: {s}, order {status}")
    return OrderAgreement(disagree, manual)


def expected_templates(s: Sagas) -> list[list[str]]:
    """The notifications (sorted) an order's customer may have been sent, by its sagas."""
    if s.checkout == NEEDS_MANUAL:
        return [[], *([t] for t in TEMPLATE_OF.values())]
    told = TEMPLATE_OF.get(s.checkout or "")
    if told is None:
        return []
    if s.returns == "RETURNED":
        return [sorted([told, RETURNED_TEMPLATE])]
    if s.returns == NEEDS_MANUAL:
        return [[told], sorted([told, RETURNED_TEMPLATE])]
    return [[told]]


async def customers_not_told_one_right_outcome(engine: AsyncEngine, prefix: str) -> list[str]:
    """The customer is told exactly one outcome of the checkout, the right one: one
    ``order_confirmed`` for a ``COMPLETED`` checkout, one ``order_cancelled`` for a
    ``COMPENSATED`` one, one ``order_backordered`` for a ``BACKORDERED`` one; and exactly one
    ``order_returned`` besides when its return ended ``RETURNED`` (none for a compensated one).
    At most one of each for a saga a human has to decide, and nothing about an order without a
    saga."""
    sagas = await sagas_by_order(engine, prefix)
    told: dict[str, list[str]] = defaultdict(list)
    for r in await _fetch(
        engine,
        "SELECT order_id, template FROM notification.notifications "
        "WHERE starts_with(order_id, :p) ORDER BY order_id, template",
        p=prefix,
    ):
        told[r.order_id].append(r.template)
    return [
        f"{o}: {sagas.get(o, Sagas())}, customer told {told[o]}"
        for o in sorted(set(sagas) | set(told))
        if told[o] not in expected_templates(sagas.get(o, Sagas()))
    ]


async def stock_not_restocked_once(
    engine: AsyncEngine,
    prefix: str,
    initial: Mapping[str, int],
    items: Mapping[str, Iterable[tuple[str, int]]],
) -> list[str]:
    """Every SKU's stock is its initial level less the units of the orders that completed and
    were not returned: a return puts its units back exactly once (twice would show too many, not
    at all too few); and a ``RETURNED`` return's reservation is ``RESTOCKED``. ``items``: each
    order's (sku, quantity) lines."""
    sagas = await sagas_by_order(engine, prefix)
    kept: dict[str, int] = defaultdict(int)
    returned: dict[str, int] = defaultdict(int)
    for o, lines in items.items():
        s = sagas.get(o, Sagas())
        if s.checkout != "COMPLETED":
            continue
        for sku, qty in lines:
            if s.returns == "RETURNED":
                returned[sku] += qty
            else:
                kept[sku] += qty
    stock = {
        r.sku: r.available
        for r in await _fetch(
            engine,
            "SELECT sku, available FROM inventory.stock WHERE sku = ANY(:s)",
            s=list(initial),
        )
    }
    wrong = [
        f"{sku}: {stock.get(sku)} available, expected {level} - {kept[sku]} sold"
        f" ({returned[sku]} more sold and returned)"
        for sku, level in sorted(initial.items())
        if stock.get(sku) != level - kept[sku]
    ]
    reservations = {
        r.order_id: r.status
        for r in await _fetch(
            engine,
            "SELECT order_id, status FROM inventory.reservations WHERE starts_with(order_id, :p)",
            p=prefix,
        )
    }
    wrong += [
        f"{o}: RETURNED, reservation {reservations.get(o)}"
        for o, s in sorted(sagas.items())
        if s.returns == "RETURNED" and reservations.get(o) != "RESTOCKED"
    ]
    return wrong


async def refused_returns_not_refused(
    engine: AsyncEngine, prefix: str, refused: Mapping[str, str]
) -> list[str]:
    """A return of an order that did not complete starts no saga, and its start is
    dead-lettered with a reason saying the order is not completed. ``refused``: order id -> the
    message id of its ``StartReturn``."""
    sagas = await sagas_by_order(engine, prefix)
    reasons: dict[str, list[str]] = defaultdict(list)
    for r in await _fetch(
        engine,
        "SELECT message_id, error_message FROM dead_letters.dead_letters "
        "WHERE message_id = ANY(:ids)",
        ids=list(refused.values()),
    ):
        reasons[r.message_id].append(r.error_message)
    wrong = []
    for o, mid in sorted(refused.items()):
        s = sagas.get(o, Sagas())
        if s.returns is not None:
            wrong.append(f"{o}: refused expected, yet a returns saga ({s})")
        if not any(NOT_COMPLETED in reason for reason in reasons[mid]):
            wrong.append(f"{o}: no dead letter of {mid} saying {NOT_COMPLETED!r}: {reasons[mid]}")
    return wrong


async def refused_legitimate(
    engine: AsyncEngine, expected: Collection[str], failure_kind: str
) -> list[str]:
    """Dead letters of ``failure_kind`` (``security``: refused for the way it came, route or
    sender; ``permanent``: for what it says) other than the ``expected`` message ids (the
    poison, the returns meant to be refused): legitimate messages the services refused."""
    rows = await _fetch(
        engine,
        "SELECT message_id, queue, error_message FROM dead_letters.dead_letters "
        "WHERE failure_kind = :k ORDER BY collected_at",
        k=failure_kind,
    )
    return [
        f"{r.queue}: {r.message_id}: {r.error_message[:200]}"
        for r in rows
        if r.message_id not in expected
    ]


async def unsent_outbox_rows(engine: AsyncEngine, schemas: Sequence[str]) -> dict[str, int]:
    """Outbox rows never marked sent, per service schema with any (the risk service's too)."""
    counts = {}
    for schema in schemas:
        n = (
            await _fetch(engine, f"SELECT count(*) AS n FROM {schema}.outbox WHERE sent_at IS NULL")
        )[0].n
        if n:
            counts[schema] = int(n)
    return counts


async def resent_during(
    engine: AsyncEngine,
    prefix: str,
    windows: Sequence[tuple[datetime, datetime]],
    steps: Sequence[str] = ("completion",),
) -> dict[str, str]:
    """Sagas that had one of ``steps`` re-sent after its timeout (history note "<step> timed
    out: re-sent as attempt N") within one of ``windows`` (stalls), with the status each ended
    in."""
    found: dict[str, str] = {}
    for start, end in windows:
        for r in await _fetch(
            engine,
            "SELECT DISTINCT s.order_id, s.status FROM process_manager.history h "
            "JOIN process_manager.sagas s ON s.saga_id = h.saga_id "
            "WHERE starts_with(s.order_id, :p) AND h.note LIKE ANY(:notes) "
            "AND h.at BETWEEN :start AND :end",
            p=prefix,
            notes=[RESENT.format(step=step) for step in steps],
            start=start,
            end=end,
        ):
            found[r.order_id] = r.status
    return found


async def stalled_completions_not_clean(
    engine: AsyncEngine, prefix: str, windows: Sequence[tuple[datetime, datetime]]
) -> list[str]:
    """The proof the order stall did what it is for: at least one saga had its completion
    re-sent while the order service was stopped, and every such saga ended ``COMPLETED`` with
    no money given back (unless the order was returned afterwards: then its refund)."""
    resent = await resent_during(engine, prefix, windows, ("completion",))
    if not resent:
        return [f"no completion re-sent during the order service's stalls {list(windows)}"]
    sagas = await sagas_by_order(engine, prefix)
    money_back: dict[str, list[str]] = defaultdict(list)
    for r in await _fetch(
        engine,
        "SELECT order_id, kind FROM payment.ledger WHERE order_id = ANY(:o) AND kind = ANY(:k)",
        o=list(resent),
        k=list(MONEY_BACK),
    ):
        returned = sagas.get(r.order_id, Sagas()).returns == "RETURNED"
        if not (returned and r.kind in REFUNDS):
            money_back[r.order_id].append(r.kind)
    return [
        f"{o}: completion re-sent during an order stall, ended {st}"
        + (f" with {money_back[o]}" if money_back[o] else "")
        for o, st in sorted(resent.items())
        if st != "COMPLETED" or money_back[o]
    ]
