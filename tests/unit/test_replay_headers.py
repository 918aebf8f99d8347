"""``deadletters.replay_message``: a replayed message starts its retries afresh (no I/O)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from opentelemetry import trace

from messaging.deadletters import replay_message
from participants.shipping.service import CARRIER_ATTEMPTS
from schemas.envelope import HeaderNames

pytestmark = pytest.mark.unit


def test_replay_resets_retry_count_and_every_handler_retry_state() -> None:
    row = SimpleNamespace(
        id=7,
        queue="sagabus.shipping",
        message_id="m-1",
        message_type="shipping.CreateShipment.v1",
        body=b"{}",
        properties={"message_id": "m-1", "type": "shipping.CreateShipment.v1"},
        headers={
            HeaderNames.SAGA_ID: "s-1",
            HeaderNames.RETRY_COUNT: 5,
            HeaderNames.ERROR_CLASS: "TransientError",
            CARRIER_ATTEMPTS: 3,
            "x-death": [],
        },
    )
    message, span = replay_message(row, trace.NoOpTracer())
    span.end()
    headers = dict(message.headers or {})
    assert CARRIER_ATTEMPTS.startswith(HeaderNames.RETRY_STATE_PREFIX)
    for gone in (HeaderNames.RETRY_COUNT, HeaderNames.ERROR_CLASS, CARRIER_ATTEMPTS, "x-death"):
        assert gone not in headers, gone
    assert headers[HeaderNames.SAGA_ID] == "s-1"
    assert headers[HeaderNames.REPLAYED_FROM] == "7"
