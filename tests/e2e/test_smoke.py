from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.service import Runtime
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import ops
from tests.support import checkout, wait_for

pytestmark = pytest.mark.e2e


async def test_a_saga_completes(services: Runtime, database: Settings, engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await inventory.seed(conn, {"SKU-SMOKE": 5})
    cmd = checkout(sku="SKU-SMOKE")
    await ops.publish_starts(database.amqp_url, [ops.start_message(cmd)])

    async def done() -> dict | None:
        s = await ops.saga_status(engine, cmd.order_id)
        return s if s and s["terminal"] else None

    status = await wait_for(done, what="saga to finish")
    assert status["state"] == "COMPLETED"
