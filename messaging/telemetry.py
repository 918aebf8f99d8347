"""Tracing and logging set-up, done once per entry point and passed down.

Tracing follows the OpenTelemetry messaging conventions: a PRODUCER span per publish and a
CONSUMER span per processed delivery, W3C ``traceparent``/``tracestate`` in AMQP headers.
Export is configured by the standard ``OTEL_*`` variables; with no endpoint configured nothing is
exported, and an unreachable collector only costs dropped spans, never a failing service.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

_EXPORTER: SpanExporter | None = None
_PROVIDERS: dict[str, TracerProvider] = {}
_INSTANCE: str | None = None


def instance_id() -> str:
    """This process's instance id: ``SAGABUS_SERVICE_INSTANCE`` (see :func:`set_instance`), or
    ``<host>-<pid>``. It tells apart two instances of one service in spans and logs."""
    return _INSTANCE or f"{socket.gethostname()}-{os.getpid()}"


def set_instance(instance: str | None) -> None:
    """Set once by the entry point, before the first tracer or log line."""
    global _INSTANCE
    _INSTANCE = instance or None


def _exporter() -> SpanExporter | None:
    global _EXPORTER
    if _EXPORTER is not None:
        return _EXPORTER
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "").lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if wanted == "none" or (not endpoint and wanted != "otlp"):
        return None
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )
    # A collector that is down must not make the services noisy: the exporter logs each failed
    # batch; keep only its errors above warning level off the console.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter as HttpExporter,
        )

        _EXPORTER = HttpExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _EXPORTER = OTLPSpanExporter()
    return _EXPORTER


def tracer_provider(service: str) -> TracerProvider:
    """One provider per service, so services sharing a process still report their own
    ``service.name`` (``OTEL_SERVICE_NAME`` overrides it when a process runs one service)."""
    if service in _PROVIDERS:
        return _PROVIDERS[service]
    name = f"sagabus-{service}"
    override = os.environ.get("OTEL_SERVICE_NAME")
    if override and os.environ.get("SAGABUS_SINGLE_SERVICE") == "1":
        name = override
    provider = TracerProvider(
        resource=Resource.create({"service.name": name, "service.instance.id": instance_id()})
    )
    exporter = _exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    _PROVIDERS[service] = provider
    return provider


def tracer(service: str) -> trace.Tracer:
    return tracer_provider(service).get_tracer("sagabus")


def shutdown_tracing() -> None:
    for provider in _PROVIDERS.values():
        provider.force_flush(timeout_millis=5000)
        provider.shutdown()
    _PROVIDERS.clear()


def extract(headers: Mapping[str, Any]) -> Context:
    carrier = {
        k: (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in headers.items()
        if k in ("traceparent", "tracestate", "baggage")
    }
    return propagate.extract(carrier)


def inject(context: Context | None = None) -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return carrier


def messaging_attributes(
    operation: str,
    *,
    destination: str,
    routing_key: str | None = None,
    message_id: object = None,
    conversation_id: object = None,
    body_size: int | None = None,
    message_type: str | None = None,
    extra: Mapping[str, str | int | bool] | None = None,
) -> dict[str, str | int | bool]:
    """Span attributes per the OpenTelemetry messaging conventions, plus ``extra`` as given."""
    attrs: dict[str, str | int | bool] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": destination,
    }
    if routing_key is not None:
        attrs["messaging.rabbitmq.destination.routing_key"] = routing_key
    if message_id is not None:
        attrs["messaging.message.id"] = str(message_id)
    if conversation_id is not None:
        attrs["messaging.message.conversation_id"] = str(conversation_id)
    if body_size is not None:
        attrs["messaging.message.body.size"] = body_size
    if message_type is not None:
        attrs["sagabus.message.type"] = message_type
    attrs.update(extra or {})
    return attrs


def trace_ids() -> dict[str, str]:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in trace_ids().items():
        event.setdefault(key, value)
    return event


def _add_instance(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event.setdefault("instance", instance_id())
    return event


# -- personal data in logs and displays --------------------------------------------------------

#: keys whose values are personal data wherever they appear (a message body, a log field, a
#: header): the payment token and the shipping address with each of its fields
PERSONAL_KEYS = frozenset(
    {
        "payment_token",
        "shipping_address",
        "address",
        "line1",
        "line2",
        "city",
        "postal_code",
        # not personal, but secret: a dispatch's reply token proves a reply (issue 9)
        "sagabus-reply-token",
    }
)
MASK = "***"
#: payment tokens inside free text (``tok_visa``): the prefix stays, so a reader still sees
#: that a token was there
_TOKEN = re.compile(r"\btok_[A-Za-z0-9._:-]+")
#: ``"line1": "1 Main Street"`` (JSON) or ``'line1': '1 Main Street'`` (a Python repr) in text
_KEYS = "|".join(sorted(PERSONAL_KEYS - {"shipping_address", "address"}))
_KEYED = re.compile(
    r"""(?P<k>(?P<q>["'])(?:""" + _KEYS + r""")(?P=q)\s*[:=]\s*)(?:"[^"]*"|'[^']*')"""
)
#: PostgreSQL's error details quote the offending values: ``Key (col)=(value)`` and ``Failing
#: row contains (...)``
_PG_KEY = re.compile(r"Key \(([^)]*)\)=\((?:[^()]|\([^()]*\))*\)")
_PG_ROW = re.compile(r"Failing row contains \((?:[^()]|\([^()]*\))*\)")


def mask_text(text: str) -> str:
    """``text`` with payment tokens, keyed personal values and PostgreSQL's quoted row values
    replaced by ``***``."""
    text = _TOKEN.sub("tok_" + MASK, text)
    text = _KEYED.sub(lambda m: f"{m['k']}{m['q']}{MASK}{m['q']}", text)
    text = _PG_KEY.sub(lambda m: f"Key ({m[1]})=({MASK})", text)
    return _PG_ROW.sub(f"Failing row contains ({MASK})", text)


def mask_personal(value: Any, *, key: str | None = None) -> Any:
    """A copy of ``value`` (dicts, lists and strings, nested) with personal data masked: every
    leaf under a personal key becomes ``***`` (the structure stays, so a reader sees which
    fields there were), and strings elsewhere go through :func:`mask_text`."""
    if key is not None and key.lower() in PERSONAL_KEYS:
        if isinstance(value, Mapping):
            return {k: mask_personal(v, key=key) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [mask_personal(v, key=key) for v in value]
        return None if value is None else MASK
    if isinstance(value, Mapping):
        return {k: mask_personal(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_personal(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, bytes):
        return mask_text(value.decode("utf-8", "replace"))
    return value


def mask_json_body(body: bytes) -> str:
    """A message body for display: JSON with its personal fields masked, or, when it is not
    JSON, its text with tokens and keyed values masked."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return mask_text(text)
    masked = mask_personal(parsed)
    return text if masked == parsed else json.dumps(masked, ensure_ascii=False)


def _mask_personal_data(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no payment token or address reaches a log line, whichever field
    (or exception text) carries it."""
    for k in list(event):
        event[k] = mask_personal(event[k], key=k)
    return event


class _MaskingFilter(logging.Filter):
    """The same for the standard library's loggers (SQLAlchemy, aio-pika, asyncio)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info))
        return True


def log_processors(renderer: Any) -> list[Any]:
    """The structlog chain of every service, ending in ``renderer``: personal data is masked
    after the exception is formatted, so the traceback's text is masked too."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_trace_ids,
        _add_instance,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _mask_personal_data,
        renderer,
    ]


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """structlog: JSON lines when not on a terminal, readable lines on one; every line carries
    the process's ``instance`` id."""
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=log_processors(renderer),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskingFilter) for f in handler.filters):
            handler.addFilter(_MaskingFilter())
    logging.getLogger("aio_pika").setLevel(logging.ERROR)
    logging.getLogger("aiormq").setLevel(logging.ERROR)
