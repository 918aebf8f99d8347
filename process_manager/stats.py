"""``sagabus stats``: the operational picture from PostgreSQL, across every process."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging.settings import Settings
from process_manager import bootstrap

_DURATIONS = """
WITH d AS (
  SELECT status, EXTRACT(EPOCH FROM finished_at - started_at) AS s
  FROM process_manager.sagas WHERE finished_at IS NOT NULL
)
SELECT status, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s) AS p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99
FROM d GROUP BY status
"""

# A step's latency: from the history row that dispatched it to the row that settled it (the
# history's structured event kinds, never its note text).
_STEPS = """
WITH h AS (
  SELECT saga_id, at, event, step,
         lag(at) OVER (PARTITION BY saga_id ORDER BY id) AS prev_at
  FROM process_manager.history WHERE outcome = 'applied'
)
SELECT step, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM at - prev_at)) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM at - prev_at)) AS p95
FROM h
WHERE prev_at IS NOT NULL AND step IS NOT NULL
  AND event IN ('step_succeeded', 'step_failed', 'branched', 'compensation_done',
                'compensation_refused', 'reconciled')
GROUP BY 1 ORDER BY 1
"""


async def collect(engine: AsyncEngine, settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with engine.connect() as conn:
        statuses = {
            r.status: r.n
            for r in (
                await conn.execute(
                    text("SELECT status, count(*) AS n FROM process_manager.sagas GROUP BY status")
                )
            ).all()
        }
        phases = {
            r.phase: r.n
            for r in (
                await conn.execute(
                    text("SELECT phase, count(*) AS n FROM process_manager.sagas GROUP BY phase")
                )
            ).all()
        }
        by_definition = {
            r.definition_version: r.n
            for r in (
                await conn.execute(
                    text(
                        "SELECT definition_version, count(*) AS n FROM process_manager.sagas"
                        " GROUP BY definition_version"
                    )
                )
            ).all()
        }
        out["sagas"] = {
            "total": sum(statuses.values()),
            "by_state": statuses,
            "by_phase": phases,
            "by_definition": by_definition,
        }
        done = phases.get("COMPLETED", 0) + phases.get("COMPENSATED", 0)
        manual = phases.get("FAILED_NEEDS_MANUAL", 0)
        out["compensation_rate"] = (
            round(phases.get("COMPENSATED", 0) / (done + manual), 4) if done + manual else None
        )
        out["time_to_finish_s"] = {
            r.status: {"n": r.n, "p50": _r(r.p50), "p95": _r(r.p95), "p99": _r(r.p99)}
            for r in (await conn.execute(text(_DURATIONS))).all()
        }
        out["step_latency_s"] = {
            r.step: {"n": r.n, "p50": _r(r.p50), "p95": _r(r.p95)}
            for r in (await conn.execute(text(_STEPS))).all()
        }
        out["stuck"] = {
            "older_than_ttl": (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM process_manager.sagas WHERE finished_at IS NULL "
                        "AND started_at < now() - make_interval(secs => :ttl)"
                    ),
                    {"ttl": settings.saga_ttl_s},
                )
            ).scalar_one(),
            "in_flight": (
                await conn.execute(
                    text("SELECT count(*) FROM process_manager.sagas WHERE finished_at IS NULL")
                )
            ).scalar_one(),
            "open_manual_cases": (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM process_manager.manual_cases "
                        "WHERE resolved_at IS NULL"
                    )
                )
            ).scalar_one(),
        }
        timeouts = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM process_manager.history"
                    " WHERE event IN ('resent', 'timed_out', 'reconcile_asked')"
                    " AND outcome = 'applied' AND message_type = 'sagabus.Timeout'"
                )
            )
        ).scalar_one()
        out["timeouts"] = timeouts
        has_store = (
            await conn.execute(text("SELECT to_regclass('dead_letters.dead_letters')"))
        ).scalar_one() is not None
        rows = (
            (
                await conn.execute(
                    text(
                        "SELECT status, count(*) AS n, coalesce(sum(retry_count), 0) AS retries "
                        "FROM dead_letters.dead_letters GROUP BY status"
                    )
                )
            ).all()
            if has_store
            else []
        )
        out["dead_letters"] = {r.status: r.n for r in rows}
        out["retries_before_dead_letter"] = int(sum(r.retries for r in rows))
        outbox: dict[str, Any] = {}
        for d in bootstrap.definitions(settings):
            row = (
                await conn.execute(
                    text(
                        f"SELECT count(*) FILTER (WHERE sent_at IS NULL) AS unsent, "
                        f"EXTRACT(EPOCH FROM now() - min(created_at) FILTER "
                        f"(WHERE sent_at IS NULL)) AS oldest, "
                        f"percentile_cont(0.99) WITHIN GROUP (ORDER BY "
                        f"EXTRACT(EPOCH FROM sent_at - created_at)) AS p99_lag "
                        f'FROM "{d.schema}".outbox'
                    )
                )
            ).one()
            outbox[d.name] = {
                "unsent": row.unsent,
                "oldest_unsent_s": _r(row.oldest),
                "p99_publish_lag_s": _r(row.p99_lag),
            }
        out["outbox"] = outbox
    return out


def _r(v: Any) -> float | None:
    return None if v is None else round(float(v), 4)


def render(data: dict[str, Any], console: Console) -> None:
    s = data["sagas"]
    console.print(
        f"sagas: {s['total']}  compensation rate: {data['compensation_rate']}  "
        f"in flight: {data['stuck']['in_flight']}  stuck beyond TTL: "
        f"{data['stuck']['older_than_ttl']}  open manual cases: "
        f"{data['stuck']['open_manual_cases']}  timeouts: {data['timeouts']}"
    )
    t = Table("state", "sagas", "p50 s", "p95 s", "p99 s", title="Time to finish")
    for state, n in sorted(s["by_state"].items()):
        d = data["time_to_finish_s"].get(state, {})
        t.add_row(
            state, str(n), str(d.get("p50", "-")), str(d.get("p95", "-")), str(d.get("p99", "-"))
        )
    console.print(t)
    t = Table("step", "n", "p50 s", "p95 s", title="Step latency")
    for step, d in data["step_latency_s"].items():
        t.add_row(step, str(d["n"]), str(d["p50"]), str(d["p95"]))
    console.print(t)
    t = Table("service", "unsent", "oldest unsent s", "p99 publish lag s", title="Outbox")
    for name, d in data["outbox"].items():
        t.add_row(
            name, str(d["unsent"]), str(d["oldest_unsent_s"] or 0), str(d["p99_publish_lag_s"])
        )
    console.print(t)
    console.print(
        f"dead letters: {data['dead_letters'] or 'none'}; "
        f"retries before dead-lettering: {data['retries_before_dead_letter']}"
    )
