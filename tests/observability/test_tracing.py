"""One trace per saga, exported over real OTLP/gRPC to a receiver on 127.0.0.1.

The services run as a separate OS process (``sagabus run all``), configured only by the standard
OTEL_* variables; the receiver is a real gRPC server built from opentelemetry-proto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import deadletters, topology
from messaging.db import ensure_database, make_engine
from messaging.service import migrate
from messaging.settings import Settings
from participants.inventory import service as inventory
from process_manager import bootstrap, ops
from tests import support
from tests.conftest import PG_ADMIN, _isolated_settings
from tests.support import checkout, wait_for

pytestmark = pytest.mark.e2e

CONSUMER, PRODUCER = 5, 4  # opentelemetry.proto.trace.v1.Span.SpanKind


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                service = resource.get("service.name", "")
                instance = resource.get("service.instance.id", "")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            {
                                "service": service,
                                "instance": instance,
                                "name": s.name,
                                "kind": s.kind,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "links": [ln.trace_id.hex() for ln in s.links],
                                "start": s.start_time_unix_nano,
                                "attrs": {
                                    a.key: a.value.string_value
                                    or a.value.int_value
                                    or a.value.bool_value
                                    for a in s.attributes
                                },
                            }
                        )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    r = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield r, port
    server.stop(grace=None)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Traced:
    settings: Settings
    engine: AsyncEngine
    env: dict[str, str]
    log_path: Path
    metrics_port: int


@pytest_asyncio.fixture(scope="module")
async def traced(
    receiver: tuple[Receiver, int], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Traced]:
    run = "otel" + uuid.uuid4().hex[:8]
    s = _isolated_settings(run)
    support.create_vhost(f"sagabus-test-{run}")
    await ensure_database(s)
    engine = make_engine(s)
    await migrate(bootstrap.definitions(s), engine)
    await topology.declare_all(s)
    env = {
        **os.environ,
        "SAGABUS_AMQP_URL": s.amqp_url,
        "SAGABUS_DATABASE_URL": s.database_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "SAGABUS_LOG_FORMAT": "json",
        "SAGABUS_SERVICE_INSTANCE": "obs-1",
    }
    port = _free_port()
    log_path = tmp_path_factory.mktemp("otel") / "services.jsonl"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "all"],
        env={**env, "SAGABUS_METRICS_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    try:
        yield Traced(s, engine, env, log_path, port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log_file.close()
        await engine.dispose()
        await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
        support.delete_vhost(f"sagabus-test-{run}")


async def test_one_trace_across_every_service_continuing_the_callers_traceparent(
    receiver: tuple[Receiver, int], traced: Traced
) -> None:
    rec, _ = receiver
    settings, engine = traced.settings, traced.engine
    sku = f"SKU-OTEL-{uuid.uuid4().hex[:6]}"
    async with engine.begin() as conn:
        await inventory.seed(conn, {sku: 5})
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    cmd = checkout(sku=sku)
    await ops.publish_starts(settings.amqp_url, [ops.start_message(cmd, traceparent=traceparent)])

    async def completed() -> Any:
        st = await ops.saga_status(engine, cmd.order_id)
        return st if st and st["state"] == "COMPLETED" else None

    status = await wait_for(completed, timeout=90, what="traced saga to complete")
    assert status["trace_id"] == trace_id

    wanted = {
        f"sagabus-{n}"
        for n in (
            "process-manager",
            "order",
            "risk",
            "payment",
            "inventory",
            "shipping",
            "notification",
            "analytics",
        )
    }

    async def all_services_reported() -> list[dict[str, Any]] | None:
        with rec.lock:
            mine = [s for s in rec.spans if s["trace_id"] == trace_id]
        if not wanted <= {s["service"] for s in mine}:
            return None
        ids = {s["span_id"] for s in mine}
        orphans = [
            s
            for s in mine
            if s["kind"] == CONSUMER
            and s["parent"] not in ids
            and s["attrs"].get("sagabus.message.type") != "checkout.StartCheckout.v1"
        ]
        return None if orphans else mine  # parents may still be in a later export batch

    spans = await wait_for(
        all_services_reported,
        timeout=60,
        what="spans from every service, with every consumer's parent",
    )
    # the services' resource says which instance they are (SAGABUS_SERVICE_INSTANCE)
    assert {sp["instance"] for sp in spans if sp["service"] in wanted} == {"obs-1"}
    _dump("completed", spans)
    by_id = {s["span_id"]: s for s in spans}
    consumers = [s for s in spans if s["kind"] == CONSUMER]
    producers = [s for s in spans if s["kind"] == PRODUCER]
    assert consumers and producers
    for s in consumers + producers:
        assert s["attrs"]["messaging.system"] == "rabbitmq"
        assert s["attrs"]["messaging.message.id"]
    # every consumer span hangs off the producer span of the message it processed (or, for the
    # start command, off the caller's span), and links to it
    for c in consumers:
        parent = by_id.get(c["parent"])
        assert (
            parent is not None
            or c["attrs"].get("sagabus.message.type") == "checkout.StartCheckout.v1"
        ), c
        if parent is not None:
            assert parent["kind"] == PRODUCER
            assert parent["attrs"]["messaging.message.id"] == c["attrs"]["messaging.message.id"]
        assert trace_id in c["links"]
    # the fan-out consumers are in the same trace
    fact_consumers = {
        c["service"]
        for c in consumers
        if c["attrs"]["messaging.destination.name"] == "sagabus.facts"
    }
    assert {"sagabus-notification", "sagabus-analytics"} <= fact_consumers
    # saga attributes on the process manager's spans
    pm = [c for c in consumers if c["service"] == "sagabus-process-manager"]
    assert any(c["attrs"].get("sagabus.saga.transition") == "COMPLETING->COMPLETED" for c in pm)
    assert all(c["attrs"].get("sagabus.saga.id") == str(status["saga_id"]) for c in pm)


def render_tree(spans: list[dict[str, Any]]) -> str:
    """An ASCII rendering of one trace, like Jaeger's timeline without the bars."""
    by_parent: dict[str, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in sorted(spans, key=lambda x: x["start"]):
        by_parent.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
    t0 = min(s["start"] for s in spans)
    kinds = {CONSUMER: "CONSUMER", PRODUCER: "PRODUCER", 1: "INTERNAL"}
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in by_parent.get(parent, []):
            extra = s["attrs"].get("sagabus.saga.transition") or s["attrs"].get(
                "messaging.rabbitmq.destination.routing_key", ""
            )
            lines.append(
                f"{(s['start'] - t0) / 1e6:8.1f} ms  {'  ' * depth}{s['service']:<26}"
                f"{kinds.get(s['kind'], s['kind']):<9} {s['name']}  {extra}"
            )
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


def _dump(name: str, spans: list[dict[str, Any]]) -> None:
    target = os.environ.get("SAGABUS_TRACE_DUMP")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / f"{name}.txt").write_text(render_tree(spans) + "\n")


async def _spans_of(
    rec: Receiver, trace_id: str, services: set[str], transitions: set[str]
) -> list[dict[str, Any]]:
    """Poll until the trace holds spans of ``services`` and the saga ``transitions``."""

    async def probe() -> list[dict[str, Any]] | None:
        with rec.lock:
            mine = [s for s in rec.spans if s["trace_id"] == trace_id]
        seen = {s["attrs"].get("sagabus.saga.transition") for s in mine}
        ids = {s["span_id"] for s in mine}
        orphans = [
            s
            for s in mine
            if s["kind"] == CONSUMER
            and s["parent"] not in ids
            and s["attrs"].get("sagabus.message.type") != "checkout.StartCheckout.v1"
        ]
        ok = services <= {s["service"] for s in mine} and transitions <= seen and not orphans
        return mine if ok else None

    return await wait_for(probe, timeout=60, what=f"{services} and {transitions} in {trace_id}")


async def test_compensated_saga_is_one_trace_with_the_compensation_in_it(
    receiver: tuple[Receiver, int], traced: Traced
) -> None:
    rec, _ = receiver
    trace_id = uuid.uuid4().hex
    cmd = checkout(token="tok_decline")
    await ops.publish_starts(
        traced.settings.amqp_url,
        [ops.start_message(cmd, traceparent=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")],
    )

    async def compensated() -> Any:
        st = await ops.saga_status(traced.engine, cmd.order_id)
        return st if st and st["state"] == "COMPENSATED" else None

    await wait_for(compensated, timeout=90, what="declined saga to compensate")
    spans = await _spans_of(
        rec,
        trace_id,
        {
            "sagabus-process-manager",
            "sagabus-order",
            "sagabus-payment",
            "sagabus-notification",
            "sagabus-analytics",
        },
        {"PENDING_PAYMENT->COMPENSATING", "COMPENSATING->COMPENSATED"},
    )
    _dump("compensated", spans)
    transitions = {s["attrs"].get("sagabus.saga.transition") for s in spans}
    assert "PENDING_PAYMENT->COMPENSATING" in transitions
    assert "COMPENSATING->COMPENSATED" in transitions
    assert any(
        s["attrs"].get("messaging.rabbitmq.destination.routing_key") == "order.CancelOrder"
        and s["kind"] == PRODUCER
        for s in spans
    )


async def test_replayed_dead_letter_gets_a_new_span_linked_to_the_original(
    receiver: tuple[Receiver, int], traced: Traced
) -> None:
    rec, _ = receiver
    trace_id = uuid.uuid4().hex
    mid = str(uuid.uuid4())
    connection = await aio_pika.connect(traced.settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.get_exchange("sagabus.commands")
        await ex.publish(
            aio_pika.Message(
                b"{not json",
                message_id=mid,
                type="checkout.StartCheckout.v1",
                headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
            ),
            routing_key="checkout.start",
        )

    async def stored() -> Any:
        rows = await deadletters.list_dead_letters(traced.engine, deadletters.Filters(), 1000)
        return next((r for r in rows if r["message_id"] == mid), None)

    row = await wait_for(stored, timeout=60, what="dead letter collected")
    assert row["trace_id"] == trace_id
    out = subprocess.run(
        [sys.executable, "-m", "cli", "dlq", "replay", row["id"]],
        env={**traced.env, "OTEL_SERVICE_NAME": "sagabus-cli"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr

    async def replay_span() -> Any:
        with rec.lock:
            return next(
                (
                    s
                    for s in rec.spans
                    if s["attrs"].get("sagabus.dead_letter.id") == row["id"]
                    and s["attrs"].get("sagabus.replay") == "true"
                ),
                None,
            )

    span = await wait_for(replay_span, timeout=60, what="replay span exported")
    assert span["kind"] == PRODUCER
    assert trace_id in span["links"]


async def test_metrics_endpoint_and_stats_report_the_sagas(traced: Traced) -> None:
    cmd = checkout(sku="SKU-NONE-" + uuid.uuid4().hex[:6])  # no stock: compensates
    await ops.publish_starts(traced.settings.amqp_url, [ops.start_message(cmd)])

    async def finished() -> Any:
        st = await ops.saga_status(traced.engine, cmd.order_id)
        return st if st and st["terminal"] else None

    await wait_for(finished, timeout=90, what="saga to finish")

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{traced.metrics_port}/metrics", timeout=10
        ) as r:
            text = r.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    async def scraped() -> dict[str, float] | None:
        v = scrape()
        return v if v.get('sagabus_sagas_finished_total{outcome="compensated"}', 0) >= 1 else None

    values = await wait_for(scraped, timeout=30, what="metrics to show the compensated saga")
    assert values["sagabus_sagas_started_total"] >= 1
    assert values['sagabus_messages_total{result="processed",service="payment"}'] >= 1
    assert values["sagabus_compensations_started_total"] >= 1
    assert any(k.startswith("sagabus_saga_duration_seconds_count") for k in values)
    assert any(k.startswith('sagabus_outbox_unsent{service="process-manager"}') for k in values)

    out = subprocess.run(
        [sys.executable, "-m", "cli", "stats", "--json"],
        env=traced.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["sagas"]["by_state"].get("COMPENSATED", 0) >= 1
    assert 0 < stats["compensation_rate"] <= 1
    assert "inventory" in stats["step_latency_s"]
    assert set(stats["outbox"]) >= {"process-manager", "payment"}


def test_every_handler_log_line_carries_saga_and_trace_ids(traced: Traced) -> None:
    """Runs after the sagas above: the services' JSON log lines, read back as data."""
    lines = [json.loads(x) for x in traced.log_path.read_text().splitlines() if x.startswith("{")]
    handled = [x for x in lines if x.get("message_id") and x.get("saga_id")]
    assert any(x["event"] == "saga_transitioned" for x in handled)
    for x in handled:
        for key in ("service", "message_type", "saga_id", "correlation_id", "trace_id", "span_id"):
            assert x.get(key), (key, x)
    # every line says which instance wrote it (SAGABUS_SERVICE_INSTANCE)
    assert {x.get("instance") for x in lines} == {"obs-1"}
    for x in lines:
        if x.get("event") in ("saga_transitioned", "message_dead_lettered", "duplicate_ignored"):
            assert x.get("trace_id") and x.get("message_id"), x
