# mypy: disable-error-code="untyped-decorator"
"""Peer: the checkout saga on sagaz (an in-process Python saga library).

sagaz's public ``Saga`` (``from sagaz import Saga, action, compensate``) is declarative: one
class, an ``@action`` per step chained with ``depends_on`` so they run in order, and a
``@compensate`` per step. On an exception it runs the compensations of the steps that finished,
in reverse dependency order, then re-raises. It persists to the storage in ``SagaConfig``: here
``PostgreSQLSagaStorage`` (asyncpg) in a database made for the run, on the machine's PostgreSQL.

What that persistence covers (read from sagaz 1.5's ``core/decorators/_execution.py``): one
upsert of the saga row (status and context) when the saga starts and one when it ends
(COMPLETED or ROLLED_BACK); no per-step checkpoint, and no resume of a saga that was cut off,
so a crash between steps leaves an EXECUTING row and no one to finish it. Forward steps are not
retried (``max_retries`` goes only to the compensation graph, and the engine calls each
compensation once); a failed compensation is logged and swallowed. sagaz writes failures to
persist as warnings, so the run counts the rows afterwards to prove they were written.

Knobs: ``participants`` / ``SAGABUS_PEERS_PARTICIPANTS`` (``memory`` default, or ``postgres``)
and ``store`` / ``SAGABUS_PEERS_SAGAZ_STORE`` (``postgres`` default, or ``memory`` for sagaz's
InMemorySagaStorage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from benchmarks.peers._common import (
    DB_POOL_SIZE,
    Participants,
    Refused,
    drive,
    new_run_id,
    open_participants,
    participants_kind,
    scratch_database,
    self_check,
    summarize,
    workload,
)
from benchmarks.peers._definition import check_matches_sagabus

NAME = "sagaz"
WARMUP_SAGAS = 20


def _saga_class(participants: Participants) -> type:
    from sagaz import Saga, action, compensate

    async def call(command: str, ctx: dict[str, Any]) -> dict[str, Any]:
        await participants.handle(command, ctx["order"])
        return {}

    class CheckoutSaga(Saga):  # type: ignore[misc]
        saga_name = "checkout"

        def __init__(self, config: Any) -> None:
            super().__init__(config=config)
            #: compensations that failed (sagaz logs and swallows them)
            self.compensation_failures: list[str] = []

        async def _undo(self, command: str, ctx: dict[str, Any]) -> None:
            try:
                await call(command, ctx)
            except Exception as exc:
                self.compensation_failures.append(f"{command}: {exc}")
                raise

        @action("order")
        async def create_order(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("CreateOrder", ctx)

        @action("authorization", depends_on=["order"])
        async def authorize_payment(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("AuthorizePayment", ctx)

        @action("inventory", depends_on=["authorization"])
        async def reserve_inventory(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("ReserveInventory", ctx)

        @action("shipment", depends_on=["inventory"])
        async def create_shipment(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("CreateShipment", ctx)

        @action("capture", depends_on=["shipment"])
        async def capture_payment(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("CapturePayment", ctx)

        @action("completion", depends_on=["capture"])
        async def complete_order(self, ctx: dict[str, Any]) -> dict[str, Any]:
            return await call("CompleteOrder", ctx)

        @compensate("order")
        async def cancel_order(self, ctx: dict[str, Any]) -> None:
            await self._undo("CancelOrder", ctx)

        @compensate("authorization")
        async def void_authorization(self, ctx: dict[str, Any]) -> None:
            # sagabus's payment ladder: after a capture the refund settles the payment
            if ctx.get("__capture_completed"):
                return
            await self._undo("VoidAuthorization", ctx)

        @compensate("inventory")
        async def release_inventory(self, ctx: dict[str, Any]) -> None:
            await self._undo("ReleaseInventory", ctx)

        @compensate("shipment")
        async def cancel_shipment(self, ctx: dict[str, Any]) -> None:
            await self._undo("CancelShipment", ctx)

        @compensate("capture")
        async def refund_payment(self, ctx: dict[str, Any]) -> None:
            await self._undo("RefundPayment", ctx)

    return CheckoutSaga


async def run(
    n: int,
    window: int,
    *,
    participants: str | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    from sagaz import SagaConfig
    from sagaz.core.storage import InMemorySagaStorage, PostgreSQLSagaStorage

    check_matches_sagabus()
    kind = participants_kind(participants)
    store = (store or os.environ.get("SAGABUS_PEERS_SAGAZ_STORE") or "postgres").lower()
    if store not in ("postgres", "memory"):
        raise ValueError(f"store must be 'postgres' or 'memory', not {store!r}")
    # sagaz logs every saga and step at INFO (and failures at WARNING with tracebacks); keep the
    # benchmark's output to the result
    logging.getLogger("sagaz").setLevel(logging.ERROR)
    run_id = new_run_id()

    async with contextlib.AsyncExitStack() as stack:
        parts = await stack.enter_async_context(open_participants(kind, "peer_sagaz"))
        saga_cls = _saga_class(parts)
        storage: Any
        if store == "postgres":
            dsn = await stack.enter_async_context(scratch_database("peer_sagaz_store"))
            storage = PostgreSQLSagaStorage(dsn, pool_min_size=2, pool_max_size=DB_POOL_SIZE)
            stack.push_async_exit(storage)  # closes its pool (before the database is dropped)
        else:
            storage = InMemorySagaStorage()
        # no logging/metrics listeners: sagabus's bench does not log per step either
        config = SagaConfig(storage=storage, metrics=False, logging=False)

        async def one(order: dict[str, Any]) -> str:
            saga = saga_cls(config)
            try:
                await saga.run({"order": order}, saga_id=order["order_id"])
            except Refused:
                return "FAILED_NEEDS_MANUAL" if saga.compensation_failures else "COMPENSATED"
            return "COMPLETED"

        check = await self_check(parts, one, run_id)
        warm = workload(f"{run_id}w", WARMUP_SAGAS, prefix="warm")
        await parts.stock_many([o["items"][0]["sku"] for o in warm], 5)
        await drive(warm, min(window, WARMUP_SAGAS), one)

        orders = workload(run_id, n)
        await parts.stock_many([o["items"][0]["sku"] for o in orders], 5)
        load = await drive(orders, window, one)

        persisted = await _count_completed(storage, store)
        expected = load.outcomes.get("COMPLETED", 0) + WARMUP_SAGAS + 1  # + the self-check's
        if persisted is not None and persisted != expected:
            raise AssertionError(
                f"sagaz persisted {persisted} COMPLETED sagas, expected {expected}"
            )

    notes = (
        f"sagaz {_dist_version()}, in-process (declarative "
        "Saga, steps chained with depends_on); saga store: "
        + (
            "PostgreSQLSagaStorage (asyncpg, own database): saga row upserted at start and at "
            f"end, no per-step checkpoint, no crash recovery ({persisted} COMPLETED rows "
            "verified)"
            if store == "postgres"
            else "InMemorySagaStorage (nothing durable)"
        )
        + f"; participants: {kind} "
        + (
            "(in-process dicts, no durability of their own)"
            if kind == "memory"
            else "(one PostgreSQL transaction per step: inbox dedupe + business rows)"
        )
        + "; no step retries (sagaz's declarative engine does not retry), compensations run "
        f"once; logging/metrics listeners off; {WARMUP_SAGAS} warm-up sagas not timed; " + check
    )
    return summarize(NAME, n, load, notes)


async def _count_completed(storage: Any, store: str) -> int | None:
    if store != "postgres":
        return None
    pool = await storage._get_pool()
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM sagas WHERE status = 'completed'"))


def _dist_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("sagaz")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


if __name__ == "__main__":
    import json

    print(
        json.dumps(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 100, 50)), indent=2)
    )
