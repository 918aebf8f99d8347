"""Peer implementations of sagabus's checkout saga, for ``sagabus bench`` to compare against.

Each peer module exposes ``async def run(n: int, window: int, **knobs) -> dict`` that runs ``n``
all-success checkouts with at most ``window`` in flight (after a self-check that a refusal at
ReserveInventory compensates VoidAuthorization then CancelOrder) and returns::

    {"name", "sagas", "completed", "sagas_per_s", "p50_ms", "p95_ms", "p99_ms", "notes"}

``notes`` says what durability the peer had. The peers need the optional dependency group
``peers`` (``pip install -e '.[peers]'``); :func:`available` says which can run here.

Run them all: ``python -m benchmarks.peers --sagas 500 --window 100``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

#: peer name -> module
PEERS: dict[str, str] = {
    "temporal": "benchmarks.peers.temporal_checkout",
    "sagaz": "benchmarks.peers.sagaz_checkout",
}
_REQUIRES: dict[str, tuple[str, ...]] = {
    "temporal": ("temporalio", "asyncpg"),
    "sagaz": ("sagaz", "asyncpg"),
}


def missing(name: str) -> str | None:
    """Why peer ``name`` cannot run here, or None if it can."""
    if name not in PEERS:
        return f"unknown peer {name!r} (known: {', '.join(PEERS)})"
    for module in _REQUIRES[name]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[peers]')"
    if name == "temporal":
        from benchmarks.peers.temporal_checkout import find_temporal_binary

        try:
            find_temporal_binary()
        except FileNotFoundError as exc:
            return str(exc)
    return None


def available() -> list[str]:
    """The peers whose dependencies are installed."""
    return [name for name in PEERS if missing(name) is None]


def runner(name: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """The ``run`` coroutine function of peer ``name``."""
    return importlib.import_module(PEERS[name]).run  # type: ignore[no-any-return]
