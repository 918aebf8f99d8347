"""The envelope: everything about a message that is not its business body.

On the wire it travels as AMQP basic properties and headers, so any AMQP 0-9-1 client can read
and write it without parsing the body:

=====================  ===================================================================
``message_id``         property ``message_id`` (UUID)
``type``               property ``type`` (for example ``payment.AuthorizePayment.v1``)
``correlation_id``     property ``correlation_id`` (UUID; the saga id unless given)
``occurred_at``        property ``timestamp`` and header ``sagabus-occurred-at`` (ISO 8601)
``saga_id``            header ``sagabus-saga-id``
``causation_id``       header ``sagabus-causation-id`` (message id that caused this one)
``idempotency_key``    header ``sagabus-idempotency-key`` (``<saga id>:<step>``)
``step``               header ``sagabus-step``
``attempt``            header ``sagabus-attempt`` (1 for the first send of a step)
``fence``              header ``sagabus-fence`` (the saga's step sequence when sent)
``reply_token``        header ``sagabus-reply-token`` (a command's unguessable token; the
                       reply echoes it)
``traceparent``        header ``traceparent`` (W3C Trace Context)
``tracestate``         header ``tracestate``
=====================  ===================================================================
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class HeaderNames:
    SAGA_ID = "sagabus-saga-id"
    CAUSATION_ID = "sagabus-causation-id"
    IDEMPOTENCY_KEY = "sagabus-idempotency-key"
    STEP = "sagabus-step"
    ATTEMPT = "sagabus-attempt"
    FENCE = "sagabus-fence"
    OCCURRED_AT = "sagabus-occurred-at"
    REPLY_TOKEN = "sagabus-reply-token"
    TRACEPARENT = "traceparent"
    TRACESTATE = "tracestate"
    BAGGAGE = "baggage"
    # Added by the consumer when a message is retried or dead-lettered.
    RETRY_COUNT = "sagabus-retry-count"
    #: prefix of the headers a handler keeps across its retries (``TransientError(headers=)``):
    #: retry state, which a dead-letter replay resets along with the retry count
    RETRY_STATE_PREFIX = "sagabus-retry-state-"
    ERROR_CLASS = "sagabus-error-class"
    ERROR_MESSAGE = "sagabus-error-message"
    FAILED_QUEUE = "sagabus-failed-queue"
    ORIGINAL_EXCHANGE = "sagabus-original-exchange"
    ORIGINAL_ROUTING_KEY = "sagabus-original-routing-key"
    FAILED_AT = "sagabus-failed-at"
    FAILURE_KIND = "sagabus-failure-kind"
    REPLAYED_FROM = "sagabus-replayed-from"
    #: the broker-validated user that published the message first (kept across its retries,
    #: dead letter and replay, which other users publish)
    ORIGINAL_USER_ID = "sagabus-original-user-id"
    #: HMAC of a retry or dead-letter copy's bookkeeping, by the consumer's service key
    SIGNATURE = "sagabus-signature"
    #: the dead-letter collector's mark on a dead letter the broker itself made
    DEAD_LETTERED_BY = "sagabus-dead-lettered-by"
    #: every header of ours starts with this; none is believed from outside on the start route
    PREFIX = "sagabus-"


class Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: UUID
    type: str = Field(min_length=3, max_length=200)
    saga_id: UUID
    correlation_id: UUID
    causation_id: UUID | None = None
    idempotency_key: str | None = None
    step: str | None = None
    attempt: int = Field(default=1, ge=1)
    fence: int = Field(default=0, ge=0)
    reply_token: str | None = Field(default=None, max_length=200)
    occurred_at: datetime
    traceparent: str | None = None
    tracestate: str | None = None
    baggage: str | None = None

    def headers(self) -> dict[str, Any]:
        """The envelope fields that travel as AMQP headers (strings and ints only)."""
        h: dict[str, Any] = {
            HeaderNames.SAGA_ID: str(self.saga_id),
            HeaderNames.ATTEMPT: self.attempt,
            HeaderNames.FENCE: self.fence,
            HeaderNames.OCCURRED_AT: self.occurred_at.isoformat(),
        }
        if self.causation_id is not None:
            h[HeaderNames.CAUSATION_ID] = str(self.causation_id)
        if self.idempotency_key is not None:
            h[HeaderNames.IDEMPOTENCY_KEY] = self.idempotency_key
        if self.step is not None:
            h[HeaderNames.STEP] = self.step
        if self.reply_token is not None:
            h[HeaderNames.REPLY_TOKEN] = self.reply_token
        if self.traceparent:
            h[HeaderNames.TRACEPARENT] = self.traceparent
        if self.tracestate:
            h[HeaderNames.TRACESTATE] = self.tracestate
        if self.baggage:
            h[HeaderNames.BAGGAGE] = self.baggage
        return h
