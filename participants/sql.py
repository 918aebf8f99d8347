"""Plain SQL for the participants' per-message statements.

Each participant builds its hot statements once, at import, as text over its own ``Table``
objects (which stay the source of the DDL), and runs them on the asyncpg connection under the
consumer's transaction (``messaging.db.driver``), where asyncpg prepares each one once per
connection. Building and compiling the same SQLAlchemy statements for every message cost the
participants 18-39 % of their CPU (SQLAlchemy 2.0 never caches PostgreSQL's
``INSERT .. ON CONFLICT``); see docs/benchmarks.md.
"""

from __future__ import annotations

from sqlalchemy import Table


def qualified(table: Table) -> str:
    """``"schema"."name"`` of ``table``, for plain SQL."""
    return ".".join(f'"{part}"' for part in (table.schema, table.name) if part)
