"""The two operational error classes the consumer maps to broker actions."""

from __future__ import annotations

from collections.abc import Mapping


class SagabusError(Exception):
    """Root of every error sagabus raises on purpose."""


class TransientError(SagabusError):
    """Try again later: the message goes to a delay queue and comes back, a bounded number of
    times, then to the dead-letter queue.

    ``headers`` are set on the copy that goes round the delay queue, so that a handler can keep
    a count of its own (the carrier attempts of the shipping service, for one) that other
    failures, such as a database outage, do not add to. The consumer's own headers win. Name
    them with ``HeaderNames.RETRY_STATE_PREFIX``: a dead-letter replay starts them afresh."""

    def __init__(self, *args: object, headers: Mapping[str, str | int] | None = None) -> None:
        super().__init__(*args)
        self.headers: dict[str, str | int] = dict(headers or {})


class ConcurrencyConflict(TransientError):
    """Someone else changed the row between our read and our write (optimistic concurrency)."""


class PermanentError(SagabusError):
    """Retrying cannot help (undecodable, schema-invalid, unknown type, invalid transition): the
    message goes straight to the dead-letter queue with this error as its reason."""


class StartRefused(SagabusError):
    """A service must not start as things are (a table it needs is missing, or its database holds
    sagas it cannot run): it says why in one line and exits 1, instead of failing on every
    delivery."""
