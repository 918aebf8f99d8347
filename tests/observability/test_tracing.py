"""One trace per saga, exported over real OTLP/gRPC to a receiver on 127.0.0.1.

The services run as a separate OS process (``sagabus run all``), configured only by the standard
OTEL_* variables; the receiver is a real gRPC server built from opentelemetry-proto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from messaging import topology
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
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            {
                                "service": service,
                                "name": s.name,
                                "kind": s.kind,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "links": [ln.trace_id.hex() for ln in s.links],
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


@pytest_asyncio.fixture(scope="module")
async def traced(receiver: tuple[Receiver, int]) -> AsyncIterator[tuple[Settings, AsyncEngine]]:
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
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "process_manager.cli", "run", "all"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield s, engine
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        await engine.dispose()
        await support.drop_database(PG_ADMIN, f"sagabus_test_{run}")
        support.delete_vhost(f"sagabus-test-{run}")


async def test_one_trace_across_every_service_continuing_the_callers_traceparent(
    receiver: tuple[Receiver, int], traced: tuple[Settings, AsyncEngine]
) -> None:
    rec, _ = receiver
    settings, engine = traced
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
