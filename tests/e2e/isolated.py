"""What the end-to-end tests that start and stop their own services share: a vhost and database
of their own (so the session's ``services`` runtime never consumes their messages, and a
dead-letter collector takes no one else's dead letters), a gate that holds chosen commands back
in the retry queues, and polling a saga of any type until it ends."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.consumer import Context, Handler, Preparation, TwoPhase
from messaging.db import ensure_database
from messaging.errors import TransientError
from messaging.service import ServiceDefinition
from messaging.settings import Settings
from process_manager import ops
from process_manager.bootstrap import PROCESS_MANAGER
from schemas.envelope import Envelope
from tests import support
from tests.conftest import PG_ADMIN, _isolated_settings
from tests.support import wait_for

#: Retries that outlast a held command: a delivery the gate refuses comes back every 300 ms
#: for up to 100 deliveries (about 30 s) before it would be dead-lettered.
HOLDING = {"retry_delays_ms": (300,), "retry_jitter": 0.1, "max_attempts": 100}


@asynccontextmanager
async def isolated(prefix: str, **overrides: Any) -> AsyncIterator[Settings]:
    """Settings for a vhost and a database of their own, both removed afterwards."""
    run = prefix + uuid.uuid4().hex[:8]
    settings = _isolated_settings(run).model_copy(update=overrides)
    vhost = f"sagabus-test-{run}"
    support.create_vhost(vhost)
    try:
        await ensure_database(settings)
        yield settings
    finally:
        await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
        support.delete_vhost(vhost)


class Gate:
    """Holds back the command of one step of one saga: its participant's handler raises
    ``TransientError`` for it, so the command goes round the delay queue and comes back, while
    every other message passes. ``held`` counts the refusals, proof the command was there."""

    def __init__(self) -> None:
        self._holding: dict[uuid.UUID, str] = {}
        self.held: Counter[tuple[uuid.UUID, str]] = Counter()

    def hold(self, saga_id: uuid.UUID, step: str) -> None:
        self._holding[saga_id] = step

    def release(self, saga_id: uuid.UUID) -> None:
        self._holding.pop(saga_id, None)

    def check(self, env: Envelope) -> None:
        if env.step is not None and self._holding.get(env.saga_id) == env.step:
            self.held[(env.saga_id, env.step)] += 1
            raise TransientError(f"held back by the test's gate: step {env.step}")

    def _wrap(self, handler: Handler) -> Handler:
        if isinstance(handler, TwoPhase):
            inner = handler

            async def prepare(p: Preparation) -> Any:
                self.check(p.incoming.envelope)
                return await inner.prepare(p)

            return TwoPhase(prepare=prepare, apply=inner.apply)

        async def gated(ctx: Context) -> None:
            self.check(ctx.envelope)
            await handler(ctx)

        return gated

    def around(self, definitions: list[ServiceDefinition]) -> list[ServiceDefinition]:
        """``definitions`` with every participant's handlers behind this gate."""
        for d in definitions:
            if d.name != PROCESS_MANAGER:
                d.handlers = {t: self._wrap(h) for t, h in d.handlers.items()}
        return definitions


async def wait_saga(
    engine: AsyncEngine,
    key: str,
    *,
    saga_type: str = "checkout",
    status: str | None = None,
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll until the saga of ``saga_type`` for ``key`` is terminal (or, with ``status``, shows
    that status); returns ``ops.saga_status``."""

    async def probe() -> dict[str, Any] | None:
        s = await ops.saga_status(engine, key, saga_type=saga_type)
        if s is None:
            return None
        done = s["state"] == status if status is not None else s["terminal"]
        return s if done else None

    what = f"{saga_type} saga of {key} " + (f"in {status}" if status else "to finish")
    return await wait_for(probe, timeout=timeout, what=what)
