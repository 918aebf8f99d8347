"""``Outbox.committed``: where committed rows go (no I/O: the hand-over is in memory)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import MetaData

from messaging.db import outbox_table
from messaging.outbox import Outbox, Pending

pytestmark = pytest.mark.unit


def _rows(n: int, start: int = 1) -> list[Pending]:
    return [
        Pending(i, uuid.uuid4(), "t", None, "x", "k", None, {}, b"{}", datetime.now(UTC))
        for i in range(start, start + n)
    ]


def _outbox() -> Outbox:
    return Outbox(outbox_table(MetaData(schema="unit_outbox")), "unit_outbox")


def test_rows_go_to_the_dispatcher_when_one_runs_here() -> None:
    out = _outbox()
    out.dispatching = True
    out.committed(_rows(2))
    assert [r.id for r in out.pending] == [1, 2]
    assert out.in_flight == {1, 2}
    assert out.pending_ready.is_set() and not out.local_wakeup.is_set()


def test_without_a_dispatcher_the_sweep_is_woken_and_nothing_is_held() -> None:
    out = _outbox()
    out.committed(_rows(2))
    assert not out.pending and not out.in_flight
    assert out.local_wakeup.is_set()


def test_a_full_backlog_leaves_new_rows_to_the_sweep() -> None:
    out = _outbox()
    out.dispatching = True
    out.max_pending = 2
    out.committed(_rows(2))
    out.committed(_rows(1, start=3))
    assert [r.id for r in out.pending] == [1, 2]
    assert out.in_flight == {1, 2}  # row 3 is not excluded from the sweep
    assert out.local_wakeup.is_set()
