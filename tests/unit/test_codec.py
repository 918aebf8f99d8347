"""``messaging.codec``: from AMQP properties, headers and a JSON body to typed messages, and back.

``decode`` only reads attributes, so a small dataclass stands in for the broker's delivery.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from aio_pika import DeliveryMode

from messaging.codec import START_NAMESPACE, Incoming, decode, encode
from messaging.errors import PermanentError, SagabusError
from messaging.settings import Settings
from schemas.base import saga_id_for
from schemas.checkout import StartCheckout, saga_id_for_order
from schemas.envelope import Envelope, HeaderNames
from schemas.payment import PaymentAuthorized
from tests.unit.samples import OID, SAMPLES

pytestmark = pytest.mark.unit

MAX = 4096
_start = SAMPLES[StartCheckout.TYPE]
assert isinstance(_start, StartCheckout)
START = _start
AUTHORIZED = SAMPLES[PaymentAuthorized.TYPE]
SAGA = uuid.UUID("11111111-1111-4111-8111-111111111111")
MSG = uuid.UUID("22222222-2222-4222-8222-222222222222")
CAUSE = uuid.UUID("33333333-3333-4333-8333-333333333333")
CORR = uuid.UUID("44444444-4444-4444-8444-444444444444")
WHEN = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@dataclass(frozen=True)
class FakeDelivery:
    body: bytes
    type: str | None
    content_type: str | None = "application/json"
    message_id: str | None = None
    correlation_id: str | None = None
    headers: dict[str, Any] | None = None
    timestamp: datetime | None = None


def start_delivery(body: StartCheckout = START, **kw: Any) -> FakeDelivery:
    """What any AMQP client may publish to start a checkout: a type and a body."""
    return FakeDelivery(body=body.model_dump_json().encode(), type=StartCheckout.TYPE, **kw)


def reply_delivery(**kw: Any) -> FakeDelivery:
    d = FakeDelivery(
        body=AUTHORIZED.model_dump_json().encode(),
        type=PaymentAuthorized.TYPE,
        message_id=str(MSG),
        headers={
            HeaderNames.SAGA_ID: str(SAGA),
            HeaderNames.FENCE: 2,
            HeaderNames.ATTEMPT: 1,
            HeaderNames.OCCURRED_AT: WHEN.isoformat(),
        },
    )
    return replace(d, **kw)


def with_headers(**changes: Any) -> FakeDelivery:
    """A valid reply with some headers changed (a value of None removes the header)."""
    base = reply_delivery()
    assert base.headers is not None
    headers = dict(base.headers)
    for key, value in changes.items():
        name = getattr(HeaderNames, key)
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return replace(base, headers=headers)


def run(delivery: Any, max_bytes: int = MAX) -> Incoming:
    """``decode`` a fake or an outgoing aio-pika message (both have the attributes it reads)."""
    return decode(delivery, max_bytes=max_bytes)


# ---------------------------------------------------------------------------------------------
# Valid deliveries


def test_start_without_message_id_gets_an_id_derived_from_the_order() -> None:
    got = run(start_delivery(content_type=None))
    env = got.envelope
    assert got.body == START
    assert env.message_id == uuid.uuid5(START_NAMESPACE, OID)
    assert env.saga_id == saga_id_for_order(OID)
    assert env.correlation_id == env.saga_id
    assert env.type == StartCheckout.TYPE
    assert (env.attempt, env.fence) == (1, 0)
    assert env.causation_id is None and env.step is None and env.idempotency_key is None
    assert env.occurred_at.tzinfo is not None


def test_start_message_id_is_deterministic_per_order() -> None:
    first = run(start_delivery()).envelope.message_id
    assert first == run(start_delivery()).envelope.message_id
    other = START.model_copy(update={"order_id": "ord-43"})
    assert run(start_delivery(other)).envelope.message_id != first


def test_start_with_a_message_id_keeps_it() -> None:
    got = run(start_delivery(message_id=str(MSG), correlation_id=str(CORR)))
    assert got.envelope.message_id == MSG
    assert got.envelope.correlation_id == CORR
    assert got.envelope.saga_id == saga_id_for_order(OID)


def test_reply_decodes_envelope_from_properties_and_headers() -> None:
    got = run(
        with_headers(
            CAUSATION_ID=str(CAUSE),
            IDEMPOTENCY_KEY=f"{SAGA}:authorization",
            STEP="authorization",
            TRACEPARENT="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
    )
    env = got.envelope
    assert got.body == AUTHORIZED
    assert (env.message_id, env.saga_id, env.correlation_id) == (MSG, SAGA, SAGA)
    assert env.causation_id == CAUSE
    assert (env.step, env.attempt, env.fence) == ("authorization", 1, 2)
    assert env.idempotency_key == f"{SAGA}:authorization"
    assert env.occurred_at == WHEN
    assert env.traceparent is not None and env.traceparent.startswith("00-0af7")


def test_header_values_may_arrive_as_bytes() -> None:
    got = run(with_headers(SAGA_ID=str(SAGA).encode(), STEP=b"authorization", FENCE=b"7"))
    assert got.envelope.saga_id == SAGA
    assert got.envelope.step == "authorization"
    assert got.envelope.fence == 7


def test_occurred_at_falls_back_to_the_timestamp_property() -> None:
    stamp = datetime(2024, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    got = run(replace(with_headers(OCCURRED_AT=None), timestamp=stamp))
    assert got.envelope.occurred_at == stamp


def test_body_at_exactly_the_limit_is_accepted() -> None:
    body = AUTHORIZED.model_dump_json().encode()
    padded = body + b" " * (MAX - len(body))
    assert len(padded) == MAX
    assert run(reply_delivery(body=padded)).body == AUTHORIZED


# ---------------------------------------------------------------------------------------------
# Permanent errors: each with a reason an operator can act on

_bad_start = START.model_dump(mode="json")

ERRORS = [
    pytest.param(
        reply_delivery(body=b" " * (MAX + 1)),
        f"body of {MAX + 1} bytes exceeds limit of {MAX}",
        id="oversize",
    ),
    pytest.param(
        reply_delivery(body=b"x" * (MAX + 1), type=None),
        "exceeds limit",
        id="oversize-checked-first",
    ),
    pytest.param(
        reply_delivery(content_type="text/plain"),
        "content_type 'text/plain' is not application/json",
        id="content-type",
    ),
    pytest.param(reply_delivery(type=None), "missing AMQP 'type' property", id="missing-type"),
    pytest.param(reply_delivery(type=""), "missing AMQP 'type' property", id="empty-type"),
    pytest.param(
        reply_delivery(type="payment.PaymentTeleported.v1"),
        "unknown message type 'payment.PaymentTeleported.v1'",
        id="unknown-type",
    ),
    pytest.param(
        reply_delivery(type="payment.PaymentAuthorized.v2"),
        "unknown message type 'payment.PaymentAuthorized.v2'",
        id="unknown-version",
    ),
    pytest.param(reply_delivery(body=b"{not json"), "body is not JSON", id="not-json"),
    pytest.param(reply_delivery(body=b""), "body is not JSON", id="empty-body"),
    pytest.param(reply_delivery(body=b'{"a": "\xc3\x28"}'), "body is not JSON", id="bad-utf8"),
    pytest.param(
        reply_delivery(body=b"[]"),
        "invalid payment.PaymentAuthorized.v1: body: Input should be an object",
        id="json-array",
    ),
    pytest.param(
        FakeDelivery(
            body=json.dumps({**_bad_start, "currency": "eur"}).encode(),
            type=StartCheckout.TYPE,
        ),
        "invalid checkout.StartCheckout.v1: currency: String should match pattern",
        id="schema-pattern",
    ),
    pytest.param(
        FakeDelivery(
            body=json.dumps({k: v for k, v in _bad_start.items() if k != "items"}).encode(),
            type=StartCheckout.TYPE,
        ),
        "invalid checkout.StartCheckout.v1: items: Field required",
        id="schema-missing-field",
    ),
    pytest.param(
        FakeDelivery(
            body=json.dumps({**_bad_start, "coupon": "FREE"}).encode(),
            type=StartCheckout.TYPE,
        ),
        "coupon: Extra inputs are not permitted",
        id="schema-extra-field",
    ),
    pytest.param(
        FakeDelivery(
            body=json.dumps({**_bad_start, "items": [_bad_start["items"][0]] * 2}).encode(),
            type=StartCheckout.TYPE,
        ),
        "items must not repeat a sku",
        id="schema-model-validator",
    ),
    pytest.param(
        reply_delivery(message_id=None),
        "missing AMQP 'message_id' property",
        id="reply-missing-message-id",
    ),
    pytest.param(
        reply_delivery(message_id="not-a-uuid"),
        "message_id is not a UUID: 'not-a-uuid'",
        id="bad-message-id",
    ),
    pytest.param(
        start_delivery(message_id="start-1"),
        "message_id is not a UUID: 'start-1'",
        id="start-bad-message-id",
    ),
    pytest.param(
        with_headers(SAGA_ID=None),
        f"missing header {HeaderNames.SAGA_ID}",
        id="reply-missing-saga-header",
    ),
    pytest.param(reply_delivery(headers=None), "missing header sagabus-saga-id", id="no-headers"),
    pytest.param(
        with_headers(SAGA_ID="saga-7"),
        "sagabus-saga-id is not a UUID: 'saga-7'",
        id="bad-saga-header",
    ),
    pytest.param(
        with_headers(CAUSATION_ID="because"),
        "sagabus-causation-id is not a UUID: 'because'",
        id="bad-causation-header",
    ),
    pytest.param(
        reply_delivery(correlation_id="corr"),
        "correlation_id is not a UUID: 'corr'",
        id="bad-correlation-id",
    ),
    pytest.param(
        with_headers(ATTEMPT="two"),
        "header sagabus-attempt is not an integer: 'two'",
        id="attempt-not-int",
    ),
    pytest.param(
        with_headers(FENCE="1.5"),
        "header sagabus-fence is not an integer: '1.5'",
        id="fence-not-int",
    ),
    pytest.param(
        with_headers(ATTEMPT=0),
        "invalid envelope: attempt: Input should be greater than or equal to 1",
        id="attempt-zero",
    ),
    pytest.param(
        with_headers(FENCE=-1),
        "invalid envelope: fence: Input should be greater than or equal to 0",
        id="fence-negative",
    ),
    pytest.param(
        with_headers(OCCURRED_AT="last tuesday"),
        "header sagabus-occurred-at is not ISO 8601",
        id="occurred-at",
    ),
]


@pytest.mark.parametrize(("delivery", "message"), ERRORS)
def test_undecodable_delivery_is_a_permanent_error(delivery: FakeDelivery, message: str) -> None:
    with pytest.raises(PermanentError, match=re.escape(message)):
        run(delivery)


def test_permanent_error_is_a_sagabus_error() -> None:
    assert issubclass(PermanentError, SagabusError)


def test_error_messages_stay_short_for_huge_values() -> None:
    with pytest.raises(PermanentError) as excinfo:
        run(reply_delivery(message_id="x" * 10_000))
    assert len(str(excinfo.value)) < 200


def test_validation_summary_is_bounded() -> None:
    many = json.dumps({f"f{i}": i for i in range(50)}).encode()
    with pytest.raises(PermanentError) as excinfo:
        run(reply_delivery(body=many))
    assert "more)" in str(excinfo.value)
    assert len(str(excinfo.value)) < 1000


def test_deeply_nested_json_is_a_permanent_error() -> None:
    limit = Settings.model_fields["max_message_bytes"].default
    depth = 100_000  # 200 kB: deep enough for any interpreter's recursion limit
    body = b'{"order_id": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(body) < limit  # well inside the production size limit
    with pytest.raises(PermanentError):
        run(reply_delivery(body=body), max_bytes=limit)


# ---------------------------------------------------------------------------------------------
# encode -> decode


def full_envelope(type_name: str) -> Envelope:
    saga_id = saga_id_for_order(OID) if type_name == StartCheckout.TYPE else SAGA
    return Envelope(
        message_id=MSG,
        type=type_name,
        saga_id=saga_id,
        correlation_id=CORR,
        causation_id=CAUSE,
        idempotency_key=f"{saga_id}:authorization",
        step="authorization",
        attempt=3,
        fence=9,
        reply_token="3f9c2a1e5b7d4c6a8e0f1a2b3c4d5e6f",
        occurred_at=WHEN,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=1",
        baggage="tenant=eu",
    )


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_encode_decode_round_trip(type_name: str) -> None:
    env = full_envelope(type_name)
    body = SAMPLES[type_name]
    got = run(encode(env, body), max_bytes=64 * 1024)
    if body.SAGA_KEY:
        # a public entry point: none of our headers is read from it (issue 9), and the saga id
        # is derived from the saga type and the business key
        env = env.model_copy(
            update={
                "saga_id": saga_id_for(body.saga_type, getattr(body, body.SAGA_KEY)),
                "causation_id": None,
                "idempotency_key": None,
                "step": None,
                "attempt": 1,
                "fence": 0,
                "reply_token": None,
                "occurred_at": got.envelope.occurred_at,
            }
        )
        assert abs((got.envelope.occurred_at - WHEN).total_seconds()) < 1  # AMQP timestamp
    assert got.envelope == env
    assert got.body == body


def test_round_trip_of_a_minimal_envelope() -> None:
    env = Envelope(
        message_id=MSG,
        type=PaymentAuthorized.TYPE,
        saga_id=SAGA,
        correlation_id=SAGA,
        occurred_at=WHEN,
    )
    got = run(encode(env, AUTHORIZED))
    assert got.envelope == env
    assert got.body == AUTHORIZED


def test_encode_sets_the_amqp_properties() -> None:
    env = full_envelope(PaymentAuthorized.TYPE)
    msg = encode(env, AUTHORIZED)
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == DeliveryMode.PERSISTENT
    assert msg.message_id == str(MSG)
    assert msg.type == PaymentAuthorized.TYPE
    assert msg.correlation_id == str(CORR)
    assert json.loads(msg.body) == AUTHORIZED.model_dump(mode="json")
    assert msg.headers == env.headers()
    assert all(isinstance(v, str | int) for v in env.headers().values())
