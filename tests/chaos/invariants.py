"""Business invariants over the database at the end of a chaos run, one function each.

Each takes the engine and an order-id prefix (a run's sagas, or a test's fabricated rows) and
returns its violations as readable lines (empty: it holds), so ``test_chaos.py`` lists them with
the others and ``test_invariants.py`` can feed each one a hand-made violation and see it reported.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

#: payment.ledger kinds that give money back or release it (participants/payment/service.py)
MONEY_BACK = ("refund", "void")
#: what a settled saga's order must show (orders.orders.status)
ORDER_STATUS_OF = {"COMPLETED": "COMPLETED", "COMPENSATED": "CANCELLED"}
#: the one notification a settled saga's customer gets (participants/notification/service.py)
TEMPLATE_OF = {"COMPLETED": "order_confirmed", "COMPENSATED": "order_cancelled"}
NEEDS_MANUAL = "FAILED_NEEDS_MANUAL"
#: the history note of a step re-sent after its timeout (process_manager/saga.py)
RESENT = "{step} timed out: re-sent as attempt %"


async def _fetch(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def money_back_on_completed(engine: AsyncEngine, prefix: str) -> list[str]:
    """No refund or void in the ledger of an order whose saga is ``COMPLETED``: past the pivot a
    saga only moves forward, and a completed order keeps its money."""
    rows = await _fetch(
        engine,
        "SELECT l.order_id, l.kind, l.amount_minor FROM payment.ledger l "
        "JOIN process_manager.sagas s ON s.order_id = l.order_id "
        "WHERE starts_with(l.order_id, :p) AND s.status = 'COMPLETED' AND l.kind = ANY(:k) "
        "ORDER BY l.order_id, l.kind",
        p=prefix,
        k=list(MONEY_BACK),
    )
    return [f"{r.order_id}: COMPLETED, yet a {r.kind} of {r.amount_minor}" for r in rows]


@dataclass(frozen=True)
class OrderAgreement:
    #: settled sagas whose order shows something else, and orders without a saga
    disagree: list[str]
    #: FAILED_NEEDS_MANUAL sagas with their order's status: any status is allowed while a human
    #: decides, so these are reported, not counted as violations
    manual: list[str]


async def order_status_agreement(engine: AsyncEngine, prefix: str) -> OrderAgreement:
    """The order's status agrees with its saga's: ``COMPLETED`` with ``COMPLETED``,
    ``COMPENSATED`` with ``CANCELLED``. A saga still running is a disagreement too (a run ends
    with every saga terminal)."""
    rows = await _fetch(
        engine,
        "SELECT coalesce(s.order_id, o.order_id) AS order_id, s.status AS saga, "
        "o.status AS order_status FROM "
        "(SELECT order_id, status FROM process_manager.sagas WHERE starts_with(order_id, :p)) s "
        "FULL JOIN "
        "(SELECT order_id, status FROM orders.orders WHERE starts_with(order_id, :p)) o "
        "ON o.order_id = s.order_id ORDER BY 1",
        p=prefix,
    )
    disagree: list[str] = []
    manual: list[str] = []
    for r in rows:
        if r.saga == NEEDS_MANUAL:
            manual.append(f"{r.order_id}: saga {NEEDS_MANUAL}, order {r.order_status}")
        elif r.saga is None or ORDER_STATUS_OF.get(r.saga) != r.order_status:
            disagree.append(f"{r.order_id}: saga {r.saga}, order {r.order_status}")
    return OrderAgreement(disagree, manual)


async def customers_not_told_one_right_outcome(engine: AsyncEngine, prefix: str) -> list[str]:
    """The customer is told exactly one outcome, the right one: one ``order_confirmed`` for a
    ``COMPLETED`` saga, one ``order_cancelled`` for a ``COMPENSATED`` one; at most one for a saga
    a human has to decide, and nothing about an order without a saga."""
    rows = await _fetch(
        engine,
        "SELECT coalesce(s.order_id, n.order_id) AS order_id, s.status AS saga, "
        "coalesce(n.templates, '{}') AS templates FROM "
        "(SELECT order_id, status FROM process_manager.sagas WHERE starts_with(order_id, :p)) s "
        "FULL JOIN "
        "(SELECT order_id, array_agg(template ORDER BY template) AS templates "
        " FROM notification.notifications WHERE starts_with(order_id, :p) GROUP BY order_id) n "
        "ON n.order_id = s.order_id ORDER BY 1",
        p=prefix,
    )
    wrong: list[str] = []
    for r in rows:
        told = list(r.templates)
        if r.saga == NEEDS_MANUAL:
            ok = len(told) <= 1
        else:
            ok = r.saga in TEMPLATE_OF and told == [TEMPLATE_OF[r.saga]]
        if not ok:
            wrong.append(f"{r.order_id}: saga {r.saga}, customer told {told}")
    return wrong


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
    no money given back."""
    resent = await resent_during(engine, prefix, windows, ("completion",))
    if not resent:
        return [f"no completion re-sent during the order service's stalls {list(windows)}"]
    money_back: dict[str, list[str]] = defaultdict(list)
    for r in await _fetch(
        engine,
        "SELECT order_id, kind FROM payment.ledger WHERE order_id = ANY(:o) AND kind = ANY(:k)",
        o=list(resent),
        k=list(MONEY_BACK),
    ):
        money_back[r.order_id].append(r.kind)
    return [
        f"{o}: completion re-sent during an order stall, ended {st}"
        + (f" with {money_back[o]}" if money_back[o] else "")
        for o, st in sorted(resent.items())
        if st != "COMPLETED" or money_back[o]
    ]
