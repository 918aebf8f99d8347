"""The checkout saga's definition, as plain data that every peer implementation shares.

Standard library only, so that Temporal's workflow sandbox can import it. It mirrors sagabus's
checkout v1 (``process_manager.definitions.checkout.V1``: forward steps, their compensations,
the payment ladder, the refusals and the policy); :func:`check_matches_sagabus` proves that at
run time against the real definition. The peers implement v1: v2's fraud screening, backorder
path and credit notes have no counterpart here.
"""

from __future__ import annotations

from typing import Any

#: forward steps in order: (sagabus step name, command), as in checkout v1's steps
FORWARD: tuple[tuple[str, str], ...] = (
    ("order", "CreateOrder"),
    ("authorization", "AuthorizePayment"),
    ("inventory", "ReserveInventory"),
    ("shipment", "CreateShipment"),
    ("capture", "CapturePayment"),
    ("completion", "CompleteOrder"),
)
FORWARD_COMMANDS: tuple[str, ...] = tuple(command for _, command in FORWARD)

#: forward command -> the command that undoes it (CompleteOrder has none)
COMPENSATION: dict[str, str] = {
    "CreateOrder": "CancelOrder",
    "AuthorizePayment": "VoidAuthorization",
    "ReserveInventory": "ReleaseInventory",
    "CreateShipment": "CancelShipment",
    "CapturePayment": "RefundPayment",
}
ALL_COMMANDS: tuple[str, ...] = FORWARD_COMMANDS + tuple(COMPENSATION.values())

#: business refusals (sagabus's failure replies): the step did not happen, so it is not undone
REFUSALS: frozenset[str] = frozenset(
    {"PaymentDeclined", "InventoryUnavailable", "ShipmentFailed", "PaymentCaptureFailed"}
)

#: sagabus's Policy: sends of a forward step / of a compensation before giving up
MAX_STEP_ATTEMPTS = 3
MAX_COMPENSATION_ATTEMPTS = 5
STEP_TIMEOUT_S = 30.0
COMPENSATION_TIMEOUT_S = 30.0
#: sagabus's participants (messaging.settings): a transient failure is retried after 0.5, 2,
#: 10, 30, 30 s, six attempts per delivery
PARTICIPANT_RETRY_DELAYS_S = (0.5, 2.0, 10.0, 30.0)
PARTICIPANT_MAX_ATTEMPTS = 6


def compensation_plan(
    completed: list[str] | tuple[str, ...], unknown: str | None = None
) -> list[str]:
    """Compensating commands for the completed forward commands (and one whose outcome is
    unknown), newest first. Payment ladder as in sagabus: once CapturePayment happened the refund
    settles the payment, so there is no VoidAuthorization."""
    steps = list(completed)
    if unknown is not None and unknown not in steps:
        steps.append(unknown)
    plan: list[str] = []
    for command in reversed(steps):
        comp = COMPENSATION.get(command)
        if comp is None:
            continue
        if comp == "VoidAuthorization" and "CapturePayment" in steps:
            continue
        plan.append(comp)
    return plan


def check_matches_sagabus() -> None:
    """Raise AssertionError unless this definition equals sagabus's checkout v1: the same forward
    commands in the same order, the same compensations (none with a fallback), the same
    refusals, the same policy, and the same compensation plan for every prefix of completed
    steps (with and without an unknown step)."""
    from process_manager.definitions.checkout import V1
    from process_manager.engine import compensation_plan as sagabus_plan
    from schemas.checkout import StartCheckout

    sample = StartCheckout.model_validate(sample_order("definition-check", "SKU-1"))
    theirs = [(s.name, type(s.build(sample)).__name__) for s in V1.steps]
    assert theirs == list(FORWARD), f"forward steps differ: {theirs} != {list(FORWARD)}"
    assert not V1.paths, f"v1 has alternative paths: {[p.name for p in V1.paths]}"
    comp_cmd = {c.name: type(c.build(sample)).__name__ for c in V1.compensations}
    ladders = {c.name: c.fallback for c in V1.compensations if c.fallback}
    assert not ladders, f"v1's compensations have fallbacks the peers lack: {ladders}"
    theirs_comp = {
        type(s.build(sample)).__name__: comp_cmd[s.compensation] for s in V1.steps if s.compensation
    }
    assert theirs_comp == COMPENSATION, f"compensations differ: {theirs_comp} != {COMPENSATION}"
    theirs_refusals = {r.__name__ for s in V1.steps for r in s.failure}
    assert theirs_refusals == REFUSALS, f"refusals differ: {theirs_refusals} != {REFUSALS}"
    policy = V1.policy
    assert (
        policy.max_step_attempts,
        policy.max_compensation_attempts,
        policy.step_timeout.total_seconds(),
        policy.compensation_timeout.total_seconds(),
    ) == (MAX_STEP_ATTEMPTS, MAX_COMPENSATION_ATTEMPTS, STEP_TIMEOUT_S, COMPENSATION_TIMEOUT_S), (
        f"policy differs: {policy}"
    )
    to_cmd = dict(FORWARD)
    names = [name for name, _ in FORWARD]
    for k in range(len(names) + 1):
        done = names[:k]
        for unknown in [None, *names[k : k + 1]]:
            expected = [comp_cmd[c] for c in sagabus_plan(V1, tuple(done), unknown)]
            mine = compensation_plan(
                [to_cmd[n] for n in done], to_cmd[unknown] if unknown else None
            )
            assert mine == expected, f"plan for {done} / {unknown}: {mine} != {expected}"


def sample_order(order_id: str, sku: str, *, token: str = "tok_visa") -> dict[str, Any]:
    """A StartCheckout body as JSON-able data (the same shape sagabus's demo sends)."""
    return {
        "order_id": order_id,
        "customer_id": "cus_001",
        "currency": "EUR",
        "items": [{"sku": sku, "quantity": 1, "unit_price_minor": 1999}],
        "payment_token": token,
        "shipping_address": {
            "line1": "1 Demo Street",
            "city": "Utrecht",
            "postal_code": "3511AA",
            "country": "NL",
        },
    }
