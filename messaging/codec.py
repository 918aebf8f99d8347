"""Between the wire (AMQP properties, headers, JSON body) and typed messages."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aio_pika import DeliveryMode
from aio_pika import Message as AmqpMessage
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from messaging.errors import PermanentError
from schemas.base import Message, saga_id_for
from schemas.envelope import Envelope, HeaderNames
from schemas.registry import UnknownMessageType, model_for

#: message ids of start commands sent without one are derived from the business key (a
#: StartCheckout's from its order id alone, as before there were other sagas)
START_NAMESPACE = uuid.UUID("0b7e51c4-54a3-4e61-9d3f-2b36f6b7b0a1")


@dataclass(frozen=True)
class Incoming:
    envelope: Envelope
    body: Message
    #: the delivery's AMQP headers as received (including the consumer's retry bookkeeping)
    headers: Mapping[str, Any] = field(default_factory=dict)


def encode(envelope: Envelope, body: Message) -> AmqpMessage:
    return AmqpMessage(
        body=body.model_dump_json().encode(),
        content_type="application/json",
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=str(envelope.message_id),
        type=envelope.type,
        correlation_id=str(envelope.correlation_id),
        timestamp=envelope.occurred_at,
        headers=envelope.headers(),
    )


def _header(headers: dict[str, Any], name: str) -> Any:
    value = headers.get(name)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _uuid(value: Any, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise PermanentError(f"{what} is not a UUID: {str(value)[:80]!r}") from None


def _int(value: Any, what: str, default: int) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PermanentError(f"header {what} is not an integer: {str(value)[:80]!r}") from None


def summarize(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def decode(
    delivery: AbstractIncomingMessage,
    *,
    max_bytes: int,
    headers: Mapping[str, Any] | None = None,
    start: bool | None = None,
) -> Incoming:
    """Validate a delivery into an envelope and a typed body, or raise ``PermanentError``.

    ``headers`` are the headers believed (``messaging.trust``; default: all of them). On the
    start route (``start``; default: judged by the type) only the type, the body, the message
    id, the correlation id and the trace context are read: the saga id is derived from the body
    and every other envelope field takes its initial value."""
    if len(delivery.body) > max_bytes:
        raise PermanentError(f"body of {len(delivery.body)} bytes exceeds limit of {max_bytes}")
    if delivery.content_type not in (None, "", "application/json"):
        raise PermanentError(f"content_type {delivery.content_type!r} is not application/json")
    if not delivery.type:
        raise PermanentError("missing AMQP 'type' property (for example checkout.StartCheckout.v1)")
    try:
        model = model_for(delivery.type)
    except UnknownMessageType as e:
        raise PermanentError(str(e)) from None
    try:
        # strict: exactly what the published JSON Schema accepts ("2" is not an integer)
        body = model.from_json(delivery.body)
    except ValidationError as e:
        errors = e.errors()
        if errors and errors[0]["type"] == "json_invalid":  # bad syntax, bad UTF-8, too deep
            why = errors[0]["msg"].removeprefix("Invalid JSON: ")
            raise PermanentError(f"body is not JSON: {why[:200]}") from None
        raise PermanentError(f"invalid {delivery.type}: {summarize(e)}") from None

    headers = dict((delivery.headers or {}) if headers is None else headers)
    if start is None:
        start = bool(body.SAGA_KEY)
    if start:
        if not body.SAGA_KEY:
            raise PermanentError(f"{delivery.type} is not a start command")
        headers = {k: v for k, v in headers.items() if not k.startswith(HeaderNames.PREFIX)}
        # A public entry point: only the type and body are required.
        key = str(getattr(body, body.SAGA_KEY))
        saga_id = saga_id_for(body.saga_type, key)
        derived = key if body.saga_type == "checkout" else f"{body.TYPE}:{key}"
        message_id = (
            _uuid(delivery.message_id, "message_id")
            if delivery.message_id
            else uuid.uuid5(START_NAMESPACE, derived)
        )
    else:
        if not delivery.message_id:
            raise PermanentError("missing AMQP 'message_id' property")
        message_id = _uuid(delivery.message_id, "message_id")
        saga_header = _header(headers, HeaderNames.SAGA_ID)
        if saga_header is None:
            raise PermanentError(f"missing header {HeaderNames.SAGA_ID}")
        saga_id = _uuid(saga_header, HeaderNames.SAGA_ID)
    correlation = (
        _uuid(delivery.correlation_id, "correlation_id") if delivery.correlation_id else saga_id
    )
    causation = _header(headers, HeaderNames.CAUSATION_ID)
    occurred_raw = _header(headers, HeaderNames.OCCURRED_AT)
    occurred: datetime
    if occurred_raw:
        try:
            occurred = datetime.fromisoformat(str(occurred_raw))
        except ValueError:
            raise PermanentError(f"header {HeaderNames.OCCURRED_AT} is not ISO 8601") from None
    elif isinstance(delivery.timestamp, datetime):
        occurred = delivery.timestamp
    else:
        occurred = datetime.now(UTC)
    try:
        envelope = Envelope(
            message_id=message_id,
            type=delivery.type,
            saga_id=saga_id,
            correlation_id=correlation,
            causation_id=_uuid(causation, HeaderNames.CAUSATION_ID) if causation else None,
            idempotency_key=_header(headers, HeaderNames.IDEMPOTENCY_KEY),
            step=_header(headers, HeaderNames.STEP),
            reply_token=_header(headers, HeaderNames.REPLY_TOKEN),
            attempt=_int(_header(headers, HeaderNames.ATTEMPT), HeaderNames.ATTEMPT, 1),
            fence=_int(_header(headers, HeaderNames.FENCE), HeaderNames.FENCE, 0),
            occurred_at=occurred,
            traceparent=_header(headers, HeaderNames.TRACEPARENT),
            tracestate=_header(headers, HeaderNames.TRACESTATE),
            baggage=_header(headers, HeaderNames.BAGGAGE),
        )
    except ValidationError as e:
        raise PermanentError(f"invalid envelope: {summarize(e)}") from None
    return Incoming(envelope, body, headers)
