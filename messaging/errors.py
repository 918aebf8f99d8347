"""The two operational error classes the consumer maps to broker actions."""

from __future__ import annotations


class SagabusError(Exception):
    """Root of every error sagabus raises on purpose."""


class TransientError(SagabusError):
    """Try again later: the message goes to a delay queue and comes back, a bounded number of
    times, then to the dead-letter queue."""


class ConcurrencyConflict(TransientError):
    """Someone else changed the row between our read and our write (optimistic concurrency)."""


class PermanentError(SagabusError):
    """Retrying cannot help (undecodable, schema-invalid, unknown type, invalid transition): the
    message goes straight to the dead-letter queue with this error as its reason."""
