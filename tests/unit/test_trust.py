"""messaging.trust: what is believed of a delivery before its body is read (issue 9). Pure: the
deliveries are plain objects with the properties RabbitMQ sets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from messaging import topology, trust
from schemas.envelope import HeaderNames

pytestmark = pytest.mark.unit

PM = topology.QUEUES["process-manager"].name
PAYMENT_Q = topology.QUEUES["payment"].name
AUTHORIZED = "payment.PaymentAuthorized.v1"
START = "checkout.StartCheckout.v1"
PREFIX = "sagabus-"


def delivery(
    exchange: str, key: str, headers: dict[str, Any] | None = None, user_id: str | None = None
) -> Any:
    return SimpleNamespace(
        exchange=exchange,
        routing_key=key,
        headers=headers,
        user_id=user_id,
        message_id="m-1",
        type=None,
        body=b"{}",
    )


def arrive(d: Any, queue: str = PM, own_user: str | None = "sagabus-process-manager") -> Any:
    return trust.arrival(d, queue, own_user=own_user, max_retries=6)


def test_a_reply_by_its_own_route_from_its_owner_is_believed() -> None:
    a = arrive(delivery(topology.REPLIES_EXCHANGE, AUTHORIZED, user_id="sagabus-payment"))
    trust.check(a, PM, AUTHORIZED, sender_prefix=PREFIX)
    assert (a.via, a.sender, a.retries) == ("direct", "sagabus-payment", 0)


@pytest.mark.parametrize(
    ("exchange", "key"),
    [
        (topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY),  # the start route
        (topology.REPLIES_EXCHANGE, "inventory.InventoryReserved.v1"),  # another type's key
        (topology.REPLIES_EXCHANGE, "payment.PaymentAuthorized.v2"),
        (topology.FACTS_EXCHANGE, AUTHORIZED),
        (topology.REPLAY_EXCHANGE, PM),  # a replay that does not say where it came from
        ("", PM),  # a "retry" that does not say where it came from
    ],
)
def test_a_reply_by_any_other_route_is_a_forbidden_route(exchange: str, key: str) -> None:
    d = delivery(
        exchange, key, user_id="sagabus-payment" if exchange else "sagabus-process-manager"
    )
    with pytest.raises(trust.Forbidden) as e:
        trust.check(arrive(d), PM, AUTHORIZED, sender_prefix=PREFIX)
    assert str(e.value).startswith("forbidden route")
    assert e.value.metric_reason == "forbidden_route"


@pytest.mark.parametrize("user", [None, "sagabus-inventory", "sagabus-client", "guest"])
def test_a_reply_from_anyone_but_its_owner_is_a_forbidden_sender(user: str | None) -> None:
    a = arrive(delivery(topology.REPLIES_EXCHANGE, AUTHORIZED, user_id=user))
    with pytest.raises(trust.Forbidden) as e:
        trust.check(a, PM, AUTHORIZED, sender_prefix=PREFIX)
    assert str(e.value).startswith("forbidden sender")


def test_without_provisioned_users_the_sender_is_not_checked_but_the_route_is() -> None:
    assert trust.sender_prefix("guest", "process-manager") is None
    a = arrive(delivery(topology.REPLIES_EXCHANGE, AUTHORIZED, user_id="guest"), own_user="guest")
    trust.check(a, PM, AUTHORIZED, sender_prefix=None)
    forged = arrive(delivery(topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY))
    with pytest.raises(trust.Forbidden):
        trust.check(forged, PM, AUTHORIZED, sender_prefix=None)


def test_the_prefix_comes_from_the_services_own_user() -> None:
    assert trust.sender_prefix("sagabus-demo-payment", "payment") == "sagabus-demo-"
    assert trust.sender_prefix("payment", "payment") == ""


def test_a_command_only_from_the_process_manager_on_its_own_key() -> None:
    ok = arrive(
        delivery(
            topology.COMMANDS_EXCHANGE,
            "payment.AuthorizePayment",
            user_id="sagabus-process-manager",
        ),
        queue=PAYMENT_Q,
        own_user="sagabus-payment",
    )
    trust.check(ok, PAYMENT_Q, "payment.AuthorizePayment.v1", sender_prefix=PREFIX)
    wrong_key = arrive(
        delivery(topology.COMMANDS_EXCHANGE, "payment.RefundPayment", user_id=ok.sender),
        queue=PAYMENT_Q,
    )
    with pytest.raises(trust.Forbidden):
        trust.check(wrong_key, PAYMENT_Q, "payment.AuthorizePayment.v1", sender_prefix=PREFIX)
    with pytest.raises(trust.Forbidden):  # a reply type is never accepted on a participant
        trust.check(ok, PAYMENT_Q, AUTHORIZED, sender_prefix=PREFIX)


def test_the_start_route_believes_none_of_our_headers() -> None:
    headers = {
        HeaderNames.SAGA_ID: "x",
        HeaderNames.FENCE: 5,
        HeaderNames.RETRY_COUNT: -100,
        HeaderNames.ORIGINAL_EXCHANGE: topology.REPLIES_EXCHANGE,
        HeaderNames.ORIGINAL_ROUTING_KEY: AUTHORIZED,
        HeaderNames.RETRY_STATE_PREFIX + "x": 3,
        HeaderNames.REPLY_TOKEN: "t",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-custom": "kept",
    }
    a = arrive(
        delivery(topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY, headers, "sagabus-client")
    )
    assert a.start and a.retries == 0
    assert a.route == topology.Route(topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY)
    assert set(a.headers) == {"traceparent", "x-custom"}
    trust.check(a, PM, START, sender_prefix=PREFIX)  # anyone allowed on the route may start


def test_our_bookkeeping_from_outside_is_dropped_on_every_direct_route() -> None:
    headers = {
        HeaderNames.RETRY_COUNT: 3,
        HeaderNames.ORIGINAL_USER_ID: "sagabus-payment",
        HeaderNames.RETRY_STATE_PREFIX + "shipping-carrier-attempts": 9,
        HeaderNames.SAGA_ID: "kept: the envelope of a reply",
    }
    a = arrive(delivery(topology.REPLIES_EXCHANGE, AUTHORIZED, headers, "sagabus-inventory"))
    assert a.headers == {HeaderNames.SAGA_ID: "kept: the envelope of a reply"}
    assert a.sender == "sagabus-inventory"  # the header does not change who sent it


def _retry_headers(count: Any) -> dict[str, Any]:
    return {
        HeaderNames.RETRY_COUNT: count,
        HeaderNames.ORIGINAL_EXCHANGE: topology.REPLIES_EXCHANGE,
        HeaderNames.ORIGINAL_ROUTING_KEY: AUTHORIZED,
        HeaderNames.ORIGINAL_USER_ID: "sagabus-payment",
        HeaderNames.RETRY_STATE_PREFIX + "x": 1,
    }


def test_a_retry_is_judged_by_the_route_and_sender_it_first_came_by() -> None:
    d = delivery("", PM, _retry_headers(2), user_id="sagabus-process-manager")
    a = arrive(d)
    assert (a.via, a.route.routing_key, a.sender, a.retries) == (
        "retry",
        AUTHORIZED,
        "sagabus-payment",
        2,
    )
    assert HeaderNames.RETRY_STATE_PREFIX + "x" in a.headers
    trust.check(a, PM, AUTHORIZED, sender_prefix=PREFIX)


def test_a_retry_not_made_by_this_service_is_refused() -> None:
    d = delivery("", PM, _retry_headers(1), user_id="sagabus-payment")
    with pytest.raises(trust.Forbidden):
        arrive(d)


@pytest.mark.parametrize(
    ("count", "expected"),
    [(-1, 0), (-100, 0), ("x", 0), (b"3", 3), (10**9, 6), (None, 0), (True, 0), (2.5, 0)],
)
def test_the_retry_count_is_parsed_defensively_and_clamped(count: Any, expected: int) -> None:
    assert trust.clamp_retries(count, 6) == expected
    d = delivery("", PM, _retry_headers(count), user_id="sagabus-process-manager")
    assert arrive(d).retries == expected


def test_a_replay_keeps_its_original_route_and_sender_but_no_retry_state() -> None:
    d = delivery(topology.REPLAY_EXCHANGE, PM, _retry_headers(4), user_id="sagabus-operator")
    a = arrive(d)
    assert (a.via, a.sender, a.retries) == ("replay", "sagabus-payment", 0)
    assert HeaderNames.RETRY_COUNT not in a.headers
    assert not any(k.startswith(HeaderNames.RETRY_STATE_PREFIX) for k in a.headers)
    trust.check(a, PM, AUTHORIZED, sender_prefix=PREFIX)


def test_a_refused_delivery_is_dead_lettered_with_the_route_it_physically_came_by() -> None:
    d = delivery("", PM, _retry_headers(1), user_id="sagabus-payment")
    a = trust.as_received(d)
    assert a.route == topology.Route("", PM) and a.via == "direct"
    assert HeaderNames.ORIGINAL_EXCHANGE not in a.headers  # a replay of it is refused again


def test_every_accepted_type_has_exactly_one_route_per_queue_and_a_sender() -> None:
    for queue, types in topology.ACCEPTED.items():
        assert queue in topology.QUEUE_BY_NAME
        for type_name, (route, sender) in types.items():
            assert route.exchange in topology.EXCHANGES
            assert sender == topology.ANY_SENDER or sender in topology.QUEUES, type_name
    assert topology.accepted_route(PM, START) == (
        topology.Route(topology.COMMANDS_EXCHANGE, topology.START_ROUTING_KEY),
        topology.ANY_SENDER,
    )


# -- what the dead-letter collector believes (review finding 3) ---------------------------------


def dead_lettered(exchange: str, headers: dict[str, Any], user_id: str | None) -> Any:
    return SimpleNamespace(
        exchange=exchange,
        routing_key=PAYMENT_Q,
        headers=headers,
        user_id=user_id,
        type="payment.RefundPayment.v1",
        message_id="m-1",
        body=b'{"order_id": "o-1", "amount_minor": 100, "currency": "EUR"}',
        content_type="application/json",
        content_encoding=None,
        correlation_id=None,
        timestamp=None,
        app_id=None,
        priority=None,
        reply_to=None,
        expiration=None,
    )


FORGED = {
    HeaderNames.ORIGINAL_EXCHANGE: topology.COMMANDS_EXCHANGE,
    HeaderNames.ORIGINAL_ROUTING_KEY: "payment.RefundPayment",
    HeaderNames.ORIGINAL_USER_ID: "sagabus-process-manager",
    HeaderNames.DEAD_LETTERED_BY: "broker",
}


def test_the_collector_never_believes_a_claimed_broker_mark() -> None:
    from messaging.deadletters import row_from_delivery

    # a copy the payment user put into its own DLQ through sagabus.dlx, claiming everything
    row = row_from_delivery(
        dead_lettered(topology.DEAD_LETTER_EXCHANGE, dict(FORGED), "sagabus-payment"),
        f"{PAYMENT_Q}.dlq",
    )
    assert HeaderNames.DEAD_LETTERED_BY not in row["headers"]


def test_a_broker_dead_letter_is_judged_by_its_validated_sender_not_its_headers() -> None:
    from messaging.deadletters import row_from_delivery

    x_death = [
        {
            "queue": "sagabus.process-manager",  # forged: the DLQ says which queue
            "reason": "rejected",
            "exchange": topology.COMMANDS_EXCHANGE,
            "routing-keys": ["payment.RefundPayment"],
            "count": 1,
        }
    ]
    row = row_from_delivery(
        dead_lettered(
            topology.BROKER_DEAD_LETTER_EXCHANGE,
            {**FORGED, "x-death": x_death},
            "sagabus-payment",
        ),
        f"{PAYMENT_Q}.dlq",
    )
    h = row["headers"]
    assert row["queue"] == PAYMENT_Q
    assert h[HeaderNames.DEAD_LETTERED_BY] == "broker"
    assert h[HeaderNames.ORIGINAL_USER_ID] == "sagabus-payment"  # the validated user_id
    # replayed by the operator, it is refused: a refund must come from the process manager
    replayed = delivery(topology.REPLAY_EXCHANGE, PAYMENT_Q, h, user_id="sagabus-operator")
    a = trust.arrival(replayed, PAYMENT_Q, own_user="sagabus-payment", max_retries=6, key=b"k")
    with pytest.raises(trust.Forbidden) as e:
        trust.check(a, PAYMENT_Q, "payment.RefundPayment.v1", sender_prefix=PREFIX)
    assert str(e.value).startswith("forbidden sender")


def test_a_crashed_retry_copy_must_carry_its_consumers_signature() -> None:
    from messaging.deadletters import row_from_delivery

    x_death = [{"queue": PAYMENT_Q, "reason": "delivery_limit", "exchange": "", "count": 20}]
    row = row_from_delivery(
        dead_lettered(
            topology.BROKER_DEAD_LETTER_EXCHANGE,
            {**FORGED, "x-death": x_death},
            "sagabus-payment",
        ),
        f"{PAYMENT_Q}.dlq",
    )
    h = row["headers"]
    assert HeaderNames.DEAD_LETTERED_BY not in h  # unsigned claims are not vouched for
    replayed = delivery(topology.REPLAY_EXCHANGE, PAYMENT_Q, h, user_id="sagabus-operator")
    with pytest.raises(trust.Forbidden):
        trust.arrival(replayed, PAYMENT_Q, own_user="sagabus-payment", max_retries=6, key=b"k")


def test_dead_letter_display_masks_reply_tokens() -> None:
    from messaging.telemetry import mask_personal

    shown = mask_personal({HeaderNames.REPLY_TOKEN: "3f9c2a1e5b7d4c6a", HeaderNames.FENCE: 2})
    assert shown == {HeaderNames.REPLY_TOKEN: "***", HeaderNames.FENCE: 2}


def test_run_all_takes_each_services_own_credentials_from_the_environment() -> None:
    from messaging.service import Credentials, credentials_from_env

    env = {
        "SAGABUS_AMQP_URL_PROCESS_MANAGER": "amqp://sagabus-process-manager:p@h/",
        "SAGABUS_DATABASE_URL_PROCESS_MANAGER": "postgresql://sagabus_process_manager:p@h/db",
        "SAGABUS_AMQP_URL_DEAD_LETTERS": "amqp://sagabus-dead-letters:p@h/",
        "SAGABUS_AMQP_URL_ORDER": "",  # empty: not given
    }
    found = credentials_from_env(["process-manager", "order", "dead-letters"], env)
    assert found == {
        "process-manager": Credentials(
            "amqp://sagabus-process-manager:p@h/", "postgresql://sagabus_process_manager:p@h/db"
        ),
        "dead-letters": Credentials("amqp://sagabus-dead-letters:p@h/", None),
    }
