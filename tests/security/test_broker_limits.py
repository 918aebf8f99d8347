"""The broker refuses an oversized message itself (``max_message_size``, set in
deploy/rabbitmq/rabbitmq.conf and by scripts/services.sh on the local broker), before any
service sees it; a message under the limit but over the services' own limit still gets through
to be dead-lettered by the consumer."""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest

from messaging.settings import Settings
from tests import support
from tests.security.conftest import AMQP_BASE

pytestmark = pytest.mark.integration

BROKER_LIMIT = 1024 * 1024


@pytest.fixture
def vhost_url() -> Iterator[str]:
    vhost = f"sagabus-limits-{uuid.uuid4().hex[:8]}"
    support.create_vhost(vhost)
    try:
        yield AMQP_BASE.rstrip("/") + "/" + urllib.parse.quote(vhost, safe="")
    finally:
        support.delete_vhost(vhost)


def _channel(
    url: str,
) -> tuple[pika.BlockingConnection, pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def test_broker_refuses_a_message_over_max_message_size(vhost_url: str) -> None:
    connection, channel = _channel(vhost_url)
    try:
        queue = channel.queue_declare("", exclusive=True).method.queue
        # above the services' limit, under the broker's: accepted and delivered
        below = b"x" * (Settings.model_fields["max_message_bytes"].default * 2)
        assert len(below) < BROKER_LIMIT
        channel.basic_publish("", queue, below, mandatory=True)
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None and body == below

        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("", queue, b"x" * (2 * BROKER_LIMIT), mandatory=True)
            # without publisher confirms a refusal could arrive later; with them it is here
        assert refused.value.reply_code == 406  # PRECONDITION_FAILED
        assert "max size" in refused.value.reply_text
        # nothing of it reached the queue
        check = connection.channel()
        assert check.queue_declare(queue, passive=True).method.message_count == 0
    finally:
        if connection.is_open:
            connection.close()
