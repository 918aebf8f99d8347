"""Prometheus metrics, one registry per process, served on ``SAGABUS_METRICS_PORT``.

Saga-level counters and histograms are updated by the process manager as it decides; message
counters (processed, duplicates, retried, dead-lettered) and outbox counters are read from the
running consumers and relays when scraped; outbox backlog gauges are sampled from PostgreSQL.
``sagabus stats`` summarises the same picture from the database, across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

if TYPE_CHECKING:
    from messaging.service import Runtime

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class SagaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("sagabus_sagas_started", "Sagas started", registry=registry)
        self.finished = Counter(
            "sagabus_sagas_finished",
            "Sagas that reached a terminal state, by outcome "
            "(completed, compensated, needs_manual)",
            ["outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "sagabus_saga_duration_seconds",
            "Time from start to terminal state, by outcome",
            ["outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.compensations = Counter(
            "sagabus_compensations_started", "Sagas that began compensating", registry=registry
        )
        self.step_latency = Histogram(
            "sagabus_step_latency_seconds",
            "Time from a step's (last) send to the reply that settled it",
            ["step"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.timeouts = Counter(
            "sagabus_step_timeouts", "Step deadlines that passed", ["step"], registry=registry
        )
        self.ignored = Counter(
            "sagabus_saga_messages_ignored",
            "Replies and timeouts recorded as ignored (stale fence, duplicate, late)",
            registry=registry,
        )
        self.swept = Counter(
            "sagabus_stuck_sagas_swept",
            "Sagas moved to FAILED_NEEDS_MANUAL by the time-to-live sweeper",
            registry=registry,
        )


class _RuntimeCollector(Collector):
    """Reads the counters the consumers and relays keep, at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[CounterMetricFamily]:
        messages = CounterMetricFamily(
            "sagabus_messages",
            "Deliveries handled, by service and result "
            "(processed, duplicates, retried, dead_lettered)",
            labels=["service", "result"],
        )
        for name, consumer in self.runtime.consumers.items():
            for result, n in consumer.counts.items():
                messages.add_metric([name, result], n)
        yield messages
        published = CounterMetricFamily(
            "sagabus_outbox_published", "Outbox rows published", labels=["service"]
        )
        for name, relay in self.runtime.relays.items():
            published.add_metric([name], relay.published)
        yield published
        if self.runtime.collector is not None:
            yield CounterMetricFamily(
                "sagabus_dead_letters_collected",
                "Dead letters moved into the store",
                value=self.runtime.collector.collected,
            )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.saga = SagaMetrics(self.registry)
        self.outbox_unsent = Gauge(
            "sagabus_outbox_unsent",
            "Outbox rows not yet published",
            ["service"],
            registry=self.registry,
        )
        #: exposed as sagabus_messages_rejected_security_total
        self.rejected_security = Counter(
            "sagabus_messages_rejected_security",
            "Messages refused as a security event (forbidden route or sender, bad reply token)",
            ["service", "reason"],
            registry=self.registry,
        )
        self.outbox_lag = Gauge(
            "sagabus_outbox_oldest_unsent_seconds",
            "Age of the oldest unpublished outbox row (outbox lag)",
            ["service"],
            registry=self.registry,
        )

    def watch(self, runtime: Runtime) -> None:
        self.registry.register(_RuntimeCollector(runtime))

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        return start_http_server(port, addr=addr, registry=self.registry)

    async def sample_outboxes(self, runtime: Runtime, interval: float = 5.0) -> None:
        while not runtime.stop_event.is_set():
            with contextlib.suppress(Exception):  # a database outage must not stop the loop
                async with runtime.engine.connect() as conn:
                    for d in runtime.definitions:
                        row = (
                            await conn.execute(
                                text(
                                    f"SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at)) "
                                    f'FROM "{d.schema}".outbox WHERE sent_at IS NULL'
                                )
                            )
                        ).one()
                        self.outbox_unsent.labels(d.name).set(row[0])
                        self.outbox_lag.labels(d.name).set(float(row[1] or 0))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(runtime.stop_event.wait(), interval)


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    """The process's metrics, created on first use (not at import)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS
